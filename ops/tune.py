"""Per-image tuning (classic ZSSR or the NTIRE 2025 AIIA IQA-guided refinement): what the node
FaceMend_PerImageTune computes, and the metric/ID adapters the CLI's ntire_full preset shares with it."""
from __future__ import annotations

import json

import torch

from ..host import device as dev
from ..host import models as hm
from ..pipelines.tune import MODES
from ..pipelines.tune.engine import MIN_SIDE
from .common import bchw_to_image, empty_faces, image_to_bchw, no_faces

ZSSR_SCALES = (2, 4)


class _PreviewHook:
    """dev.step_hook with a live preview: pipelines call hook(n) after each step (interruption + progress) and,
    at validation points, preview(images) when wants_preview() (pipelines/tune/engine.py offer_preview)."""

    def __init__(self, progress: dev.Progress):
        self.progress = progress

    def __call__(self, n: int = 1) -> None:
        dev.check_interrupt()
        self.progress.update(n)

    def wants_preview(self) -> bool:
        return self.progress.wants_preview()

    def preview(self, images: torch.Tensor) -> None:
        self.progress.update(0, preview=images)


def preview_hook(progress: dev.Progress) -> _PreviewHook:
    return _PreviewHook(progress)


def refused_scale(mode: str, scale) -> str | None:
    """Why (mode, scale) cannot run, or None: zssr upscales by 2 or 4 only (x4 = two x2 steps)."""
    if mode == "zssr" and int(scale) not in ZSSR_SCALES:
        return f"zssr scale must be 2 or 4, got {scale}"
    return None


def per_image_tune(image, mode="zssr", scale=2, steps=0, learning_rate=0.001, seed=0, crop_size=128,
                   validation_interval=100, l1_weight=1.0, clipiqa_weight=0.1, maniqa_weight=0.1, id_threshold=0.6,
                   back_projection_iters=10, self_ensemble=True, clipiqa=None, maniqa=None, id_model=None):
    """(tuned IMAGE, report JSON); an empty batch passes through. Hosted, the node shows the current output at
    validation points (ntire_tune: the best validated output; zssr: the network's reconstruction)."""
    from ..pipelines.tune.ntire_refine import NTIREConfig, NTIRETune
    from ..pipelines.tune.zssr import ZSSR, ZSSRConfig

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if no_faces(image):  # Detect + Align found no face: nothing to tune
        return (empty_faces(image, int(scale) if mode == "zssr" else 1),
                json.dumps({"mode": mode, "faces": 0, "note": "no faces: nothing was tuned"}))
    device = dev.compute_device()
    x = image_to_bchw(image, device)
    if mode == "zssr":
        why = refused_scale(mode, scale)
        if why:
            raise ValueError(why)
        cfg = ZSSRConfig(scale=int(scale), learning_rate=float(learning_rate), crop_size=int(crop_size),
                         back_projection_iters=int(back_projection_iters), self_ensemble=bool(self_ensemble))
        if steps and steps < cfg.max_iters:
            cfg = cfg.scaled_policy(int(steps))
        elif steps:
            cfg.max_iters = int(steps)
        tuner = ZSSR(cfg)
    else:
        cfg = NTIREConfig(learning_rate=float(learning_rate), crop_size=int(crop_size),
                          validation_interval=int(validation_interval), l1_weight=float(l1_weight),
                          id_threshold=float(id_threshold))
        if steps:
            cfg.steps = int(steps)
        losses, score = _quality_terms(clipiqa, clipiqa_weight, maniqa, maniqa_weight)
        tuner = NTIRETune(cfg, quality_losses=losses, score_fn=score, id_similarity=_id_similarity(id_model))
    # Faces per group come from the memory free now: first let ComfyUI unload what it can spare for all the
    # faces in one group (on a GPU); the tuner then takes as many per group as fit (its report and log say
    # how many).
    # The metric networks first (ComfyUI loads them, evicting what it must), then the faces' own memory.
    with hm.on_device(clipiqa, maniqa, id_model):
        out, report = _tune(tuner, x, device, seed)
    if mode == "ntire_tune" and not losses and (clipiqa_weight or maniqa_weight):
        report["note"] = "CLIP-IQA/MANIQA weights are set but no IQA metric is connected: L1 only"
    return (bchw_to_image(out), json.dumps(report, default=str))


def _tune(tuner, x, device, seed):
    free_for_one_group(tuner, x, device)
    progress = dev.Progress(tuner.total_steps(x))
    dev.check_interrupt()
    return tuner(x, seed=int(seed), hook=preview_hook(progress))


def free_for_one_group(tuner, x, device) -> int:
    """Ask the host to free what ONE face's group needs plus every face's input/output copies (the tuner then
    sizes its groups from the memory free): freeing for the whole batch at once would evict every other model
    for faces that run in later groups anyway. Returns the bytes asked (0 on the CPU, tiny images)."""
    n, _, h, w = x.shape
    if min(h, w) < MIN_SIDE or device == torch.device("cpu"):
        return 0
    cost = tuner.face_cost(h, w, device)
    need = cost.group + n * cost.batch
    dev.free_memory(need, device)
    return need


def _metric_scores(metric):
    """An IQA metric object -> fn(images) -> [N] score tensor (higher is better, differentiable)."""
    fn = getattr(metric, "score", None) or metric

    def score(images):
        return fn(images).reshape(-1)

    score.name = str(getattr(metric, "name", None) or type(metric).__name__)
    return score


def _quality_terms(clipiqa, clipiqa_weight, maniqa, maniqa_weight):
    """Loss terms (weight, 1 - metric) and the validation score (sum of the metrics), AIIA's recipe; none
    without metrics. Metric inputs are appended by the IQA stage (IQA_METRIC objects)."""
    losses, scores = [], []
    for metric, weight in ((clipiqa, clipiqa_weight), (maniqa, maniqa_weight)):
        if metric is None:
            continue
        s = _metric_scores(metric)
        scores.append(s)
        if weight:
            as_loss = getattr(metric, "as_loss", None)  # IQA_METRIC: range-scaled badness, = 1 - s for 0..1 metrics

            def loss(images, s=s, as_loss=as_loss):
                return as_loss(images).reshape(-1) if as_loss is not None else 1.0 - s(images)
            loss.name = f"(1 - {s.name})" if as_loss is None or metric.score_range == (0.0, 1.0) else \
                f"{s.name} loss"
            losses.append((float(weight), loss))
    if not scores:
        return [], None

    def total(images):
        return sum(s(images) for s in scores)

    total.name = " + ".join(s.name for s in scores)
    return losses, total


def _id_similarity(id_model):
    """A FACE_ID object -> fn(a, b) -> [N] cosine, or None when not connected."""
    if id_model is None:
        return None
    fn = getattr(id_model, "similarity", None)
    if fn is None:
        raise TypeError("the ID model must provide similarity(a, b) -> per-image cosine")
    return fn


# Node id -> what it computes (keyword arguments = the node's inputs; returns the node's outputs as a tuple).
OPS = {"FaceMend_PerImageTune": per_image_tune}
