"""Per-image tuning: classic ZSSR x2/x4 and the NTIRE 2025 AIIA identity-pair refinement.

Two modes share one network family and one training engine:

* ``zssr`` -- "Zero-Shot" Super-Resolution (Shocher, Cohen, Irani, CVPR 2018; assafshocher/ZSSR configs.py):
  a plain fully convolutional CNN (``depth`` 8 layers of 3x3 convs, ``width`` 64 channels, ReLU, no biases,
  normal init with variance ``init_variance / fan_in``) learns the residual over a bicubic upsampling. Its
  training pairs come from the test image itself: an "HR father" is a random ``crop_size`` crop of the image
  (or of an already super-resolved copy, for the second x2 step) after a random augmentation (leave as is 5%;
  a dihedral transform with integer shift 45%; otherwise an affine warp with a random scale in
  [``min_scale``, current max], scale difference sigma 0.25, shear sigma 0.1, any rotation, mirror), and its
  "LR son" is the father downscaled by the scale factor with bicubic (optionally plus noise). L1 loss, Adam,
  and the paper's learning-rate policy: every ``run_test_every`` iterations the whole input (``test_crop``:
  its centre) is reconstructed from its own downscaled copy; every ``lr_policy_check_every`` iterations (at
  least ``min_iters`` after the last change) a line is fitted to the last ``lr_slope_range`` iterations of
  that reconstruction error, and when ``-lr_change_ratio * slope < std(slope)`` the learning rate is divided
  by 10; a face stops when its learning rate drops below ``min_learning_rate`` (or after ``max_iters``;
  ``ZSSRConfig.scaled_policy(steps)`` compresses the policy for short runs). At test time: geometric
  self-ensemble (8 rotations/flips, each back-projected ``back_projection_iters`` times, pixel-wise median,
  back-projected again). x4 runs as two x2 steps; the second learns from fathers cut from both the input and
  the first x2 result (the paper's gradual SR with base change at x2) and continues from the first step's
  weights (the paper's ``init_net_for_each_sf = False``). Two deliberate differences from the TF code: crop
  samples falling outside the image reflect (the paper's warp pads with black), and the random scale is
  kept large enough for the scaled image to cover a crop (small inputs would otherwise train on black).
* ``ntire_tune`` -- the "ZSSR" stage of the NTIRE 2025 AIIA entry (methods.md 4.2): the same residual CNN at
  scale 1, trained on identity pairs cut from the image's multi-scale copies (6 copies at
  linspace(1/max_scale, 1, 7)[1:], max_scale = min(5, short side / 128), picked with probability ~ scale^2;
  random crops, rot90 with p 0.5, horizontal flip with p 0.5; ``batch_size`` crops per step), loss
  ``l1_weight * L1 + sum(weight * fn(output))`` over the caller's NR-IQA loss terms, Adam with cosine decay to
  lr/1000, validation on the whole image every ``validation_interval`` steps keeping the best-scoring output
  per face, and an ID guard that rejects candidates whose identity similarity to the input is below
  ``id_threshold``. (AIIA used a GroupNorm/SiLU ResNet with a tanh output; the pack uses the plain ZSSR CNN
  with a residual over the input, so that with L1 only the network starts at -- and stays near -- identity.)

Batching: N faces of a batch are tuned together as N independent networks evaluated as ONE grouped
convolution per layer (weights [N, out, in, 3, 3] -> conv2d(groups=N) over [B, N*C, H, W]); Adam runs on the
stacked weights with per-face step sizes, and faces whose learning-rate policy has finished drop out of the
group. The losses of the faces are summed, so each face's gradient is its own. Every face draws its random
numbers (weight init, crops, augmentation, noise) from its own ``torch.Generator`` seeded with ``seed``:
face i of a batch gets the same result as face i tuned alone with the same seed (up to float rounding of the
grouped convolution). The global RNG is never used.

Interruption: ``hook(n)`` is called after every training step (n = 1, plus the steps a face batch skips when
its learning-rate policy ends early) and with n = 0 between test-time passes; whatever it raises propagates at
once and nothing is returned.

Pure torch: no ComfyUI or host imports.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .image_io import check_images

MODES = ("zssr", "ntire_tune")
Hook = Optional[Callable[[int], None]]
# (weight, fn): fn(images [M,3,h,w] in [0,1]) -> [M] loss per image (differentiable), e.g. 1 - CLIP-IQA.
QualityLoss = tuple
MIN_SIDE = 8  # smaller images have nothing to learn from: defined fallbacks below


def _trains(method):
    """Hosts may call us under torch.inference_mode() (ComfyUI runs every node so) or no_grad; per-image
    training needs autograd, and inference-mode tensors cannot enter it: leave both and copy the input."""
    @functools.wraps(method)
    def wrapper(self, images, *args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return method(self, images.clone(), *args, **kwargs)
    return wrapper


# ----------------------------------------------------------------------------------------------------------
# configuration

@dataclass
class ZSSRConfig:
    """Classic ZSSR; defaults are the paper's X2_ONE_JUMP_IDEAL_CONF (assafshocher/ZSSR configs.py)."""
    scale: int = 2                       # 2, 4 (two x2 steps), 8 (three)
    max_iters: int = 3000                # per x2 step
    min_iters: int = 256                 # no learning-rate change before this many iterations since the last
    learning_rate: float = 1e-3
    min_learning_rate: float = 9e-6      # stop when the learning rate falls below (after the 1e-5 stage)
    lr_change_ratio: float = 1.5
    lr_policy_check_every: int = 60
    lr_slope_range: int = 256
    run_test_every: int = 50
    test_crop: int = 0                   # reconstruction test on the central test_crop^2 of the input (0 = all)
    crop_size: int = 128
    width: int = 64
    depth: int = 8
    init_variance: float = 0.1
    noise_std: float = 0.0               # 0.0125 in the paper's X2_REAL_CONF
    back_projection_iters: int = 10
    self_ensemble: bool = True           # geometric self-ensemble (8 dihedral transforms, median)
    leave_as_is_probability: float = 0.05
    no_interpolate_probability: float = 0.45
    min_scale: float = 0.5
    scale_diff_sigma: float = 0.25
    shear_sigma: float = 0.1
    allow_rotation: bool = True
    tile_size: int = 512                 # full-image passes are tiled above this (exact: overlap >= depth)

    def scaled_policy(self, steps: int) -> "ZSSRConfig":
        """The same plateau policy fitted into a budget of `steps` iterations per x2 step (for CPUs): a
        learning-rate change at most every third of the run (the paper: every >= 256 of up to 3000), checked
        and tested 5 times per third, the line fitted to the last 5 tests as in the paper; the reconstruction
        test (then run far more often) covers the central 2 x crop_size square of the input, so that it
        costs about one training step. (Windows scaled by steps/3000 instead lowered the rate within the
        first 25 steps on real faces and lost up to 0.4 dB against a constant rate.)"""
        if steps >= self.max_iters:
            return replace(self, max_iters=int(steps))
        third = max(4, int(steps) // 3)
        every = max(2, third // 5)
        return replace(self, max_iters=int(steps), min_iters=third, lr_policy_check_every=every,
                       run_test_every=every, lr_slope_range=5 * every, test_crop=2 * self.crop_size)


@dataclass
class NTIREConfig:
    """NTIRE 2025 AIIA per-image tuning (methods.md 4.2), with the step count cut to a practical default."""
    steps: int = 500                     # AIIA: 8000
    learning_rate: float = 1e-3
    final_lr_ratio: float = 1e-3         # cosine decay to learning_rate * this
    crop_size: int = 128
    batch_size: int = 8
    num_scales: int = 6
    validation_interval: int = 100
    l1_weight: float = 1.0
    id_threshold: float = 0.6
    width: int = 64
    depth: int = 8
    init_variance: float = 0.1
    tile_size: int = 512


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
    """Adam (torch defaults) on stacked per-face weights, with a step size per face."""

    def __init__(self, weights: Sequence[torch.Tensor], betas=(0.9, 0.999), eps=1e-8):
        self.m = [torch.zeros_like(w) for w in weights]
        self.v = [torch.zeros_like(w) for w in weights]
        self.t = torch.zeros(weights[0].shape[0], dtype=torch.float64)
        self.b1, self.b2 = betas
        self.eps = eps

    @torch.no_grad()
    def step(self, weights: list[torch.Tensor], grads: Sequence[torch.Tensor], idx: torch.Tensor,
             lr: torch.Tensor) -> None:
        """Update faces `idx` of `weights` (in place) with their gradients `grads` ([len(idx), ...])."""
        full = idx.numel() == weights[0].shape[0]
        idx_cpu = idx.cpu()
        self.t[idx_cpu] += 1
        t = self.t[idx_cpu]
        bc1 = (1 - self.b1 ** t)
        bc2 = (1 - self.b2 ** t)
        step = (lr.double().cpu() / bc1).float().to(weights[0].device)
        root_bc2 = bc2.sqrt().float().to(weights[0].device)
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


# ----------------------------------------------------------------------------------------------------------
# ZSSR

def _zssr_fathers(sources: list[torch.Tensor], base_scales: list[float], max_scale: float, crop: int,
                  cfg: ZSSRConfig, rnd: torch.Tensor, nrm: torch.Tensor) -> torch.Tensor:
    """Random augmented HR fathers [k, 3, crop, crop] for the k faces of `sources[j]` ([k,3,Hj,Wj]), from
    per-face random numbers rnd [k, 6] (uniform) and nrm [k, 4] (normal), as ZSSR's random_augment:
    3x3 transform = shift_back . shift . shear . rotation . scale . shift_to_center, sampled with bicubic
    (affine) or exactly (integer shifts and 90-degree rotations). Out-of-image samples reflect."""
    k = rnd.shape[0]
    h0, w0 = sources[0].shape[-2:]
    dt = torch.float64
    u = rnd.to(dt)
    nr = nrm.to(dt)
    leave = u[:, 0] < cfg.leave_as_is_probability
    no_interp = (~leave) & (u[:, 0] < cfg.leave_as_is_probability + cfg.no_interpolate_probability)
    affine = ~(leave | no_interp)
    # the scaled image must cover a crop (the paper pads with black instead)
    min_scale = min(max(cfg.min_scale, crop / min(h0, w0)), max_scale)
    scale = torch.where(leave, torch.ones_like(u[:, 1]), u[:, 1] * (max_scale - min_scale) + min_scale)
    bases = torch.tensor(base_scales, dtype=dt)
    src_idx = (bases[None, :] <= scale[:, None] - 1e-6).sum(1).clamp(max=len(base_scales) - 1)
    base = bases[src_idx]
    hs = torch.tensor([s.shape[-2] for s in sources], dtype=dt)[src_idx]
    ws = torch.tensor([s.shape[-1] for s in sources], dtype=dt)[src_idx]
    s = torch.where(affine, scale / base, torch.ones_like(scale))
    diff = torch.where(affine, nr[:, 0] * cfg.scale_diff_sigma, torch.zeros_like(scale))
    reflect = torch.where(leave | (not cfg.allow_rotation), torch.ones_like(scale), torch.sign(nr[:, 1]))
    reflect = torch.where(reflect == 0, torch.ones_like(reflect), reflect)
    shift_x = u[:, 2] * (s * ws - crop).clamp_min(0)
    shift_y = u[:, 3] * (s * hs - crop).clamp_min(0)
    cx, cy = ws / 2, hs / 2
    rnd_int = ~affine
    shift_x = torch.where(rnd_int, shift_x.round(), shift_x)
    shift_y = torch.where(rnd_int, shift_y.round(), shift_y)
    cx = torch.where(rnd_int, cx.round(), cx)
    cy = torch.where(rnd_int, cy.round(), cy)
    theta = torch.where(affine, u[:, 4] * 2 * math.pi,
                        torch.where(no_interp, torch.floor(u[:, 5] * 4).clamp(max=3) * math.pi / 2,
                                    torch.zeros_like(scale)))
    if not cfg.allow_rotation:
        theta = torch.zeros_like(theta)
    shx = torch.where(affine, nr[:, 2] * cfg.shear_sigma, torch.zeros_like(scale))
    shy = torch.where(affine, nr[:, 3] * cfg.shear_sigma, torch.zeros_like(scale))

    def mat(rows):
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    one, zero = torch.ones_like(scale), torch.zeros_like(scale)
    to_center = mat([[one, zero, -cx], [zero, one, -cy], [zero, zero, one]])
    back = mat([[one, zero, cx], [zero, one, cy], [zero, zero, one]])
    scale_m = mat([[reflect * (s + diff / 2), zero, zero], [zero, s - diff / 2, zero], [zero, zero, one]])
    shift = mat([[one, zero, -shift_x], [zero, one, -shift_y], [zero, zero, one]])
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = mat([[cos, sin, zero], [-sin, cos, zero], [zero, zero, one]])
    shear = mat([[one, shx, zero], [shy, one, zero], [zero, zero, one]])
    m = back @ shift @ shear @ rot @ scale_m @ to_center            # source pixel -> crop pixel
    minv = torch.linalg.inv(m)
    # exact integer maps: remove float noise so the nearest sampler cannot slip
    minv = torch.where(rnd_int[:, None, None], minv.round(), minv)
    # crop pixel -> normalised source coordinates (align_corners=False), built on the compute device
    device = sources[0].device
    norm = torch.stack([2 / ws, 2 / hs], -1)[:, :, None]                         # [k,2,1]
    offset = torch.stack([1 / ws - 1, 1 / hs - 1], -1)[:, None, None, :]
    a = (minv[:, :2, :] * norm).to(device=device, dtype=torch.float32)           # [k,2,3]
    ys, xs = torch.meshgrid(torch.arange(crop, device=device, dtype=torch.float32),
                            torch.arange(crop, device=device, dtype=torch.float32), indexing="ij")
    dst = torch.stack([xs, ys, torch.ones_like(xs)], -1)                         # [c,c,3]
    grid = torch.einsum("kij,yxj->kyxi", a, dst) + offset.to(device=device, dtype=torch.float32)
    out = torch.empty(k, 3, crop, crop, device=device, dtype=sources[0].dtype)
    for j, source in enumerate(sources):
        sel = (src_idx == j).nonzero().flatten()
        if sel.numel() == 0:
            continue
        sel_d = sel.to(device)
        g = grid.index_select(0, sel_d).to(source.dtype)
        img = source.index_select(0, sel_d)
        bic = F.grid_sample(img, g, mode="bicubic", padding_mode="reflection", align_corners=False)
        near = F.grid_sample(img, g, mode="nearest", padding_mode="reflection", align_corners=False)
        use_bic = affine[sel].to(device)[:, None, None, None]
        out[sel_d] = torch.where(use_bic, bic, near)
    return out.clamp(0, 1)


def _slope_and_std(xs: list[float], ys: list[float]) -> Optional[tuple[float, float]]:
    """Least-squares slope and its standard error, as numpy.polyfit(deg=1, cov=True) computes them
    (residual variance scaled by 1/(n - 4)); None when there are too few points."""
    if len(xs) < 5:
        return None
    (slope, _), cov = np.polyfit(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), 1, cov=True)
    return float(slope), float(math.sqrt(max(cov[0, 0], 0.0)))


class ZSSR:
    """Classic ZSSR on a batch: ``ZSSR(config)(images [N,3,H,W], seed, hook) -> ([N,3,sH,sW], report)``."""

    def __init__(self, config: Optional[ZSSRConfig] = None, **overrides):
        self.config = replace(config or ZSSRConfig(), **overrides)
        if self.config.scale not in (2, 4, 8):
            raise ValueError(f"ZSSR scale must be 2, 4 or 8 (gradual x2 steps), got {self.config.scale}")
        self.network: Optional[GroupedCNN] = None   # the trained networks of the last call (last x2 step)

    @property
    def stages(self) -> int:
        return int(round(math.log2(self.config.scale)))

    def total_steps(self) -> int:
        """Units the hook is advanced by in total (for progress bars)."""
        return self.stages * self.config.max_iters

    @_trains
    def __call__(self, images: torch.Tensor, seed: int = 0, hook: Hook = None) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        images = check_images(images, "ZSSR input").float()
        n, _, h, w = images.shape
        hook = hook or (lambda k=1: None)
        t0 = time.perf_counter()
        report = {"mode": "zssr", "faces": n, "scale": cfg.scale, "seed": int(seed),
                  "config": asdict(cfg), "stages": []}
        if min(h, w) < MIN_SIDE:
            out = images
            for _ in range(self.stages):
                out = bicubic_upscale(out, 2)
            hook(self.total_steps())
            report.update(fallback=f"bicubic: the image is smaller than {MIN_SIDE} px, too small to learn from",
                          seconds=round(time.perf_counter() - t0, 3))
            return out, report
        gens = _generators(n, seed)
        net = GroupedCNN.init(gens, cfg.depth, cfg.width, cfg.init_variance, images.device)
        adam = _Adam(net.weights)
        sources, base_scales = [images], [1.0]
        current = images
        for stage in range(self.stages):
            stage_report = self._train(net, adam, sources, base_scales, current, gens, hook)
            current = self._final_test(net, current, hook)
            sources.append(current)
            base_scales.append(base_scales[-1] * 2)
            report["stages"].append(stage_report)
        self.network = net
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return current, report

    def upscale_x2(self, images: torch.Tensor, self_ensemble: Optional[bool] = None,
                   back_projection_iters: Optional[int] = None) -> torch.Tensor:
        """Apply the networks trained by the last call (one per face, same batch size) to `images` at x2,
        optionally with other test-time settings (e.g. the network alone: no ensemble, no back-projection)."""
        if self.network is None:
            raise RuntimeError("ZSSR.upscale_x2 needs a trained network: call the ZSSR object first")
        cfg = self.config
        return self._final_test(self.network, images,
                                self_ensemble=cfg.self_ensemble if self_ensemble is None else self_ensemble,
                                bp_iters=cfg.back_projection_iters if back_projection_iters is None
                                else back_projection_iters)

    # --- training -------------------------------------------------------------------------------------
    def _train(self, net: GroupedCNN, adam: _Adam, sources, base_scales, stage_input, gens, hook) -> dict:
        cfg = self.config
        sf = 2
        n = stage_input.shape[0]
        device = stage_input.device
        h0, w0 = sources[0].shape[-2:]
        crop = max(sf, min(cfg.crop_size, h0, w0) // sf * sf)
        max_scale = base_scales[-1]
        lr = torch.full((n,), cfg.learning_rate, dtype=torch.float64)
        active = torch.ones(n, dtype=torch.bool)
        last_change = [0] * n
        lr_changes = [[] for _ in range(n)]
        test_steps: list[list[int]] = [[] for _ in range(n)]
        test_mse: list[list[float]] = [[] for _ in range(n)]
        iters = [0] * n
        final_loss = torch.full((n,), float("nan"), device=device)
        test_target = stage_input
        if cfg.test_crop:
            th, tw = (min(cfg.test_crop, d) // sf * sf or d for d in stage_input.shape[-2:])
            y0, x0 = (stage_input.shape[-2] - th) // 2, (stage_input.shape[-1] - tw) // 2
            test_target = stage_input[..., y0:y0 + th, x0:x0 + tw]
        son_full_in = resize(downscale(test_target, sf), test_target.shape[-2:])
        slope_points = max(1, cfg.lr_slope_range // cfg.run_test_every)
        it = 0
        for it in range(cfg.max_iters):
            idx_cpu = active.nonzero().flatten()
            k = idx_cpu.numel()
            rnd = torch.stack([torch.rand(6, generator=gens[i], dtype=torch.float64) for i in idx_cpu.tolist()])
            nrm = torch.stack([torch.randn(4, generator=gens[i], dtype=torch.float64) for i in idx_cpu.tolist()])
            idx = idx_cpu.to(device)
            src_k = [s.index_select(0, idx) if k < n else s for s in sources]
            fathers = _zssr_fathers(src_k, base_scales, max_scale, crop, cfg, rnd, nrm)      # [k,3,c,c]
            sons = downscale(fathers, sf)
            if cfg.noise_std > 0:
                noise = torch.stack([torch.randn(sons.shape[1:], generator=gens[i]) for i in idx_cpu.tolist()])
                sons = (sons + noise.to(device) * cfg.noise_std).clamp(0, 1)
            inputs = resize(sons, fathers.shape[-2:]).reshape(1, k * 3, crop, crop)
            target = fathers.reshape(1, k * 3, crop, crop)

            def l1(out, target=target, k=k):
                return (out - target).abs().reshape(k, -1).mean(1)

            losses = _train_step(net, adam, idx, lr[idx_cpu], inputs, l1)
            final_loss[idx] = losses                       # stays on the device: no sync per step
            for i in idx_cpu.tolist():
                iters[i] = it + 1
            # reconstruction error of the whole stage input from its own son (the policy's signal)
            if it % cfg.run_test_every == 0:
                rec = GroupedCNN.apply_full(net.select(idx), son_full_in.index_select(0, idx), cfg.tile_size)
                mse = (rec - test_target.index_select(0, idx)).pow(2).flatten(1).mean(1).tolist()
                for j, i in enumerate(idx_cpu.tolist()):
                    test_steps[i].append(it)
                    test_mse[i].append(mse[j])
            if (it + 1) % cfg.lr_policy_check_every == 0:
                for i in idx_cpu.tolist():
                    if it - last_change[i] > cfg.min_iters:
                        fit = _slope_and_std(test_steps[i][-slope_points:], test_mse[i][-slope_points:])
                        if fit is not None and -cfg.lr_change_ratio * fit[0] < fit[1]:
                            lr[i] /= 10
                            last_change[i] = it
                            lr_changes[i].append(it)
            active &= lr >= cfg.min_learning_rate
            hook(1)
            if not bool(active.any()):
                hook(cfg.max_iters - it - 1)
                break
        return {"iterations": iters, "final_l1": final_loss.tolist(), "lr_changes": lr_changes,
                "final_lr": lr.tolist(), "crop": crop,
                "reconstruction_mse": [m[-1] if m else None for m in test_mse]}

    # --- test time ------------------------------------------------------------------------------------
    def _final_test(self, net: GroupedCNN, lr_img: torch.Tensor, hook: Hook = None,
                    self_ensemble: Optional[bool] = None, bp_iters: Optional[int] = None) -> torch.Tensor:
        cfg = self.config
        self_ensemble = cfg.self_ensemble if self_ensemble is None else self_ensemble
        bp_iters = cfg.back_projection_iters if bp_iters is None else bp_iters
        sf = 2
        outputs = []
        for k in (range(8) if self_ensemble else [0]):
            x = _dihedral(lr_img, k)
            up = resize(x, (x.shape[-2] * sf, x.shape[-1] * sf))
            y = _dihedral_inv(GroupedCNN.apply_full(net.weights, up, cfg.tile_size), k)
            outputs.append(back_projection(y, lr_img, bp_iters))
            if hook is not None:
                hook(0)
        if len(outputs) == 1:
            return outputs[0]
        stacked = torch.stack(outputs).sort(0).values
        median = (stacked[3] + stacked[4]) / 2       # numpy's median of 8 (the mean of the middle two)
        return back_projection(median, lr_img, bp_iters)


def zssr_upscale(images: torch.Tensor, scale: int = 2, *, seed: int = 0, hook: Hook = None,
                 config: Optional[ZSSRConfig] = None, **overrides) -> tuple[torch.Tensor, dict]:
    """Classic ZSSR x2/x4 of a batch [N,3,H,W] in [0,1] -> ([N,3,H*scale,W*scale], report)."""
    return ZSSR(config, scale=scale, **overrides)(images, seed=seed, hook=hook)


# ----------------------------------------------------------------------------------------------------------
# NTIRE 2025 AIIA per-image tuning

def _loss_name(fn) -> str:
    return str(getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__)


class NTIRETune:
    """IQA-guided same-size refinement: ``NTIRETune(config, quality_losses, score_fn, id_similarity)(images,
    seed, hook) -> (images, report)``.

    quality_losses: [(weight, fn)], fn(images [M,3,h,w]) -> [M] loss per image (e.g. 1 - CLIP-IQA), added to
        ``l1_weight * L1``; none -> L1 only (the report says so).
    score_fn(images [N,3,H,W]) -> [N], higher is better: validation score (default: minus the L1 distance of
        the whole-image output to the input, i.e. the identity pair at full size).
    id_similarity(a, b) -> [N] cosine: candidates below ``id_threshold`` are rejected.
    Fallback: a face with no accepted candidate (all rejected by the ID guard) is returned unchanged.
    """

    def __init__(self, config: Optional[NTIREConfig] = None, quality_losses: Optional[Sequence] = None,
                 score_fn: Optional[Callable] = None, id_similarity: Optional[Callable] = None, **overrides):
        self.config = replace(config or NTIREConfig(), **overrides)
        self.quality_losses = [(float(wt), fn) for wt, fn in (quality_losses or []) if float(wt) != 0.0]
        self.score_fn = score_fn
        self.id_similarity = id_similarity

    def total_steps(self) -> int:
        return self.config.steps

    def losses_used(self) -> str:
        if not self.quality_losses:
            return "L1 only"
        return " + ".join([f"{self.config.l1_weight:g} x L1"] +
                          [f"{wt:g} x {_loss_name(fn)}" for wt, fn in self.quality_losses])

    def _copies(self, images: torch.Tensor, crop: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        h, w = images.shape[-2:]
        short = min(h, w)
        max_scale = max(1.0, min(5.0, short / 128.0))
        scales = np.linspace(1.0 / max_scale, 1.0, self.config.num_scales + 1)[1:]
        copies = []
        for s in scales:
            size = (max(crop, round(h * s)), max(crop, round(w * s)))
            copies.append(resize(images, size).clamp(0, 1))
        p = torch.tensor(scales, dtype=torch.float64) ** 2
        return copies, p / p.sum()

    def _crops(self, copies, probs, crop, gens, device) -> torch.Tensor:
        """[n, B, 3, crop, crop] identity-pair crops, each face from its own generator."""
        cfg = self.config
        n, b = len(gens), cfg.batch_size
        cum = probs.cumsum(0)
        u = torch.stack([torch.rand(b, 6, generator=g, dtype=torch.float64) for g in gens])     # [n,b,6]
        which = (u[..., 0:1] > cum[:-1]).sum(-1)                                                 # [n,b]
        out = torch.empty(n, b, 3, crop, crop, device=device, dtype=copies[0].dtype)
        ar = torch.arange(crop)
        for j, cp in enumerate(copies):                       # a loop over the (6) scales, not the faces
            sel = (which == j).nonzero()
            if sel.numel() == 0:
                continue
            f, s = sel[:, 0], sel[:, 1]
            hh, ww = cp.shape[-2:]
            y0 = torch.floor(u[f, s, 1] * (hh - crop + 1)).long().clamp(max=hh - crop)
            x0 = torch.floor(u[f, s, 2] * (ww - crop + 1)).long().clamp(max=ww - crop)
            rows = (y0[:, None] + ar[None]).to(device)
            cols = (x0[:, None] + ar[None]).to(device)
            fd = f.to(device)
            patch = cp[fd[:, None, None], :, rows[:, :, None], cols[:, None, :]]            # [m,c,c,3]
            out[fd, s.to(device)] = patch.permute(0, 3, 1, 2)
        # RandomRotate90 (p 0.5, k uniform in 0..3) and HorizontalFlip (p 0.5), as albumentations draws them
        rot = torch.where(u[..., 3] < 0.5, torch.floor(u[..., 4] * 4).long().clamp(max=3), 0).to(device)
        flip = (u[..., 5] < 0.5).to(device)
        res = out
        for r in (1, 2, 3):
            res = torch.where((rot == r)[..., None, None, None], torch.rot90(out, r, dims=(-2, -1)), res)
        return torch.where(flip[..., None, None, None], res.flip(-1), res)

    @_trains
    def __call__(self, images: torch.Tensor, seed: int = 0, hook: Hook = None) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        images = check_images(images, "per-image tune input").float()
        n, _, h, w = images.shape
        device = images.device
        hook = hook or (lambda k=1: None)
        t0 = time.perf_counter()
        report = {"mode": "ntire_tune", "faces": n, "seed": int(seed), "losses": self.losses_used(),
                  "score": _loss_name(self.score_fn) if self.score_fn else "-L1(output, input)",
                  "id_guard": (f"{_loss_name(self.id_similarity)} >= {cfg.id_threshold:g}"
                               if self.id_similarity else "off"),
                  "config": asdict(cfg)}
        if min(h, w) < MIN_SIDE:
            hook(cfg.steps)
            report.update(fallback=f"input unchanged: smaller than {MIN_SIDE} px", steps_run=0,
                          best_step=[None] * n, seconds=round(time.perf_counter() - t0, 3))
            return images, report
        crop = min(cfg.crop_size, h, w)
        gens = _generators(n, seed)
        net = GroupedCNN.init(gens, cfg.depth, cfg.width, cfg.init_variance, device)
        adam = _Adam(net.weights)
        copies, probs = self._copies(images, crop)
        idx = torch.arange(n, device=device)
        best = images.clone()
        best_score = torch.full((n,), -math.inf, dtype=torch.float64)
        best_step: list[Optional[int]] = [None] * n
        rejected = [0] * n
        history = []
        last_l1 = None
        steps = max(0, int(cfg.steps))
        interval = max(1, int(cfg.validation_interval))
        for step in range(1, steps + 1):
            # cosine annealing (eta_min = lr * final_lr_ratio), lr of the step about to be taken
            frac = (step - 1) / max(1, steps)
            eta_min = cfg.learning_rate * cfg.final_lr_ratio
            cur_lr = eta_min + (cfg.learning_rate - eta_min) * (1 + math.cos(math.pi * frac)) / 2
            crops = self._crops(copies, probs, crop, gens, device)                    # [n,B,3,c,c]
            inputs = _faces_to_batch(crops)
            parts: dict = {}

            def loss_fn(out, crops=crops, parts=parts):
                o = _batch_to_faces(out, n)                                           # [n,B,3,c,c]
                l1 = (o - crops).abs().flatten(1).mean(1)
                parts["l1"] = l1.detach()
                total = cfg.l1_weight * l1
                if self.quality_losses:
                    flat = o.clamp(0, 1).reshape(-1, *o.shape[2:])
                    for wt, fn in self.quality_losses:
                        total = total + wt * fn(flat).reshape(n, -1).mean(1)
                return total

            losses = _train_step(net, adam, idx, torch.full((n,), cur_lr, dtype=torch.float64), inputs, loss_fn)
            last_l1 = parts["l1"]
            hook(1)
            if step % interval == 0 or step == steps:
                out = GroupedCNN.apply_full(net.weights, images, cfg.tile_size)
                with torch.no_grad():
                    score = (self.score_fn(out) if self.score_fn else
                             -(out - images).abs().flatten(1).mean(1)).detach().double().cpu().reshape(n)
                    if self.id_similarity is not None:
                        sim = self.id_similarity(out, images).detach().double().cpu().reshape(n)
                        ok = sim >= cfg.id_threshold
                    else:
                        sim, ok = None, torch.ones(n, dtype=torch.bool)
                better = ok & (score > best_score)
                if bool(better.any()):
                    sel = better.nonzero().flatten()
                    best[sel.to(device)] = out[sel.to(device)]
                    best_score[sel] = score[sel]
                    for i in sel.tolist():
                        best_step[i] = step
                for i in (~ok).nonzero().flatten().tolist():
                    rejected[i] += 1
                history.append({"step": step, "loss": losses.tolist(), "score": score.tolist(),
                                **({"id_similarity": sim.tolist()} if sim is not None else {}),
                                "accepted": ok.tolist()})
                hook(0)
        report.update(
            steps_run=steps, best_step=best_step,
            best_score=[None if not math.isfinite(s) else s for s in best_score.tolist()],
            rejected_validations=rejected, validations=history,
            final_l1=last_l1.tolist() if last_l1 is not None else None,
            fallback=[None if b is not None else
                      ("input unchanged: every candidate was rejected by the ID guard" if rejected[i] else
                       "input unchanged: no validation ran (0 steps)") for i, b in enumerate(best_step)],
            seconds=round(time.perf_counter() - t0, 3))
        return best, report


def ntire_tune(images: torch.Tensor, *, seed: int = 0, hook: Hook = None, config: Optional[NTIREConfig] = None,
               quality_losses: Optional[Sequence] = None, score_fn: Optional[Callable] = None,
               id_similarity: Optional[Callable] = None, **overrides) -> tuple[torch.Tensor, dict]:
    """NTIRE AIIA per-image tuning of a batch [N,3,H,W] in [0,1] -> (same-size images, report)."""
    return NTIRETune(config, quality_losses, score_fn, id_similarity, **overrides)(images, seed=seed, hook=hook)
