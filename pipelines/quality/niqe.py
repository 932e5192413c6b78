"""NIQE (Mittal, Soundararajan, Bovik 2013) in batched PyTorch, from the canonical pristine parameters.

The algorithm of BasicSR's ``calculate_niqe`` and pyiqa's ``niqe`` (both follow the MATLAB release): rounded
luma in [0, 255], crop to whole 96x96 blocks, MSCN normalisation
with the 7x7 Gaussian window (edge-replicated), per-block AGGD features at full and half scale (MATLAB
``imresize`` bicubic with antialiasing), a multivariate Gaussian fitted to the blocks and its distance to the
pristine model. Lower is better. Only tensor ops: runs on the images' device, all images of a batch at once.
Parameters: ``niqe_pris_params.npz`` (mu_pris_param 1x36, cov_pris_param 36x36, gaussian_window 7x7), the
file BasicSR and VQFR ship.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..io.errors import InvalidImage, ModelFileInvalid

PARAMS_FILE = "niqe_pris_params.npz"
BLOCK = 96
# The AGGD shape grid of the reference (0.2 .. 10 in steps of 0.001) and its r(gamma) values.
_GAMMA_GRID = (0.2, 10.0, 0.001)
# Luma of RGB in [0, 1], scaled to [0, 255]: (weights, offset).
#   yiq:   Y of YIQ (0.299, 0.587, 0.114) x 255; pyiqa's `niqe` (color_space='yiq'), the NTIRE challenge metric.
#   ycbcr: BT.601 Y in [16, 235] (BasicSR's bgr2ycbcr y_only, MATLAB rgb2ycbcr); BasicSR calculate_niqe.
COLOR_SPACES = {"yiq": ((0.299, 0.587, 0.114), 0.0),
                "ycbcr": ((65.481, 128.553, 24.966), 16.0)}
# variant -> (luma, arithmetic). NIQE jumps with tiny input changes (the AGGD shape is snapped to a 0.001 grid),
# so matching a reference to 1e-3 means matching its roundings too:
#   pyiqa:  YIQ luma from a float32 product, float32 Gaussian window, float32 half-size resize, rest float64;
#           equals pyiqa's `niqe` (NTIRE 2025 scored with it).
#   matlab: YCbCr luma (BasicSR's convert_to='y'), float64 throughout: BasicSR's algorithm at MATLAB's
#           double precision. (BasicSR itself rounds its MSCN stage to float32, which moves its values by
#           up to ~0.02 on real photos.)
VARIANTS = {"pyiqa": "yiq", "matlab": "ycbcr"}
_EXPECTED = {"mu_pris_param": (1, 36), "cov_pris_param": (36, 36), "gaussian_window": (7, 7)}


def load_pristine_params(path: str) -> dict:
    """The three arrays of ``niqe_pris_params.npz`` as float64 tensors; a wrong file names what it holds."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # numpy raises several types on junk
        raise ModelFileInvalid(f"Cannot read NIQE parameters {path}: {type(exc).__name__}: {exc}. Expected an .npz "
                               f"with {', '.join(_EXPECTED)} (BasicSR's {PARAMS_FILE}).") from exc
    for key, shape in _EXPECTED.items():
        if key not in arrays or tuple(arrays[key].shape) != shape:
            found = {k: tuple(v.shape) for k, v in arrays.items()}
            raise ModelFileInvalid(f"{path} is not a NIQE pristine-parameter file: expected {key} of shape {shape}, "
                                   f"found {found}. Use BasicSR's {PARAMS_FILE}.")
    return {k: torch.from_numpy(arrays[k].astype("float64")) for k in _EXPECTED}


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def rgb_to_y255(images: torch.Tensor, color_space: str = "yiq") -> torch.Tensor:
    """[N,3,H,W] RGB in [0,1] (or [N,1,H,W] grey, taken as R=G=B) -> [N,1,H,W] luma in [0,255], not rounded.

    'yiq' is computed as pyiqa does (a float32 matrix product, then x 255): its luma lands on .5 for many 8-bit
    colours, so the float32 rounding decides the integer level, and one level in one pixel moves NIQE by ~1e-3.
    """
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    weights, offset = COLOR_SPACES[color_space]
    if color_space == "yiq":
        w = torch.tensor([[0.299, 0.587, 0.114]], dtype=torch.float32, device=images.device)
        y = torch.matmul(images.float().permute(0, 2, 3, 1), w.t()).permute(0, 3, 1, 2) * 255
        return y.to(images.dtype)
    w = torch.tensor(weights, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True) + offset


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """MATLAB's bicubic kernel (a = -0.5)."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _symmetric_pad(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """MATLAB 'symmetric' padding (the edge sample is repeated: ... b a | a b ...)."""
    n = x.shape[dim]
    head = x.narrow(dim, 0, pad).flip(dim)
    tail = x.narrow(dim, n - pad, pad).flip(dim)
    return torch.cat([head, x, tail], dim)


def matlab_half(x: torch.Tensor) -> torch.Tensor:
    """MATLAB ``imresize(x, 0.5)`` (bicubic, antialiasing on) of [N,C,H,W] with even H and W.

    At scale 1/2 every output sample has the same 8 taps (kernel widened by 2, centres at +-0.5, +-1.5, ...),
    so the resize is a stride-2 convolution after symmetric padding by 3, rows then columns.
    """
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"matlab_half needs even sizes, got {tuple(x.shape[-2:])}")
    d = torch.arange(8, dtype=x.dtype, device=x.device) - 3.5
    k = 0.5 * _cubic(0.5 * d)
    k = k / k.sum()
    n, c, h, w = x.shape
    y = _symmetric_pad(x.reshape(n * c, 1, h, w), 3, 2)
    y = F.conv2d(y, k.view(1, 1, 8, 1), stride=(2, 1))
    y = _symmetric_pad(y, 3, 3)
    y = F.conv2d(y, k.view(1, 1, 1, 8), stride=(1, 2))
    return y.reshape(n, c, h // 2, w // 2)


class NIQE:
    """``NIQE(params)(images [N,3,H,W] in [0,1]) -> [N]`` NIQE scores (lower is better).

    variant 'pyiqa' (default) gives pyiqa's ``niqe``, what the NTIRE 2025 challenge scored; 'matlab' gives
    BasicSR's ``calculate_niqe`` algorithm in double precision (see VARIANTS). Images must hold at least two
    whole 96x96 blocks (the references fail on fewer); the right/bottom remainder beyond whole 96-pixel blocks is ignored, as in the
    reference. Not differentiable (luma rounding, as the reference).
    """

    name = "niqe"
    lower_better = True
    score_range = (0.0, 100.0)

    def __init__(self, params: dict, device: torch.device | str | None = None, variant: str = "pyiqa"):
        if variant not in VARIANTS:
            raise ValueError(f"NIQE variant must be one of {tuple(VARIANTS)}, got {variant!r}")
        self.variant = variant
        self.color_space = VARIANTS[variant]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = _work_dtype(self.device)
        self.mu = params["mu_pris_param"].reshape(36).to(self.device, self.dtype)
        self.cov = params["cov_pris_param"].to(self.device, self.dtype)
        win = params["gaussian_window"]
        if variant == "pyiqa":  # pyiqa's fspecial window is rounded to float32
            win = win.float()
        win = win.to(self.device, self.dtype)
        # scipy.ndimage.convolve flips the kernel; the window is symmetric, flip anyway to be exact.
        self.window = win.flip(0, 1).reshape(1, 1, *win.shape)
        lo, hi, step = _GAMMA_GRID
        self.gam = torch.arange(round((hi - lo) / step) + 1, dtype=torch.float64) * step + lo
        r = torch.exp(2 * torch.lgamma(2 / self.gam) - torch.lgamma(1 / self.gam) - torch.lgamma(3 / self.gam))
        # r(gamma) increases strictly on the grid, so the reference's argmin |r - r_hat| is a sorted lookup.
        assert bool((r[1:] > r[:-1]).all())
        self.gam = self.gam.to(self.device, self.dtype)
        self.r_gam = r.to(self.device, self.dtype)

    @classmethod
    def from_file(cls, path: str, device=None, variant: str = "pyiqa") -> "NIQE":
        if not os.path.isfile(path):
            raise ModelFileInvalid(f"NIQE parameter file not found: {path}")
        params = load_pristine_params(path)
        obj = cls(params, device=device, variant=variant)
        obj._params = params
        return obj

    def to(self, device) -> "NIQE":
        params = getattr(self, "_params", None) or {
            "mu_pris_param": self.mu.reshape(1, 36).cpu(), "cov_pris_param": self.cov.cpu(),
            "gaussian_window": self.window[0, 0].flip(0, 1).cpu()}
        obj = NIQE(params, device=device, variant=self.variant)
        obj._params = params
        return obj

    # --- features -------------------------------------------------------------------------------------------
    def _aggd(self, x: torch.Tensor):
        """Asymmetric generalised Gaussian fit per row of x [..., L] -> (alpha, beta_l, beta_r)."""
        neg, pos = x < 0, x > 0
        left = torch.sqrt((x * x * neg).sum(-1) / neg.sum(-1))  # 0/0 -> nan, as numpy's mean of nothing
        right = torch.sqrt((x * x * pos).sum(-1) / pos.sum(-1))
        gammahat = left / right
        rhat = x.abs().mean(-1) ** 2 / (x * x).mean(-1)
        rhatnorm = rhat * (gammahat ** 3 + 1) * (gammahat + 1) / (gammahat ** 2 + 1) ** 2
        # nearest grid value of r; ties and NaN resolve to the lower index like numpy's argmin
        idx = torch.searchsorted(self.r_gam, rhatnorm.contiguous()).clamp(1, self.r_gam.numel() - 1)
        lower = self.r_gam[idx - 1]
        upper = self.r_gam[idx]
        idx = torch.where((rhatnorm - lower) ** 2 <= (upper - rhatnorm) ** 2, idx - 1, idx)
        idx = torch.where(torch.isnan(rhatnorm), torch.zeros_like(idx), idx)
        alpha = self.gam[idx]
        ratio = torch.exp(torch.lgamma(1 / alpha) - torch.lgamma(3 / alpha)).sqrt()
        return alpha, left * ratio, right * ratio

    def _block_features(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [N,K,b,b] -> [N,K,18]: AGGD shape/scale of the MSCN block and of its 4 neighbour products."""
        feats = []
        alpha, bl, br = self._aggd(blocks.flatten(-2))
        feats += [alpha, (bl + br) / 2]
        for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
            prod = blocks * torch.roll(blocks, shifts=shift, dims=(-2, -1))
            alpha, bl, br = self._aggd(prod.flatten(-2))
            mean = (br - bl) * torch.exp(torch.lgamma(2 / alpha) - torch.lgamma(1 / alpha))
            feats += [alpha, mean, bl, br]
        return torch.stack(feats, -1)

    def _mscn_blocks(self, y: torch.Tensor, block: int) -> torch.Tensor:
        """[N,1,H,W] -> MSCN coefficients cut into blocks [N,K,block,block].

        Kept as conv2d although a float64 conv2d is slow on CPUs: in flat (e.g. saturated) regions y - mu is a
        rounding residual whose sign the AGGD fit counts, so the summation order shows in the score; conv2d's
        order reproduces pyiqa and the scipy reference (summing the 49 taps directly moved NIQE by 1e-3)."""
        pad = self.window.shape[-1] // 2
        mu = F.conv2d(F.pad(y, (pad,) * 4, mode="replicate"), self.window)
        sq = F.conv2d(F.pad(y * y, (pad,) * 4, mode="replicate"), self.window)
        sigma = (sq - mu * mu).abs().sqrt()
        z = ((y - mu) / (sigma + 1))[:, 0]
        n, h, w = z.shape
        z = z.reshape(n, h // block, block, w // block, block).permute(0, 1, 3, 2, 4)
        return z.reshape(n, -1, block, block)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise InvalidImage(f"NIQE expects [N,3,H,W] (or [N,1,H,W]) images, got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if (h // BLOCK) * (w // BLOCK) < 2:
            raise InvalidImage(f"NIQE needs at least two whole {BLOCK}x{BLOCK} blocks (e.g. {BLOCK}x{2 * BLOCK}) to fit "
                               f"its Gaussian model, got a {w}x{h} image")
        y = rgb_to_y255(images.to(self.device), self.color_space).to(self.dtype).round()
        y = y[..., : (h // BLOCK) * BLOCK, : (w // BLOCK) * BLOCK]
        f1 = self._block_features(self._mscn_blocks(y, BLOCK))
        if self.variant == "pyiqa":  # pyiqa resizes in float32
            y2 = matlab_half((y / 255.0).float()).to(self.dtype) * 255.0
        else:
            y2 = matlab_half(y / 255.0) * 255.0
        f2 = self._block_features(self._mscn_blocks(y2, BLOCK // 2))
        feats = torch.cat([f1, f2], -1)  # [N,K,36]
        return self._distance(feats)

    def _distance(self, feats: torch.Tensor) -> torch.Tensor:
        nan = torch.isnan(feats)
        mu_d = torch.where(nan, torch.zeros_like(feats), feats).sum(1) / (~nan).sum(1)  # nanmean over blocks
        valid = (~nan.any(-1)).to(feats.dtype)[..., None]  # blocks without NaN enter the covariance
        cnt = valid.sum(1, keepdim=True)
        if bool((cnt < 2).any()):
            bad = (cnt.flatten() < 2).nonzero().flatten().tolist()
            raise InvalidImage(f"NIQE is undefined for image(s) {bad} of the batch: fewer than two 96x96 blocks have "
                               "texture (flat or constant regions give no AGGD fit), as in the reference")
        clean = torch.where(nan, torch.zeros_like(feats), feats)
        m = (clean * valid).sum(1, keepdim=True) / cnt
        dev = (clean - m) * valid
        cov_d = dev.transpose(1, 2) @ dev / (cnt - 1)
        inv = torch.linalg.pinv((self.cov + cov_d) / 2)
        diff = (self.mu - mu_d)[:, None, :]
        q = (diff @ inv @ diff.transpose(1, 2)).reshape(-1)
        return q.sqrt().to(torch.float32)
