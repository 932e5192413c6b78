"""IQA metric loader and scoring, ID model loader (ArcFace / AdaFace) and ID similarity, best-of selection,
authenticity check: what the quality nodes compute (FaceMend_IQALoader, _IQAScore, _IDModelLoader, _IDSimilarity,
_BestOf, _Authenticity). open_metric / open_id_model are also what the CLI and the tuning code load metrics with."""
from __future__ import annotations

import importlib.util
import json
import os
import time

import torch

from ..host import device as dev
from ..host import models as hm
from ..host.model_paths import find_file, find_optional_file, list_files, missing_file_message
from ..pipelines.io.errors import FaceMendError, InvalidImage, ModelFileNotFound
from .common import bchw_to_image, empty_faces, image_to_bchw, no_faces

IQA_FOLDER = "facemend_iqa"
ID_FOLDER = "insightface"
ADAFACE_FOLDER = "adaface"
DEFAULT_FILE = "default"
DEFAULT_ID_MODEL = "models/buffalo_l/w600k_r50.onnx"
NIQE_VARIANTS = ("pyiqa", "matlab")
PROTOCOL_CHOICES = ("custom", "ntire2025", "ntire2026")
_cache: dict = {}


def metric_names() -> list[str]:
    """The IQA loader's metric choices (the NTIRE 2025 metrics FaceMend loads)."""
    from ..pipelines.quality.metrics import METRIC_NAMES

    return list(METRIC_NAMES)


def iqa_weight_files() -> list[str]:
    """The IQA loader's weights_file choices: 'default' (the metric's official file name) and the files found in
    models/facemend_iqa/."""
    return [DEFAULT_FILE] + list_files(IQA_FOLDER)


def id_model_files() -> list[str]:
    """The ID model loader's choices: ArcFace ONNX files in models/insightface/ and AdaFace checkpoints in
    models/adaface/ (the default name when there is none, so the node still shows; running it names the file)."""
    return (list_files(ID_FOLDER) + list_files(ADAFACE_FOLDER)) or [DEFAULT_ID_MODEL]


def id_model_default(files: list[str]) -> str:
    return DEFAULT_ID_MODEL if DEFAULT_ID_MODEL in files else files[0]


def metric_file(name: str, weights_file: str = DEFAULT_FILE) -> str:
    """The file name `name` reads in models/facemend_iqa/: its official name unless weights_file names another."""
    from ..pipelines.quality import metrics as M

    return M.SPECS[name].file if weights_file in (DEFAULT_FILE, "", None) else weights_file


def open_metric(name: str, weights_file: str = DEFAULT_FILE, niqe_variant: str = "pyiqa"):
    """IQAMetric `name` from models/facemend_iqa/ (the metric's official file name unless weights_file is given);
    cached per file, mtime and device. A missing file raises ModelFileNotFound naming it and where to get it."""
    from ..pipelines.quality import metrics as M

    if name in M.NOT_SUPPORTED:
        raise FaceMendError(M.NOT_SUPPORTED[name])
    if name not in M.SPECS:
        raise ValueError(f"unknown IQA metric {name!r}; choose from {', '.join(M.METRIC_NAMES)}")
    path = find_file(IQA_FOLDER, metric_file(name, weights_file))
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


# The packages each pyiqa metric imports (the optional 'iqa' extra); NIQE is FaceMend's own and needs none.
METRIC_PACKAGES = {"clipiqa": ("pyiqa", "clip"), "maniqa": ("pyiqa", "timm"), "musiq": ("pyiqa",)}
PACKAGE_HINTS = {"pyiqa": "pip install --no-deps pyiqa", "clip": "pip install openai-clip", "timm": "pip install timm"}


def metric_problem(name: str, weights_file: str = DEFAULT_FILE) -> str | None:
    """Why open_metric(name, weights_file) would fail before it reads anything (a package of the optional 'iqa'
    extra not installed, the weights file not in models/facemend_iqa/), or None. Cheap: looks packages up
    without importing them and lists folders."""
    from ..pipelines.quality import metrics as M

    if name in M.NOT_SUPPORTED:
        return M.NOT_SUPPORTED[name]
    missing = [p for p in METRIC_PACKAGES.get(name, ()) if importlib.util.find_spec(p) is None]
    if missing:
        return (f"IQA metric {name} needs the optional 'iqa' extra (pyiqa's code is PolyForm Noncommercial, its "
                f"weights CC BY-NC-SA), and {', '.join(missing)} is not installed here: "
                f"{'; '.join(PACKAGE_HINTS[p] for p in missing)}. niqe needs no extra package.")
    file = metric_file(name, weights_file)
    try:
        if find_optional_file(IQA_FOLDER, file) is None:
            return missing_file_message(IQA_FOLDER, file)
    except ModelFileNotFound as exc:  # a name pointing outside the model folders
        return str(exc)
    return None


def id_folder(model: str) -> str:
    """ArcFace ONNX files live in models/insightface/, AdaFace checkpoints in models/adaface/."""
    return ID_FOLDER if model.lower().endswith(".onnx") else ADAFACE_FOLDER


def id_model_problem(model: str) -> str | None:
    """Why open_id_model(model) would fail before loading (the file not in its folder; onnxruntime, needed by the
    ArcFace ONNX models, not installed), or None."""
    try:
        if find_optional_file(id_folder(model), model) is None:
            return missing_file_message(id_folder(model), model)
    except ModelFileNotFound as exc:
        return str(exc)
    if model.lower().endswith(".onnx") and importlib.util.find_spec("onnxruntime") is None:
        return (f"{model} is an ArcFace ONNX model, which runs on onnxruntime (optional extra 'iqa'), not installed "
                "here: pip install onnxruntime (onnxruntime-gpu on a CUDA machine). The AdaFace IR-50 model "
                "(adaface_ir50_ms1mv2.ckpt in models/adaface/) runs on torch alone.")
    return None


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


def load_metric(metric: str, weights_file: str = DEFAULT_FILE, niqe_variant: str = "pyiqa"):
    """FaceMend_IQALoader: (IQAMetric,)."""
    return (open_metric(metric, weights_file, niqe_variant),)


def iqa_score(image, metric, batch_size=4):
    """FaceMend_IQAScore: every image of the batch scored -> (batch mean, JSON report with each score)."""
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


def load_id_model(model):
    """FaceMend_IDModelLoader: (ID model,)."""
    return (open_id_model(model),)


def _model_report(id_model) -> dict:
    adaface = getattr(id_model, "name", "") == "adaface"
    return {"model": os.path.basename(getattr(id_model, "path", "") or ""),
            "model_kind": "AdaFace IR-50" if adaface else "ArcFace (proxy)", "as_the_challenge": adaface}


def id_similarity(input_faces, restored_faces, id_model, threshold=0.6, face_alignment=None, protocol="custom",
                  subset="CelebA"):
    """FaceMend_IDSimilarity: each input face against its restoration -> (mean similarity, low-ID count, JSON)."""
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


def best_of(candidates_1, candidates_2, metric, candidates_3=None, candidates_4=None, input_faces=None,
            id_model=None, id_threshold=0.6):
    """FaceMend_BestOf: per face, the best-scoring candidate among those passing the ID gate -> (IMAGE, JSON)."""
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


def check_authenticity(face_crops, restorer, metric, id_model=None, fidelity=0.5, seed=0):
    """FaceMend_Authenticity: f(x), f(f(x)), quality gain, ID drift and the per-face JSON report."""
    from ..pipelines.quality.authenticity import authenticity

    if no_faces(face_crops):  # no faces found: nothing restored twice
        return (empty_faces(face_crops), empty_faces(face_crops), 0.0, 0.0,
                json.dumps({"faces": [], "note": "no faces found: nothing was checked"}))
    with hm.on_device(restorer, metric, id_model):
        x = image_to_bchw(face_crops, restorer.device, "face crops")
        progress = dev.Progress(2 * x.shape[0])
        hook = dev.step_hook(progress)

        def restore(t):
            out = restorer(t, fidelity=fidelity, seed=seed, callback=hook)
            if progress.wants_preview():  # hosted: show f(x), then f(f(x)), on the node as they are made
                progress.update(0, preview=out)
            return out

        fx, ffx, report = authenticity(restore, x, metric, id_model.similarity if id_model is not None else None)
    return (bchw_to_image(fx), bchw_to_image(ffx), report["mean_quality_gain"],
            report.get("mean_id_drift", 0.0), json.dumps(report))


# Node id -> what it computes (keyword arguments = the node's inputs; returns the node's outputs as a tuple).
OPS = {
    "FaceMend_IQALoader": load_metric,
    "FaceMend_IQAScore": iqa_score,
    "FaceMend_IDModelLoader": load_id_model,
    "FaceMend_IDSimilarity": id_similarity,
    "FaceMend_BestOf": best_of,
    "FaceMend_Authenticity": check_authenticity,
}
