"""The training engine per-image tuning shares (tune/zssr.py, tune/ntire_refine.py): N independent residual CNNs
run as one grouped network, their optimiser, bicubic resampling and test-time helpers.

Batching: N faces of a batch are tuned together as N independent networks evaluated as ONE grouped
convolution per layer (weights [N, out, in, 3, 3] -> conv2d(groups=N) over [B, N*C, H, W]); Adam runs on the
stacked weights with per-face step sizes, and faces whose learning-rate policy has finished drop out of the
group. The losses of the faces are summed, so each face's gradient is its own. Every face draws its random
numbers (weight init, crops, augmentation, noise) from its own ``torch.Generator`` seeded with ``seed``:
face i of a batch gets the same result as face i tuned alone with the same seed (up to float rounding of the
grouped convolution). The global RNG is never used.

Groups: a caller may tune the faces of a batch in several groups one after the other (tune/memory.py sizes them
from the free memory); since nothing is shared between faces, the grouping changes nothing but rounding.

Interruption: ``hook(n)`` is called after every training step (n = 1, plus the steps a face batch skips when
its learning-rate policy ends early) and with n = 0 between test-time passes; whatever it raises propagates at
once and nothing is returned.

Previews: a hook may also have ``wants_preview()`` and ``preview(images)`` (a host's live preview on the node);
offer_preview gives it the current output at validation points, made only when one would be shown.

Pure torch: no ComfyUI or host imports.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..io.memory import empty_cache, is_oom

Hook = Optional[Callable[[int], None]]
MIN_SIDE = 8  # smaller images have nothing to learn from: defined fallbacks below


def offer_preview(hook, images: Callable[[], torch.Tensor]) -> None:
    """Show images() on a hook that previews (see above), only when it wants one now: a preview costs a copy to
    the host, so a hot loop pays nothing between previews and nothing at all standalone."""
    preview = getattr(hook, "preview", None)
    if preview is not None and hook.wants_preview():
        preview(images())


def _trains(method):
    """Hosts may call us under torch.inference_mode() (ComfyUI runs every node so) or no_grad; per-image
    training needs autograd, and inference-mode tensors cannot enter it: leave both and copy the input."""
    @functools.wraps(method)
    def wrapper(self, images, *args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return method(self, images.clone(), *args, **kwargs)
    return wrapper


# ----------------------------------------------------------------------------------------------------------
# resampling (MATLAB/PIL-style bicubic: a = -0.5, antialiased when shrinking)

def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


def downscale(x: torch.Tensor, sf: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    return resize(x, (max(1, math.ceil(h / sf)), max(1, math.ceil(w / sf))))


def bicubic_upscale(x: torch.Tensor, sf: int) -> torch.Tensor:
    """The baseline ZSSR learns a residual over (and the benchmark compares against)."""
    return resize(x, (x.shape[-2] * sf, x.shape[-1] * sf)).clamp(0, 1)


def back_projection(sr: torch.Tensor, lr: torch.Tensor, iters: int) -> torch.Tensor:
    for _ in range(iters):
        sr = (sr + resize(lr - resize(sr, lr.shape[-2:]), sr.shape[-2:])).clamp(0, 1)
    return sr


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def _dihedral_inv(x: torch.Tensor, k: int) -> torch.Tensor:
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, -(k % 4), dims=(-2, -1))


def psnr(a: torch.Tensor, b: torch.Tensor, shave: int = 0) -> torch.Tensor:
    """Per-image PSNR in dB of [N,C,H,W] in [0,1] (all channels), ignoring `shave` border pixels."""
    if shave:
        a = a[..., shave:-shave, shave:-shave]
        b = b[..., shave:-shave, shave:-shave]
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


# ----------------------------------------------------------------------------------------------------------
# N independent residual CNNs as one grouped network

class GroupedCNN:
    """`n` independent plain CNNs (3 -> width -> ... -> 3, 3x3, ReLU, zero padding, no bias) stored as
    stacked weights [n, out, in, 3, 3] and run as one grouped convolution per layer."""

    def __init__(self, weights: list[torch.Tensor]):
        self.weights = weights

    @staticmethod
    def init(generators: Sequence[torch.Generator], depth: int, width: int, init_variance: float,
             device: torch.device) -> "GroupedCNN":
        shapes = [(width, 3)] + [(width, width)] * (depth - 2) + [(3, width)]
        per_face = []
        for g in generators:  # each face from its own generator: independent of the batch it is in
            per_face.append([torch.randn((o, i, 3, 3), generator=g, dtype=torch.float32)
                             * math.sqrt(init_variance / (9 * i)) for o, i in shapes])
        weights = [torch.stack([f[layer] for f in per_face]).to(device) for layer in range(len(shapes))]
        return GroupedCNN(weights)

    @property
    def n(self) -> int:
        return self.weights[0].shape[0]

    def select(self, idx: torch.Tensor) -> list[torch.Tensor]:
        return [w.index_select(0, idx) for w in self.weights]

    @staticmethod
    def residual(weights: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x [B, n*3, H, W] -> the n networks' residuals [B, n*3, H, W]."""
        n = weights[0].shape[0]
        h = x
        last = len(weights) - 1
        for i, w in enumerate(weights):
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), padding=1, groups=n)
            if i < last:
                h = F.relu(h)
        return h

    @staticmethod
    def apply_full(weights: Sequence[torch.Tensor], faces: torch.Tensor, tile: int = 512) -> torch.Tensor:
        """faces [n,3,H,W] (one per network) -> clamp(faces + residual), no grad, tiled above `tile`
        pixels a side with a margin of `depth` pixels, which is exact (the receptive field radius)."""
        n, c, h, w = faces.shape
        x = faces.reshape(1, n * c, h, w)
        with torch.no_grad():
            if h <= tile and w <= tile:
                out = x + GroupedCNN.residual(weights, x)
            else:
                m = len(weights)
                out = torch.empty_like(x)
                for y0 in range(0, h, tile):
                    for x0 in range(0, w, tile):
                        y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                        ya, xa = max(0, y0 - m), max(0, x0 - m)
                        yb, xb = min(h, y1 + m), min(w, x1 + m)
                        part = x[..., ya:yb, xa:xb]
                        res = GroupedCNN.residual(weights, part)
                        out[..., y0:y1, x0:x1] = (part + res)[..., y0 - ya:y1 - ya, x0 - xa:x1 - xa]
        return out.reshape(n, c, h, w).clamp(0, 1)


class _Adam:
    """Adam (torch defaults) on stacked per-face weights, with a step size per face. Everything, the step counts
    and bias corrections included, stays on the weights' device: a step reads nothing back to the host."""

    def __init__(self, weights: Sequence[torch.Tensor], betas=(0.9, 0.999), eps=1e-8):
        self.m = [torch.zeros_like(w) for w in weights]
        self.v = [torch.zeros_like(w) for w in weights]
        self.t = torch.zeros(weights[0].shape[0], dtype=torch.float64, device=weights[0].device)
        self.b1, self.b2 = betas
        self.eps = eps

    @torch.no_grad()
    def step(self, weights: list[torch.Tensor], grads: Sequence[torch.Tensor], idx: torch.Tensor,
             lr: torch.Tensor) -> None:
        """Update faces `idx` of `weights` (in place) with their gradients `grads` ([len(idx), ...]); idx and the
        per-face learning rates lr ([len(idx)], float64) on the weights' device."""
        full = idx.numel() == weights[0].shape[0]
        self.t.index_add_(0, idx, torch.ones_like(self.t[:1]).expand(idx.numel()))
        t = self.t if full else self.t.index_select(0, idx)
        bc1 = (1 - self.b1 ** t)
        bc2 = (1 - self.b2 ** t)
        step = (lr.to(dtype=torch.float64) / bc1).float()
        root_bc2 = bc2.sqrt().float()
        for layer, g in enumerate(grads):
            shape = (-1,) + (1,) * (g.ndim - 1)
            m = self.m[layer] if full else self.m[layer].index_select(0, idx)
            v = self.v[layer] if full else self.v[layer].index_select(0, idx)
            w = weights[layer] if full else weights[layer].index_select(0, idx)
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            denom = (v.sqrt() / root_bc2.view(shape)).add_(self.eps)
            w.sub_(step.view(shape) * m / denom)
            if not full:
                self.m[layer].index_copy_(0, idx, m)
                self.v[layer].index_copy_(0, idx, v)
                weights[layer].index_copy_(0, idx, w)


def _train_step(net: GroupedCNN, adam: _Adam, idx: torch.Tensor, lr: torch.Tensor, inputs: torch.Tensor,
                loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One Adam step for faces `idx`. inputs [B, k*3, h, w] (k = len(idx)); loss_fn(outputs [B, k*3, h, w])
    -> per-face loss [k]. Returns the per-face losses (detached)."""
    params = [w.detach().requires_grad_(True) for w in net.select(idx)] if idx.numel() < net.n else \
        [w.detach().requires_grad_(True) for w in net.weights]
    out = inputs + GroupedCNN.residual(params, inputs)
    losses = loss_fn(out)
    grads = torch.autograd.grad(losses.sum(), params)
    adam.step(net.weights, grads, idx, lr)
    return losses.detach()


_is_oom = is_oom  # cuBLAS/cuDNN ALLOC_FAILED too (pipelines/io/memory.py)


def run_in_groups(n: int, per_group: int, run: Callable[[slice], object], shrink: bool = True,
                  what: str = "tuning") -> tuple[list, list[str]]:
    """run(faces) for consecutive groups of `per_group` of the n faces -> ([(slice, result)], notes). With
    `shrink` (automatic sizing), a group that runs out of memory anyway is run again with half as many faces
    (the results do not depend on the grouping; the hook hears the failed group's steps twice), down to one
    face; the notes say so. Other errors, and out-of-memory of a forced group size, propagate."""
    results, notes, start, k = [], [], 0, max(1, int(per_group))
    while start < n:
        faces = slice(start, min(start + k, n))
        try:
            results.append((faces, run(faces)))
            start = faces.stop
            continue
        except (RuntimeError, MemoryError) as exc:
            if not shrink or k == 1 or not _is_oom(exc):
                raise
            notes.append(f"{what}: out of memory with {faces.stop - faces.start} faces per group; retried with "
                         f"{k // 2}")
        k //= 2                          # (out of the except block: the failed group's tensors are released)
        empty_cache()
    return results, notes


def merge_face_lists(parts: list[dict]) -> dict:
    """The reports of consecutive groups of faces as one: per-face lists concatenated in face order, per-step
    records (lists of dicts, the same steps in every group) merged step by step, anything else (the same in
    every group) taken from the first."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        if isinstance(first, list) and first and all(isinstance(e, dict) for e in first):
            out[key] = [merge_face_lists(list(records)) for records in zip(*values)]
        elif isinstance(first, list):
            out[key] = [e for v in values for e in v]
        else:
            out[key] = first
    return out


def _generators(n: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(seed)) for _ in range(n)]


def _faces_to_batch(x: torch.Tensor) -> torch.Tensor:
    """[k, B, 3, h, w] -> [B, k*3, h, w]"""
    k, b, c, h, w = x.shape
    return x.permute(1, 0, 2, 3, 4).reshape(b, k * c, h, w)


def _batch_to_faces(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k*3, h, w] -> [k, B, 3, h, w]"""
    b, kc, h, w = x.shape
    return x.reshape(b, k, kc // k, h, w).permute(1, 0, 2, 3, 4)
