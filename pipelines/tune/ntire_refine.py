"""Per-image tuning, NTIRE mode:

* ``ntire_tune`` -- the "ZSSR" stage of the NTIRE 2025 AIIA entry (methods.md 4.2): the same residual CNN at
  scale 1, trained on identity pairs cut from the image's multi-scale copies (6 copies at
  linspace(1/max_scale, 1, 7)[1:], max_scale = min(5, short side / 128), picked with probability ~ scale^2;
  random crops, rot90 with p 0.5, horizontal flip with p 0.5; ``batch_size`` crops per step), loss
  ``l1_weight * L1 + sum(weight * fn(output))`` over the caller's NR-IQA loss terms, Adam with cosine decay to
  lr/1000, validation on the whole image every ``validation_interval`` steps keeping the best-scoring output
  per face, and an ID guard that rejects candidates whose identity similarity to the input is below
  ``id_threshold``. (AIIA used a GroupNorm/SiLU ResNet with a tanh output; the pack uses the plain ZSSR CNN
  with a residual over the input, so that with L1 only the network starts at -- and stays near -- identity.)

Faces are tuned in groups as ZSSR's (``faces_per_group``, 0 = from the free memory; tune/memory.py).

The grouped training engine (batching, seeds, interruption) is tune/engine.py.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..io.images import check_images
from .engine import (MIN_SIDE, GroupedCNN, Hook, _Adam, _batch_to_faces, _faces_to_batch, _generators, _train_step,
                     _trains, merge_face_lists, offer_preview, resize, run_in_groups)
from .memory import FaceCost, GroupPlan, cached_plan, cuda_peak_bytes, ntire_face_cost

log = logging.getLogger("facemend")

# (weight, fn): fn(images [M,3,h,w] in [0,1]) -> [M] loss per image (differentiable), e.g. 1 - CLIP-IQA.
QualityLoss = tuple


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
    faces_per_group: int = 0             # faces tuned at once (one grouped network); 0 = as many as fit in memory


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
        self._plan: Optional[tuple] = None

    def total_steps(self, images: Optional[torch.Tensor] = None) -> int:
        """Units the hook is advanced by in total: per group of faces, or for the whole call on `images`."""
        return self.config.steps if images is None else self.config.steps * self.plan(images).groups

    def face_cost(self, h: int, w: int, device: Optional[torch.device] = None, measure=None) -> FaceCost:
        """Memory one h x w face costs while it is tuned (tune/memory.py). The NR-IQA losses, the score and the
        ID model are other networks: on a CUDA `device` their cost for one face is measured (one loss step with
        backward on the face's crops, one validation: `measure(fn, device)` -> peak bytes, default the CUDA
        allocator's peak) and added; elsewhere it is not included, and the plan says so."""
        cost = ntire_face_cost(self.config, h, w)
        device = torch.device(device) if device is not None else None
        if not (self.quality_losses or self.score_fn or self.id_similarity):
            return cost
        if measure is None and (device is None or device.type != "cuda"):
            cost.note = "NR-IQA/ID networks not included: measured on CUDA only"
            return cost
        measure = measure or cuda_peak_bytes
        cfg = self.config
        crop = min(cfg.crop_size, h, w)
        g = torch.Generator().manual_seed(0)

        def loss_step():  # the gradient reaches the crops only, as in training (no .grad left on the metrics)
            x = torch.rand(cfg.batch_size, 3, crop, crop, generator=g).to(device).requires_grad_(True)
            torch.autograd.grad(sum(wt * fn(x).sum() for wt, fn in self.quality_losses), x)

        def validation():
            x = torch.rand(1, 3, h, w, generator=g).to(device)
            with torch.no_grad():
                if self.score_fn is not None:
                    self.score_fn(x)
                if self.id_similarity is not None:
                    self.id_similarity(x, x)

        with torch.inference_mode(False), torch.enable_grad():
            extra = {"train step": measure(loss_step, device) if self.quality_losses else 0,
                     "validation": measure(validation, device)}
        return cost.plus(extra, "NR-IQA/ID networks measured")

    def plan(self, images: torch.Tensor) -> GroupPlan:
        """How the faces of `images` are grouped (tune/memory.py cached_plan)."""
        return cached_plan(self, images, "NTIRE tune", f"smaller than {MIN_SIDE} px: unchanged",
                           "Lower crop_size or the batch size, or free memory.")

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

    def _crop_plan(self, copies, probs, crop, gens, steps: int, device) -> torch.Tensor:
        """The crops of `steps` training steps, drawn at once: each face's generator gives rand(B, 6) per step,
        in step order (the same calls as one step at a time); the scale, the corner in every scale's copy, the
        rotation and the flip of each crop are worked out on the host and moved to the device in one copy:
        long [steps, n, B, 3 + 2 * scales] = (scale, rotation, flip, y0 per scale, x0 per scale)."""
        cfg = self.config
        n, b = len(gens), cfg.batch_size
        cum = probs.cumsum(0)
        u = torch.empty(steps, n, b, 6, dtype=torch.float64)
        for f, g in enumerate(gens):
            for s in range(steps):
                u[s, f] = torch.rand(b, 6, generator=g, dtype=torch.float64)
        which = (u[..., 0:1] > cum[:-1]).sum(-1)                                                 # [S,n,b]
        # RandomRotate90 (p 0.5, k uniform in 0..3) and HorizontalFlip (p 0.5), as albumentations draws them
        rot = torch.where(u[..., 3] < 0.5, torch.floor(u[..., 4] * 4).long().clamp(max=3), 0)
        flip = (u[..., 5] < 0.5).long()
        corners = []
        for cp in copies:
            hh, ww = cp.shape[-2:]
            corners.append(torch.floor(u[..., 1] * (hh - crop + 1)).long().clamp(max=hh - crop))
        for cp in copies:
            hh, ww = cp.shape[-2:]
            corners.append(torch.floor(u[..., 2] * (ww - crop + 1)).long().clamp(max=ww - crop))
        return torch.stack([which, rot, flip] + corners, -1).to(device)

    @staticmethod
    def _crops(copies, plan: torch.Tensor, crop: int) -> torch.Tensor:
        """[n, B, 3, crop, crop] identity-pair crops of one step from its plan rows ([n, B, 3 + 2 * scales], on
        the device): every scale's copy is cut at every crop's corner and the crop's own scale kept (no host
        work, no synchronisation; the scales are few and the crops small)."""
        n, b = plan.shape[:2]
        j_count = len(copies)
        ar = torch.arange(crop, device=plan.device)
        faces = torch.arange(n, device=plan.device)[:, None, None, None]
        out = None
        for j, cp in enumerate(copies):                       # a loop over the (6) scales, not the faces
            rows = plan[..., 3 + j, None] + ar                                                     # [n,b,c]
            cols = plan[..., 3 + j_count + j, None] + ar
            patch = cp[faces, :, rows[..., :, None], cols[..., None, :]].permute(0, 1, 4, 2, 3)  # [n,b,3,c,c]
            out = patch if out is None else torch.where((plan[..., 0] == j)[..., None, None, None], patch, out)
        rot, flip = plan[..., 1], plan[..., 2] > 0
        res = out
        for r in (1, 2, 3):
            res = torch.where((rot == r)[..., None, None, None], torch.rot90(out, r, dims=(-2, -1)), res)
        return torch.where(flip[..., None, None, None], res.flip(-1), res)

    @_trains
    def __call__(self, images: torch.Tensor, seed: int = 0, hook: Hook = None) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        images = check_images(images, "per-image tune input").float()
        n, _, h, w = images.shape
        hook = hook or (lambda k=1: None)
        t0 = time.perf_counter()
        report = {"mode": "ntire_tune", "faces": n, "seed": int(seed), "losses": self.losses_used(),
                  "score": _loss_name(self.score_fn) if self.score_fn else "-L1(output, input)",
                  "id_guard": (f"{_loss_name(self.id_similarity)} >= {cfg.id_threshold:g}"
                               if self.id_similarity else "off"),
                  "config": asdict(cfg)}
        plan = self.plan(images)
        self._plan = None                       # used: the next call asks the device again
        if min(h, w) < MIN_SIDE:
            hook(cfg.steps * plan.groups)
            report.update(fallback=f"input unchanged: smaller than {MIN_SIDE} px", steps_run=0,
                          best_step=[None] * n, seconds=round(time.perf_counter() - t0, 3))
            return images, report
        log.info(plan.line())
        report["groups"] = plan.as_dict()
        best = torch.empty_like(images)

        def group(faces: slice):
            best[faces], part = self._tune_group(images[faces], seed, hook)
            return part

        done, notes = run_in_groups(n, plan.faces_per_group, group, plan.source == "automatic", "NTIRE tune")
        for note in notes:
            log.warning(note)
        if notes:
            report["groups"]["out_of_memory_retries"] = notes
        report.update(merge_face_lists([part for _, part in done]), seconds=round(time.perf_counter() - t0, 3))
        return best, report

    def _tune_group(self, images: torch.Tensor, seed: int, hook) -> tuple[torch.Tensor, dict]:
        """One group of faces: (best validated outputs, the per-face report entries)."""
        cfg = self.config
        n, _, h, w = images.shape
        device = images.device
        crop = min(cfg.crop_size, h, w)
        gens = _generators(n, seed)
        net = GroupedCNN.init(gens, cfg.depth, cfg.width, cfg.init_variance, device)
        adam = _Adam(net.weights)
        copies, probs = self._copies(images, crop)
        idx = torch.arange(n, device=device)
        plan, plan_start = None, 1
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
            if plan is None or step - plan_start == plan.shape[0]:
                # the random crops of the steps up to the next validation, drawn and moved at once
                plan_start = step
                plan = self._crop_plan(copies, probs, crop, gens, min(interval - (step - 1) % interval,
                                                                      steps - step + 1), device)
            crops = self._crops(copies, plan[step - plan_start], crop)                # [n,B,3,c,c]
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

            lr = torch.full((n,), cur_lr, dtype=torch.float64, device=device)    # a fill on the device, no copy
            losses = _train_step(net, adam, idx, lr, inputs, loss_fn)
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
                offer_preview(hook, lambda: best)  # the best validated output so far
                hook(0)
        return best, dict(
            steps_run=steps, best_step=best_step,
            best_score=[None if not math.isfinite(s) else s for s in best_score.tolist()],
            rejected_validations=rejected, validations=history,
            final_l1=last_l1.tolist() if last_l1 is not None else None,
            fallback=[None if b is not None else
                      ("input unchanged: every candidate was rejected by the ID guard" if rejected[i] else
                       "input unchanged: no validation ran (0 steps)") for i, b in enumerate(best_step)])


def ntire_tune(images: torch.Tensor, *, seed: int = 0, hook: Hook = None, config: Optional[NTIREConfig] = None,
               quality_losses: Optional[Sequence] = None, score_fn: Optional[Callable] = None,
               id_similarity: Optional[Callable] = None, **overrides) -> tuple[torch.Tensor, dict]:
    """NTIRE AIIA per-image tuning of a batch [N,3,H,W] in [0,1] -> (same-size images, report)."""
    return NTIRETune(config, quality_losses, score_fn, id_similarity, **overrides)(images, seed=seed, hook=hook)
