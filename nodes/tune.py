"""Node: per-image tuning -- classic ZSSR super-resolution or the NTIRE 2025 AIIA IQA-guided refinement."""
from __future__ import annotations

import json

import torch

from ..host import device as dev
from ..host import models as hm
from ..pipelines.tune import MODES
from ..pipelines.tune.engine import MIN_SIDE
from ..pipelines.tune.ntire_refine import NTIREConfig, NTIRETune
from ..pipelines.tune.zssr import ZSSR, ZSSRConfig
from ..ops.common import CATEGORY, bchw_to_image, empty_faces, image_to_bchw, no_faces


class PerImageTune:
    DESCRIPTION = ("Tunes a small network on each image itself (no weights needed). zssr: 'Zero-Shot' "
                   "super-resolution x2/x4 (Shocher et al. 2018), learning from the image's own downscaled copies. "
                   "ntire_tune: same-size refinement as in the NTIRE 2025 AIIA entry, trained on identity pairs "
                   "from the image's multi-scale copies, keeping the best validated output. All faces of the "
                   "batch are tuned together, each with its own network, as many at once as fit in the free memory "
                   "(the report's groups say how many). Slow on a CPU: lower the steps there.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "report_json")
    OUTPUT_TOOLTIPS = ("The tuned images (zssr: scale x larger; ntire_tune: same size).",
                       "What ran, per image: iterations, losses, learning-rate changes or best step, seconds.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Images or face crops to tune; a batch is tuned together (one network "
                                           "per image, run as one grouped network)."}),
            "mode": (list(MODES), {"default": "zssr", "tooltip":
                     "zssr: classic zero-shot super-resolution (L1, plateau learning-rate policy, self-ensemble, "
                     "back-projection). ntire_tune: same-size refinement on identity pairs (L1 + optional "
                     "NR-IQA losses), best validated step kept, ID guard."}),
            "scale": ("INT", {"default": 2, "min": 2, "max": 4, "step": 2, "tooltip":
                      "zssr only: upscale factor, 2 or 4 (x4 = two x2 steps, the paper's gradual SR). "
                      "Ignored by ntire_tune."}),
            "steps": ("INT", {"default": 0, "min": 0, "max": 20000, "tooltip":
                      "Training iterations (per x2 step for zssr). 0 = the mode's default: zssr up to 3000 with the "
                      "paper's plateau policy, which usually stops earlier; ntire_tune 500. With a number below "
                      "3000 zssr compresses its learning-rate policy into it. On a CPU use 100-300."}),
            "learning_rate": ("FLOAT", {"default": 0.001, "min": 1e-6, "max": 0.1, "step": 0.0001,
                                        "round": False, "tooltip":
                              "Adam start learning rate (both papers: 0.001)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip":
                     "Random seed for weight init, crops and augmentation: same seed, same output."}),
            "crop_size": ("INT", {"default": 128, "min": 16, "max": 1024, "step": 8, "tooltip":
                          "Training crop size (both papers: 128). Smaller is faster, e.g. 64 on a CPU."}),
            "validation_interval": ("INT", {"default": 100, "min": 1, "max": 10000, "tooltip":
                                    "ntire_tune: validate the whole image every this many steps and keep the "
                                    "best-scoring output. zssr tests its reconstruction error on its own schedule."}),
        }, "optional": {
            "l1_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip":
                          "ntire_tune: weight of the L1 identity loss."}),
            "clipiqa_weight": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                               "ntire_tune: weight of (1 - CLIP-IQA) in the loss (AIIA: 0.1). Used only when a "
                               "CLIP-IQA metric is connected (IQA nodes); otherwise the loss is L1 only and the "
                               "report says so."}),
            "maniqa_weight": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                              "ntire_tune: weight of (1 - MANIQA) in the loss (AIIA: 0.1). Used only when a "
                              "MANIQA metric is connected."}),
            "id_threshold": ("FLOAT", {"default": 0.6, "min": -1.0, "max": 1.0, "step": 0.01, "tooltip":
                             "ntire_tune: reject validated outputs whose ID similarity to the input is below this "
                             "(NTIRE gate: 0.3-0.6). Active when an ID model is connected."}),
            "back_projection_iters": ("INT", {"default": 10, "min": 0, "max": 50, "tooltip":
                                      "zssr: back-projection iterations at test time (paper: 10; 0 for noisy "
                                      "real photos, as the paper's real-image config)."}),
            "self_ensemble": ("BOOLEAN", {"default": True, "tooltip":
                              "zssr: median of the 8 rotations/flips at test time (8x the test cost)."}),
            "clipiqa": ("IQA_METRIC", {"tooltip": "ntire_tune: a CLIP-IQA metric (IQA metric loader) for the "
                                                  "(1 - CLIP-IQA) loss term and the validation score."}),
            "maniqa": ("IQA_METRIC", {"tooltip": "ntire_tune: a MANIQA metric (IQA metric loader) for the "
                                                 "(1 - MANIQA) loss term and the validation score."}),
            "id_model": ("FACE_ID", {"tooltip": "ntire_tune: an ID model (ID model loader: AdaFace IR-50 or ArcFace) for the ID guard."}),
        }}

    def run(self, image, mode="zssr", scale=2, steps=0, learning_rate=0.001, seed=0, crop_size=128,
            validation_interval=100, l1_weight=1.0, clipiqa_weight=0.1, maniqa_weight=0.1, id_threshold=0.6,
            back_projection_iters=10, self_ensemble=True, clipiqa=None, maniqa=None, id_model=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if no_faces(image):  # Detect + Align found no face: nothing to tune
            return (empty_faces(image, int(scale) if mode == "zssr" else 1),
                    json.dumps({"mode": mode, "faces": 0, "note": "no faces: nothing was tuned"}))
        device = dev.compute_device()
        x = image_to_bchw(image, device)
        if mode == "zssr":
            if int(scale) not in (2, 4):
                raise ValueError(f"zssr scale must be 2 or 4, got {scale}")
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
            out, report = self._tune(tuner, x, device, seed)
        if mode == "ntire_tune" and not losses and (clipiqa_weight or maniqa_weight):
            report["note"] = "CLIP-IQA/MANIQA weights are set but no IQA metric is connected: L1 only"
        return (bchw_to_image(out), json.dumps(report, default=str))

    @staticmethod
    def _tune(tuner, x, device, seed):
        free_for_one_group(tuner, x, device)
        progress = dev.Progress(tuner.total_steps(x))
        dev.check_interrupt()
        return tuner(x, seed=int(seed), hook=dev.step_hook(progress))


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


NODES = {"FaceMend_PerImageTune": (PerImageTune, "FaceMend Per-Image Tune (ZSSR)")}
