"""Nodes: IQA metric loader and scoring, ID model loader (ArcFace / AdaFace) and ID similarity, best-of selection,
authenticity check."""
from __future__ import annotations

import json
import os
import time

import torch

from ..host import device as dev
from ..host import models as hm
from ..host.model_paths import find_file, list_files
from ..pipelines.io.errors import FaceMendError, InvalidImage
from ..ops.common import CATEGORY, bchw_to_image, empty_faces, image_to_bchw, no_faces

IQA_FOLDER = "facemend_iqa"
ID_FOLDER = "insightface"
ADAFACE_FOLDER = "adaface"
DEFAULT_FILE = "default"
DEFAULT_ID_MODEL = "models/buffalo_l/w600k_r50.onnx"
_cache: dict = {}


def open_metric(name: str, weights_file: str = DEFAULT_FILE, niqe_variant: str = "pyiqa"):
    """IQAMetric `name` from models/facemend_iqa/ (the metric's official file name unless weights_file is given);
    cached per file, mtime and device. A missing file raises ModelFileNotFound naming it and where to get it."""
    from ..pipelines.quality import metrics as M

    if name in M.NOT_SUPPORTED:
        raise FaceMendError(M.NOT_SUPPORTED[name])
    if name not in M.SPECS:
        raise ValueError(f"unknown IQA metric {name!r}; choose from {', '.join(M.METRIC_NAMES)}")
    path = find_file(IQA_FOLDER, M.SPECS[name].file if weights_file in (DEFAULT_FILE, "", None) else weights_file)
    device = dev.compute_device()
    key = ("iqa", name, niqe_variant, os.path.abspath(path), os.path.getmtime(path), str(device))
    if key not in _cache:
        if name == "niqe":
            from ..pipelines.quality.niqe import NIQE

            _cache[key] = M.IQAMetric(M.SPECS[name], NIQE.from_file(path, device=device, variant=niqe_variant),
                                      weights=path)
        else:
            _cache[key] = hm.manage(M.load_metric(name, path, device), f"IQA {name}")
    return _cache[key]


def id_folder(model: str) -> str:
    """ArcFace ONNX files live in models/insightface/, AdaFace checkpoints in models/adaface/."""
    return ID_FOLDER if model.lower().endswith(".onnx") else ADAFACE_FOLDER


def open_id_model(model: str = DEFAULT_ID_MODEL, path: str | None = None):
    """The ID model `model` (cached): an ArcFace ONNX from models/insightface/ (the proxy) or AdaFace IR-50
    (adaface_ir50_ms1mv2.ckpt, the NTIRE gate's own) from models/adaface/; `path`: a file the caller resolved."""
    path = path or find_file(id_folder(model), model)
    device = dev.compute_device()
    key = ("id", os.path.abspath(path), os.path.getmtime(path), str(device))
    if key not in _cache:
        if path.lower().endswith(".onnx"):
            from ..pipelines.quality.id_similarity import ArcFaceONNX

            _cache[key] = ArcFaceONNX.from_file(path, device)
        else:
            from ..pipelines.quality.adaface import AdaFaceIR50

            # Hosted, ComfyUI loads and evicts it like its own (ArcFace is an onnxruntime session it cannot move).
            load_on = dev.offload_device() if dev.is_hosted() else device
            _cache[key] = hm.manage(AdaFaceIR50.from_file(path, load_on), "ID AdaFace IR-50", follow_moves=True)
    return _cache[key]


def score_images(metric, x: torch.Tensor, batch_size: int = 4, progress=None) -> torch.Tensor:
    """[N,3,H,W] -> [N] scores, in batches, no autograd; interruptible between batches."""
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], max(int(batch_size), 1)):
            dev.check_interrupt()
            out.append(metric.score(x[i:i + batch_size]).float().cpu())
            if progress is not None:
                progress.update(min(batch_size, x.shape[0] - i))
    return torch.cat(out)


def crop_landmarks(face_alignment, n: int, size: int) -> torch.Tensor | None:
    """Landmarks of each aligned face in crop pixels ([N,5,2]) from FACE_ALIGNMENT, rescaled to `size`."""
    if face_alignment is None:
        return None
    from ..pipelines.face.geometry import apply_affine

    if len(face_alignment) != n:
        raise InvalidImage(f"the face alignment holds {len(face_alignment)} faces but the images hold {n}")
    pts = apply_affine(face_alignment.affine.float(), face_alignment.landmarks.float())
    return pts * (size / float(face_alignment.crop_size))


def _rounded(values) -> list:
    return [round(float(v), 5) for v in values]


class IQAMetricLoader:
    DESCRIPTION = ("Loads a no-reference image-quality metric. niqe needs only niqe_pris_params.npz (12 KB); "
                   "clipiqa / maniqa / musiq are pyiqa's networks (optional 'iqa' extra, non-commercial licence) "
                   "with their weight files in models/facemend_iqa/. Nothing is downloaded.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("IQA_METRIC",)
    RETURN_NAMES = ("metric",)

    @classmethod
    def INPUT_TYPES(cls):
        from ..pipelines.quality.metrics import METRIC_NAMES

        return {"required": {
            "metric": (list(METRIC_NAMES), {"default": "niqe", "tooltip":
                       "niqe (lower is better), clipiqa, maniqa (0..1), musiq (0..100): the NTIRE 2025 metrics. "
                       "Q-Align (~15 GB GPU memory) is not offered."}),
            "weights_file": ([DEFAULT_FILE] + list_files(IQA_FOLDER), {"default": DEFAULT_FILE, "tooltip":
                             "File in models/facemend_iqa/. default: the metric's official name "
                             "(niqe_pris_params.npz, RN50.pt, ckpt_koniq10k.pt, musiq_koniq_ckpt-e95806b9.pth)."}),
        }, "optional": {
            "niqe_variant": (["pyiqa", "matlab"], {"default": "pyiqa", "tooltip":
                             "niqe only. pyiqa: pyiqa's niqe (YIQ luma), what the NTIRE challenge scored. matlab: "
                             "BasicSR's calculate_niqe algorithm (YCbCr luma) in double precision."}),
        }}

    def load(self, metric, weights_file=DEFAULT_FILE, niqe_variant="pyiqa"):
        return (open_metric(metric, weights_file, niqe_variant),)


class IQAScore:
    DESCRIPTION = ("Scores every image of the batch with an IQA metric. Outputs the batch mean as FLOAT (wire it "
                   "into e.g. the adaptive ID scale) and a JSON report with each image's score.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("mean_score", "report_json")
    OUTPUT_TOOLTIPS = ("Mean score over the batch (see the metric's direction in the report).",
                       "metric, lower_better, mean, per-image scores, seconds.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Images or face crops to score (NIQE needs at least 96x192)."}),
            "metric": ("IQA_METRIC", {"tooltip": "From the FaceMend IQA metric loader."}),
        }, "optional": {
            "batch_size": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip":
                           "Images per metric call (lower it if the GPU runs out of memory)."}),
        }}

    def run(self, image, metric, batch_size=4):
        if no_faces(image):  # Detect + Align found no face
            return (0.0, json.dumps({"metric": metric.name, "images": 0, "mean": None, "scores": [],
                                     "note": "no images (no faces found): nothing was scored"}))
        with hm.on_device(metric):
            x = image_to_bchw(image, metric.device, "image")
            t = time.perf_counter()
            scores = score_images(metric, x, batch_size, dev.Progress(x.shape[0]))
        mean = float(scores.mean())
        report = {"metric": metric.name, "lower_better": metric.lower_better, "mean": round(mean, 5),
                  "scores": _rounded(scores), "seconds": round(time.perf_counter() - t, 3)}
        return (mean, json.dumps(report))


class IDModelLoader:
    DESCRIPTION = ("Loads a face-recognition model for ID similarity and the ID gate: AdaFace IR-50 "
                   "(adaface_ir50_ms1mv2.ckpt in models/adaface/: the model the NTIRE 2025/2026 challenges gate "
                   "with, aligned as the organisers do) or an ArcFace ONNX from models/insightface/ (buffalo_l's "
                   "w600k_r50.onnx, antelopev2's glintr100.onnx; non-commercial insightface models on onnxruntime; "
                   "a proxy for the challenge's number).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FACE_ID",)
    RETURN_NAMES = ("id_model",)

    @classmethod
    def INPUT_TYPES(cls):
        files = (list_files(ID_FOLDER) + list_files(ADAFACE_FOLDER)) or [DEFAULT_ID_MODEL]
        default = DEFAULT_ID_MODEL if DEFAULT_ID_MODEL in files else files[0]
        return {"required": {
            "model": (files, {"default": default, "tooltip":
                      "adaface_ir50_ms1mv2.ckpt (models/adaface/, the NTIRE gate's model) or an ArcFace "
                      "recognition ONNX under models/insightface/ (e.g. models/buffalo_l/w600k_r50.onnx). "
                      "Detection models of the same packs (det_10g.onnx, scrfd) are refused."}),
        }}

    def load(self, model):
        return (open_id_model(model),)


PROTOCOL_CHOICES = ("custom", "ntire2025", "ntire2026")


def _model_report(id_model) -> dict:
    adaface = getattr(id_model, "name", "") == "adaface"
    return {"model": os.path.basename(getattr(id_model, "path", "") or ""),
            "model_kind": "AdaFace IR-50" if adaface else "ArcFace (proxy)", "as_the_challenge": adaface}


class IDSimilarity:
    DESCRIPTION = ("Identity similarity between each input face and its restored version, both warped with the "
                   "input's five landmarks as the NTIRE check does (AdaFace IR-50: the organisers' alignment and "
                   "model, their number; ArcFace: a proxy). Counts faces below the threshold, or below the subset's "
                   "threshold of an NTIRE protocol (which fails a submission with more than 10).")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("FLOAT", "INT", "STRING")
    RETURN_NAMES = ("mean_similarity", "low_id_count", "report_json")
    OUTPUT_TOOLTIPS = ("Mean similarity over the faces (1 = same embedding).",
                       "Faces whose similarity is below the threshold.",
                       "Per-face similarity, threshold, low flags, which model and protocol.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..pipelines.quality.ntire_score import ID_THRESHOLDS

        return {"required": {
            "input_faces": ("IMAGE", {"tooltip": "The faces before restoration (aligned crops)."}),
            "restored_faces": ("IMAGE", {"tooltip": "The same faces after restoration, same size and order."}),
            "id_model": ("FACE_ID", {"tooltip": "From the FaceMend ID model loader."}),
        }, "optional": {
            "threshold": ("FLOAT", {"default": 0.6, "min": -1.0, "max": 1.0, "step": 0.01, "tooltip":
                          "Low-ID threshold when protocol is custom. NTIRE 2025: CelebA 0.5, LFW / CelebChild 0.6, "
                          "WIDER / WebPhoto 0.3 (2026: WIDER 0.2, WebPhoto 0.25)."}),
            "face_alignment": ("FACE_ALIGNMENT", {"tooltip":
                               "Optional: the alignment of these crops, whose detected landmarks are then used. "
                               "Without it the crops are taken as FFHQ-aligned (landmarks = the template)."}),
            "protocol": (list(PROTOCOL_CHOICES), {"default": "custom", "tooltip":
                         "custom: the threshold above. ntire2025 / ntire2026: the threshold of the subset below "
                         "in that year's eval.py, and the challenge's rule (more than 10 low faces fail)."}),
            "subset": (list(ID_THRESHOLDS), {"default": "CelebA", "tooltip":
                       "The NTIRE test subset these faces are from (used with an NTIRE protocol)."}),
        }}

    def run(self, input_faces, restored_faces, id_model, threshold=0.6, face_alignment=None, protocol="custom",
            subset="CelebA"):
        from ..pipelines.quality.ntire_score import MAX_LOW_ID, id_gate, protocol as ntire_protocol

        max_low = 10**9  # custom: count only
        if protocol != "custom":
            proto = ntire_protocol(protocol)
            if subset not in proto["thresholds"]:
                raise FaceMendError(f"unknown NTIRE subset {subset!r}; choose from {', '.join(proto['thresholds'])}")
            threshold, max_low = proto["thresholds"][subset], proto["max_low"]
        if no_faces(input_faces) and no_faces(restored_faces):
            return (0.0, 0, json.dumps({"threshold": threshold, "similarities": [], "low_id_count": 0, "mean": None,
                                        "note": "no faces found: nothing was compared"}))
        a = image_to_bchw(input_faces, dev.compute_device(), "input faces")
        b = image_to_bchw(restored_faces, a.device, "restored faces")
        if a.shape != b.shape:
            raise InvalidImage(f"input faces {tuple(a.shape)} and restored faces {tuple(b.shape)} differ in size "
                               "or count; ID similarity compares each face with its own restoration")
        dev.check_interrupt()
        with hm.on_device(id_model):
            sims = id_model.similarity(a, b, crop_landmarks(face_alignment, a.shape[0], a.shape[-1])).float().cpu()
        gate = id_gate(sims.tolist(), default_threshold=threshold, max_low=max_low)
        report = {**_model_report(id_model), "threshold": threshold,
                  "similarities": _rounded(sims), "low": [p["low"] for p in gate["per_image"]],
                  "low_id_count": gate["low_count"], "mean": round(float(sims.mean()), 5)}
        if protocol != "custom":
            report.update(protocol=protocol, subset=subset, max_low=MAX_LOW_ID, passed=gate["passed"])
        return (float(sims.mean()), int(gate["low_count"]), json.dumps(report))


class BestOf:
    DESCRIPTION = ("Picks, per face, the best of several candidate restorations by an IQA metric, among the "
                   "candidates whose identity stays close to the input (when an ID model and the input faces are "
                   "connected). If no candidate of a face passes the ID gate, the one with the highest ID "
                   "similarity is taken and the report says so.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("best", "report_json")
    OUTPUT_TOOLTIPS = ("One image per face: the chosen candidate.",
                       "Per face: every candidate's score (and ID similarity), the choice, the gate result.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "candidates_1": ("IMAGE", {"tooltip": "First candidate batch (e.g. restorer A's faces)."}),
            "candidates_2": ("IMAGE", {"tooltip": "Second candidate batch: the same faces, same size and order."}),
            "metric": ("IQA_METRIC", {"tooltip": "Quality metric deciding between candidates (its direction is "
                                                 "respected: NIQE lower, others higher)."}),
        }, "optional": {
            "candidates_3": ("IMAGE", {"tooltip": "Optional third candidate batch."}),
            "candidates_4": ("IMAGE", {"tooltip": "Optional fourth candidate batch."}),
            "input_faces": ("IMAGE", {"tooltip": "The faces before restoration, for the ID gate."}),
            "id_model": ("FACE_ID", {"tooltip": "ID model (ID model loader: AdaFace IR-50, the NTIRE gate's, or an ArcFace proxy) for the ID gate (needs input_faces)."}),
            "id_threshold": ("FLOAT", {"default": 0.6, "min": -1.0, "max": 1.0, "step": 0.01, "tooltip":
                             "Candidates whose ID similarity to the input is below this are not chosen."}),
        }}

    def run(self, candidates_1, candidates_2, metric, candidates_3=None, candidates_4=None, input_faces=None,
            id_model=None, id_threshold=0.6):
        from ..pipelines.quality.best_of import select_best

        if no_faces(candidates_1):  # no faces found: nothing to choose from
            return (empty_faces(candidates_1), json.dumps({"faces": [], "note": "no faces found"}))
        with hm.on_device(metric, id_model):
            device = metric.device
            cands = [image_to_bchw(c, device, f"candidates_{i + 1}")
                     for i, c in enumerate((candidates_1, candidates_2, candidates_3, candidates_4)) if c is not None]
            for i, c in enumerate(cands[1:], 2):
                if c.shape != cands[0].shape:
                    raise InvalidImage(f"candidates_{i} {tuple(c.shape)} differs from candidates_1 "
                                       f"{tuple(cands[0].shape)}: candidates must be the same faces, same size")
            progress = dev.Progress(len(cands) * cands[0].shape[0])
            scores = torch.stack([score_images(metric, c, 4, progress) for c in cands])
            sims = None
            if (input_faces is None) != (id_model is None):
                raise InvalidImage("the ID gate needs both input_faces and id_model (connect both or neither)")
            if id_model is not None:
                ref = image_to_bchw(input_faces, device, "input faces")
                if ref.shape != cands[0].shape:
                    raise InvalidImage(f"input faces {tuple(ref.shape)} and candidates {tuple(cands[0].shape)} differ")
                sims = torch.stack([id_model.similarity(ref, c).float().cpu() for c in cands])
        choice, per_face = select_best(scores, metric.lower_better, sims, id_threshold)
        stacked = torch.stack(cands)  # [K,N,3,H,W]
        best = stacked[choice.to(stacked.device), torch.arange(stacked.shape[1], device=stacked.device)]
        report = {"metric": metric.name, "lower_better": metric.lower_better, "faces": per_face}
        return (bchw_to_image(best), json.dumps(report))


class Authenticity:
    DESCRIPTION = ("Authenticity check (IDM, ICCV 2023): restores the faces, then restores the result again, and "
                   "reports whether the second pass keeps or improves quality and how far the identity drifts "
                   "between f(x) and f(f(x)). An authentic restorer should be (nearly) idempotent.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "IMAGE", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("restored", "restored_twice", "quality_gain", "id_drift", "report_json")
    OUTPUT_TOOLTIPS = ("f(x)", "f(f(x))", "Mean score(f(f(x))) - score(f(x)), positive = better (metric's "
                       "direction respected).", "Mean 1 - ID similarity(f(x), f(f(x))); 0 without an ID model.",
                       "Per face: scores of x, f(x), f(f(x)), ID similarities, authentic flag.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_crops": ("IMAGE", {"tooltip": "Aligned faces to restore (as for Restore Faces)."}),
            "restorer": ("FACE_RESTORER", {"tooltip": "From the FaceMend face restorer loader."}),
            "metric": ("IQA_METRIC", {"tooltip": "Quality metric for f(x) and f(f(x))."}),
        }, "optional": {
            "id_model": ("FACE_ID", {"tooltip": "ID model (ID model loader: AdaFace IR-50 or an ArcFace proxy) for the identity drift."}),
            "fidelity": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                         "CodeFormer's w (ignored by GFPGAN)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed of both passes."}),
        }}

    def run(self, face_crops, restorer, metric, id_model=None, fidelity=0.5, seed=0):
        from ..pipelines.quality.authenticity import authenticity

        if no_faces(face_crops):  # no faces found: nothing restored twice
            return (empty_faces(face_crops), empty_faces(face_crops), 0.0, 0.0,
                    json.dumps({"faces": [], "note": "no faces found: nothing was checked"}))
        with hm.on_device(restorer, metric, id_model):
            x = image_to_bchw(face_crops, restorer.device, "face crops")
            progress = dev.Progress(2 * x.shape[0])
            hook = dev.step_hook(progress)

            def restore(t):
                return restorer(t, fidelity=fidelity, seed=seed, callback=hook)

            fx, ffx, report = authenticity(restore, x, metric,
                                           id_model.similarity if id_model is not None else None)
        return (bchw_to_image(fx), bchw_to_image(ffx), report["mean_quality_gain"],
                report.get("mean_id_drift", 0.0), json.dumps(report))


NODES = {
    "FaceMend_IQALoader": (IQAMetricLoader, "FaceMend IQA Metric Loader"),
    "FaceMend_IQAScore": (IQAScore, "FaceMend IQA Score"),
    "FaceMend_IDModelLoader": (IDModelLoader, "FaceMend ID Model Loader (ArcFace / AdaFace)"),
    "FaceMend_IDSimilarity": (IDSimilarity, "FaceMend ID Similarity"),
    "FaceMend_BestOf": (BestOf, "FaceMend Best-Of Selection"),
    "FaceMend_Authenticity": (Authenticity, "FaceMend Authenticity Check (f(f(x)))"),
}
