"""The ILVR low-pass filter: cubic (a = -0.5) antialiased down-scaling by N, then cubic up-scaling by N.

Same weights as Assaf Shocher's `resizer` that ILVR and the pseudo-target code use (kernel stretched by N and
normalised to sum 1 when shrinking, mirror indices at the borders, output size ceil(size * scale)), written as
one dense matrix per axis so that a batch is filtered with two matrix products on any device.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return ((1.5 * ax ** 3 - 2.5 * ax ** 2 + 1) * (ax <= 1)
            + (-0.5 * ax ** 3 + 2.5 * ax ** 2 - 4 * ax + 2) * ((1 < ax) & (ax <= 2)))


def resize_matrix(in_len: int, scale: float, antialias: bool = True) -> np.ndarray:
    """[out_len, in_len] float64 matrix of the 1-D cubic resize by `scale`."""
    out_len = int(math.ceil(in_len * scale))
    aa = antialias and scale < 1
    width = 4.0 / scale if aa else 4.0
    kernel = (lambda a: scale * _cubic(scale * a)) if aa else _cubic
    out_coords = np.arange(1, out_len + 1) - (out_len - in_len * scale) / 2
    match = out_coords / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(match - width / 2)
    taps = int(np.ceil(width) + 2)
    fov = (left[:, None] + np.arange(taps) - 1).astype(np.int64)
    w = kernel(match[:, None] - fov - 1)
    sums = w.sum(axis=1, keepdims=True)
    sums[sums == 0] = 1.0
    w = w / sums
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    idx = mirror[np.mod(fov, len(mirror))]
    mat = np.zeros((out_len, in_len), dtype=np.float64)
    np.add.at(mat, (np.repeat(np.arange(out_len), taps), idx.ravel()), w.ravel())
    return mat


class LowPass:
    """x -> up(down(x)) for [..., H, W] tensors; `down` and `up` are exposed for tests and for the constraint."""

    def __init__(self, height: int, width: int, factor: int, device=None, dtype=torch.float32):
        if factor < 1 or height % factor or width % factor:
            raise ValueError(f"the low-pass factor {factor} must divide the image size {height}x{width}")
        self.factor = factor
        mats = (resize_matrix(height, 1 / factor), resize_matrix(width, 1 / factor),
                resize_matrix(height // factor, float(factor)), resize_matrix(width // factor, float(factor)))
        self.dh, self.dw, self.uh, self.uw = (torch.tensor(m, dtype=dtype, device=device) for m in mats)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.dh, x), self.dw.T)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.uh, x), self.uw.T)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))
