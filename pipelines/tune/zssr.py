"""Per-image tuning, classic mode:

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

Faces are tuned in groups (one grouped network per group, tune/engine.py): ``faces_per_group`` 0 sizes the
groups from the memory free on the device and the per-face cost of this configuration (tune/memory.py); a number
forces it. Every face draws from its own random stream, so the result does not depend on the grouping.

The grouped training engine (batching, seeds, interruption) is tune/engine.py.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..io.images import check_images
from .engine import (MIN_SIDE, GroupedCNN, Hook, _Adam, _dihedral, _dihedral_inv, _generators, _train_step,
                     _trains, back_projection, bicubic_upscale, downscale, merge_face_lists, offer_preview, resize,
                     run_in_groups)
from .memory import FaceCost, GroupPlan, cached_plan, zssr_face_cost

log = logging.getLogger("facemend")


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
    faces_per_group: int = 0             # faces tuned at once (one grouped network); 0 = as many as fit in memory

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


# ----------------------------------------------------------------------------------------------------------
# ZSSR

GEOMETRY_COLUMNS = 10   # per father: the 2x3 map (6), its offset (2), source index, bicubic flag


def _zssr_father_geometry(sizes: list[tuple[int, int]], base_scales: list[float], max_scale: float, crop: int,
                          cfg: ZSSRConfig, rnd: torch.Tensor, nrm: torch.Tensor) -> torch.Tensor:
    """The sampling maps of random augmented HR fathers, as ZSSR's random_augment: 3x3 transform = shift_back .
    shift . shear . rotation . scale . shift_to_center, sampled with bicubic (affine) or exactly (integer
    shifts and 90-degree rotations). From per-father random numbers rnd [m, 6] (uniform) and nrm [m, 4]
    (normal) and the sources' sizes (h, w), in float64 on the host; every row is computed on its own, so a
    block of steps' fathers is computed at once. Returns float32 [m, GEOMETRY_COLUMNS]: crop pixel ->
    normalised source coordinates (2x3 matrix, then the offset), the source's index and 1.0 where bicubic."""
    k = rnd.shape[0]
    h0, w0 = sizes[0]
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
    hs = torch.tensor([s[0] for s in sizes], dtype=dt)[src_idx]
    ws = torch.tensor([s[1] for s in sizes], dtype=dt)[src_idx]
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
    # crop pixel -> normalised source coordinates (align_corners=False)
    norm = torch.stack([2 / ws, 2 / hs], -1)[:, :, None]                         # [k,2,1]
    offset = torch.stack([1 / ws - 1, 1 / hs - 1], -1)                           # [k,2]
    a = (minv[:, :2, :] * norm).to(torch.float32)                                # [k,2,3]
    return torch.cat([a.reshape(k, 6), offset.to(torch.float32), src_idx[:, None].to(torch.float32),
                      affine[:, None].to(torch.float32)], 1)


def _zssr_fathers(sources: list[torch.Tensor], geometry: torch.Tensor, crop: int) -> torch.Tensor:
    """HR fathers [k, 3, crop, crop] for the k faces of `sources[j]` ([k,3,Hj,Wj]) from their geometry rows
    ([k, GEOMETRY_COLUMNS], on the device): no host work, no synchronisation. Out-of-image samples reflect. Each
    source is sampled for every face and the face's own source selected (there are at most 3 sources)."""
    k = geometry.shape[0]
    device = sources[0].device
    a = geometry[:, :6].reshape(k, 2, 3).contiguous()
    offset = geometry[:, None, None, 6:8]
    src_idx = geometry[:, 8]
    use_bic = (geometry[:, 9] > 0.5)[:, None, None, None]
    ys, xs = torch.meshgrid(torch.arange(crop, device=device, dtype=torch.float32),
                            torch.arange(crop, device=device, dtype=torch.float32), indexing="ij")
    dst = torch.stack([xs, ys, torch.ones_like(xs)], -1)                         # [c,c,3]
    # contiguous as before (grid_sample's vectorised CPU path, bit for bit the same fathers)
    grid = (torch.einsum("kij,yxj->kyxi", a, dst) + offset).contiguous()
    out = None
    for j, source in enumerate(sources):
        g = grid.to(source.dtype)
        bic = F.grid_sample(source, g, mode="bicubic", padding_mode="reflection", align_corners=False)
        near = F.grid_sample(source, g, mode="nearest", padding_mode="reflection", align_corners=False)
        sampled = torch.where(use_bic, bic, near)
        out = sampled if len(sources) == 1 else (
            torch.where((src_idx == j)[:, None, None, None], sampled, out) if out is not None else sampled)
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
        self._slices: list[slice] = []               # the last call's groups
        self._plan: Optional[tuple] = None

    @property
    def stages(self) -> int:
        return int(round(math.log2(self.config.scale)))

    def total_steps(self, images: Optional[torch.Tensor] = None) -> int:
        """Units the hook is advanced by in total (for progress bars): per group of faces, or for the whole call
        on `images` (its groups one after the other)."""
        per_group = self.stages * self.config.max_iters
        return per_group if images is None else per_group * self.plan(images).groups

    def face_cost(self, h: int, w: int, device: Optional[torch.device] = None) -> FaceCost:
        """Memory one h x w face costs while it is tuned (tune/memory.py; the same count on every `device`)."""
        return zssr_face_cost(self.config, h, w)

    def plan(self, images: torch.Tensor) -> GroupPlan:
        """How the faces of `images` [N,3,H,W] are grouped (tune/memory.py cached_plan)."""
        return cached_plan(self, images, "ZSSR", f"smaller than {MIN_SIDE} px: bicubic",
                           "Lower crop_size or tile_size, turn the self-ensemble off, or free memory.")

    @_trains
    def __call__(self, images: torch.Tensor, seed: int = 0, hook: Hook = None) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        images = check_images(images, "ZSSR input").float()
        n, _, h, w = images.shape
        hook = hook or (lambda k=1: None)
        t0 = time.perf_counter()
        report = {"mode": "zssr", "faces": n, "scale": cfg.scale, "seed": int(seed),
                  "config": asdict(cfg), "stages": []}
        plan = self.plan(images)
        self._plan = None                       # used: the next call asks the device again
        if min(h, w) < MIN_SIDE:
            out = images
            for _ in range(self.stages):
                out = bicubic_upscale(out, 2)
            hook(self.total_steps() * plan.groups)
            report.update(fallback=f"bicubic: the image is smaller than {MIN_SIDE} px, too small to learn from",
                          seconds=round(time.perf_counter() - t0, 3))
            return out, report
        log.info(plan.line())
        report["groups"] = plan.as_dict()
        out = images.new_empty((n, 3, h * cfg.scale, w * cfg.scale))

        def group(faces: slice):
            res, net, stage_reports = self._tune_group(images[faces], seed, hook)
            out[faces] = res
            return net, stage_reports

        done, notes = run_in_groups(n, plan.faces_per_group, group, plan.source == "automatic", "ZSSR")
        for note in notes:
            log.warning(note)
        if notes:
            report["groups"]["out_of_memory_retries"] = notes
        nets = [net for _, (net, _) in done]
        report["stages"] = [merge_face_lists([reps[s] for _, (_, reps) in done]) for s in range(self.stages)]
        self.network = nets[0] if len(nets) == 1 else GroupedCNN(
            [torch.cat([net.weights[i] for net in nets]) for i in range(len(nets[0].weights))])
        self._slices = [faces for faces, _ in done]
        report["seconds"] = round(time.perf_counter() - t0, 3)
        return out, report

    def _tune_group(self, images: torch.Tensor, seed: int, hook) -> tuple[torch.Tensor, GroupedCNN, list]:
        """All stages for one group of faces: (output, trained networks of the last x2 step, stage reports)."""
        cfg = self.config
        gens = _generators(images.shape[0], seed)
        net = GroupedCNN.init(gens, cfg.depth, cfg.width, cfg.init_variance, images.device)
        adam = _Adam(net.weights)
        sources, base_scales = [images], [1.0]
        current = images
        stage_reports = []
        for stage in range(self.stages):
            stage_reports.append(self._train(net, adam, sources, base_scales, current, gens, hook))
            current = self._final_test(net, current, hook)
            offer_preview(hook, lambda current=current: current)
            sources.append(current)
            base_scales.append(base_scales[-1] * 2)
        return current, net, stage_reports

    def upscale_x2(self, images: torch.Tensor, self_ensemble: Optional[bool] = None,
                   back_projection_iters: Optional[int] = None) -> torch.Tensor:
        """Apply the networks trained by the last call (one per face, same batch size) to `images` at x2,
        optionally with other test-time settings (e.g. the network alone: no ensemble, no back-projection);
        in the last call's groups."""
        if self.network is None:
            raise RuntimeError("ZSSR.upscale_x2 needs a trained network: call the ZSSR object first")
        if images.shape[0] != self.network.n:
            raise ValueError(f"ZSSR.upscale_x2: {images.shape[0]} images for {self.network.n} trained networks")
        cfg = self.config
        self_ensemble = cfg.self_ensemble if self_ensemble is None else self_ensemble
        bp_iters = cfg.back_projection_iters if back_projection_iters is None else back_projection_iters
        parts = []
        for sl in self._slices:
            idx = torch.arange(sl.start, sl.stop, device=images.device)
            parts.append(self._final_test(GroupedCNN(self.network.select(idx)), images[sl],
                                          self_ensemble=self_ensemble, bp_iters=bp_iters))
        return torch.cat(parts)

    # --- training -------------------------------------------------------------------------------------
    def _train(self, net: GroupedCNN, adam: _Adam, sources, base_scales, stage_input, gens, hook) -> dict:
        cfg = self.config
        sf = 2
        n = stage_input.shape[0]
        device = stage_input.device
        h0, w0 = sources[0].shape[-2:]
        crop = max(sf, min(cfg.crop_size, h0, w0) // sf * sf)
        max_scale = base_scales[-1]
        # The policy's state (learning rates, active faces) lives on the host, where its decisions are taken;
        # the device holds copies, refreshed only when the policy changes something (at its checks).
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
        check = max(1, cfg.lr_policy_check_every)
        sizes = [tuple(s.shape[-2:]) for s in sources]
        son = max(1, math.ceil(crop / sf))
        it, block, block_start = 0, None, 0
        for it in range(cfg.max_iters):
            if block is None or it - block_start == block[0].shape[0]:
                # The active faces change only at the policy's checks: draw the random numbers of the steps up
                # to the next check at once (each face's generator in the order the per-step draws took), build
                # the fathers' sampling maps on the host, and move them (and the noise, the indices and the
                # learning rates) to the device in one go.
                idx_cpu = active.nonzero().flatten()
                k = idx_cpu.numel()
                steps = 1 if cfg.learning_rate < cfg.min_learning_rate else \
                    min(cfg.max_iters, (it // check + 1) * check) - it
                block = self._draw_block(gens, idx_cpu.tolist(), steps,
                                         (3, son, son) if cfg.noise_std > 0 else None)
                geometry = _zssr_father_geometry(sizes, base_scales, max_scale, crop, cfg,
                                                 block[0].flatten(0, 1), block[1].flatten(0, 1))
                block = (geometry.view(steps, k, -1).to(device),
                         None if block[2] is None else block[2].to(device))
                block_start = it
                idx = idx_cpu.to(device)
                lr_k = lr[idx_cpu].to(device)
                src_k = [s.index_select(0, idx) if k < n else s for s in sources]
            step = it - block_start
            fathers = _zssr_fathers(src_k, block[0][step], crop)                              # [k,3,c,c]
            sons = downscale(fathers, sf)
            if cfg.noise_std > 0:
                sons = (sons + block[1][step] * cfg.noise_std).clamp(0, 1)
            inputs = resize(sons, fathers.shape[-2:]).reshape(1, k * 3, crop, crop)
            target = fathers.reshape(1, k * 3, crop, crop)

            def l1(out, target=target, k=k):
                return (out - target).abs().reshape(k, -1).mean(1)

            losses = _train_step(net, adam, idx, lr_k, inputs, l1)
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
                offer_preview(hook, lambda rec=rec: rec)  # the network's reconstruction of the stage input
            if (it + 1) % cfg.lr_policy_check_every == 0:
                for i in idx_cpu.tolist():
                    if it - last_change[i] > cfg.min_iters:
                        fit = _slope_and_std(test_steps[i][-slope_points:], test_mse[i][-slope_points:])
                        if fit is not None and -cfg.lr_change_ratio * fit[0] < fit[1]:
                            lr[i] /= 10
                            last_change[i] = it
                            lr_changes[i].append(it)
                            block = None        # new learning rates (and maybe fewer faces) for the device
            active &= lr >= cfg.min_learning_rate
            hook(1)
            if not bool(active.any()):
                hook(cfg.max_iters - it - 1)
                break
        return {"iterations": iters, "final_l1": final_loss.tolist(), "lr_changes": lr_changes,
                "final_lr": lr.tolist(), "crop": crop,
                "reconstruction_mse": [m[-1] if m else None for m in test_mse]}

    @staticmethod
    def _draw_block(gens, faces: list, steps: int, noise_shape) -> tuple:
        """The random numbers of `steps` training steps for `faces`, drawn from each face's generator in the
        order the per-step draws take (uniform [6], normal [4], then the sons' noise map): rnd [steps,k,6],
        nrm [steps,k,4] (float64), noise [steps,k,*noise_shape] or None. The same calls as one step at a time
        (normal draws of 16+ values take another path than shorter ones, so the sizes must not be merged)."""
        cfg_noise = noise_shape is not None
        rnd = torch.empty(steps, len(faces), 6, dtype=torch.float64)
        nrm = torch.empty(steps, len(faces), 4, dtype=torch.float64)
        noise = None
        for j, i in enumerate(faces):
            g = gens[i]
            for s in range(steps):
                rnd[s, j] = torch.rand(6, generator=g, dtype=torch.float64)
                nrm[s, j] = torch.randn(4, generator=g, dtype=torch.float64)
                if cfg_noise:
                    if noise is None:
                        noise = torch.empty(steps, len(faces), *noise_shape)
                    noise[s, j] = torch.randn(noise_shape, generator=g)
        return rnd, nrm, noise

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
        del x, up, y                                  # the last transform's tensors: not needed for the median
        stacked = torch.stack(outputs)
        outputs.clear()                               # the stack holds them: free the list before sorting
        stacked = stacked.sort(0).values
        median = (stacked[3] + stacked[4]) / 2       # numpy's median of 8 (the mean of the middle two)
        return back_projection(median, lr_img, bp_iters)


def zssr_upscale(images: torch.Tensor, scale: int = 2, *, seed: int = 0, hook: Hook = None,
                 config: Optional[ZSSRConfig] = None, **overrides) -> tuple[torch.Tensor, dict]:
    """Classic ZSSR x2/x4 of a batch [N,3,H,W] in [0,1] -> ([N,3,H*scale,W*scale], report)."""
    return ZSSR(config, scale=scale, **overrides)(images, seed=seed, hook=hook)
