"""Face detector loader, detect + align, paste back: what the nodes FaceMend_DetectorLoader, FaceMend_DetectAlign and
FaceMend_PasteBack compute."""
from __future__ import annotations

import torch

from ..host import device as dev
from ..host import models as hm
from ..host.model_paths import find_file, list_files
from ..pipelines.face.align import FaceAlignment, detect_and_align
from ..pipelines.face.detectors import EMBEDDED_MTCNN, load_detector
from ..pipelines.face.paste import paste_faces
from ..pipelines.io.errors import ModelFileNotFound
from .common import bchw_to_image, image_to_bchw, mask_in, mask_out, model_file_problem

FOLDER = "facedetection"
PRECISIONS = ("fp32", "auto", "fp16", "bf16")


def detector_files() -> list[str]:
    """The loader's choices: the embedded MTCNN, then the RetinaFace files in facedetection/ (YuNet .onnx files
    live there too but are not detectors this loader reads)."""
    return [EMBEDDED_MTCNN] + [f for f in list_files(FOLDER) if not f.lower().endswith(".onnx")]


def detector_problem(model: str) -> str | None:
    """Why the loader could not load `model` (None when it can): a file missing from facedetection/, or the `mtcnn`
    package (whose files are the embedded detector's weights) missing."""
    if model == EMBEDDED_MTCNN:
        from ..pipelines.face.mtcnn_nets import mtcnn_weight_files

        try:
            mtcnn_weight_files()
        except ModelFileNotFound as exc:
            return str(exc)
        return None
    return model_file_problem(FOLDER, model, detector_files())


def manage_detector(det):
    """The detector under ComfyUI's model management when hosted; its own `to` follows ComfyUI's moves (RetinaFace
    drops its fused inference copy and anchor cache, so no copy stays on the GPU after an eviction)."""
    return hm.manage(det, f"detector {det.name}", follow_moves=True)


def load_face_detector(model: str, precision: str = "fp32", anchors: str = "auto"):
    """The embedded MTCNN or a RetinaFace file of facedetection/ (cached per file, mtime, device, dtype, anchors)."""
    device = dev.compute_device()
    dtype = dev.resolve_dtype(precision, device)
    if model == EMBEDDED_MTCNN:
        det = load_detector(EMBEDDED_MTCNN, device=device, dtype=dtype)
    else:
        det = load_detector(model, find_file(FOLDER, model), device=device, dtype=dtype, anchors=anchors)
    return manage_detector(det)


def detect_align(image, detector, selection="all", face_index=0, score_threshold=0.8, min_face_size=16,
                 max_faces=0, crop_size=512, detect_max_side=1600, border="constant", interpolation="bilinear",
                 crop_geometry="ffhq"):
    """IMAGE -> (aligned crops IMAGE, FaceAlignment, face count, faces JSON). No face: an empty crop batch."""
    with hm.on_device(detector):
        device = getattr(detector, "device", None) or dev.compute_device()
        x = image_to_bchw(image, device)
        progress = dev.Progress(x.shape[0])
        dev.check_interrupt()
        crops, alignment, _ = detect_and_align(
            x, detector, score_threshold=score_threshold, mode=selection, index=face_index,
            min_size=float(min_face_size), max_faces=max_faces,
            crop_size=0 if crop_geometry == "native" else crop_size, detect_max_side=detect_max_side,
            border=border, hook=dev.step_hook(progress), interpolation=interpolation, geometry=crop_geometry)
    if len(alignment) == 0:  # an empty batch: restorers, tuners and colour fix pass it on without work
        size = int(crop_size) if crop_geometry != "native" else 1
        return (torch.zeros(0, size, size, 3, device=dev.intermediate_device()), alignment, 0,
                alignment.to_json())
    return (bchw_to_image(crops), alignment, len(alignment), alignment.to_json())


def paste_back(image, face_crops, alignment: FaceAlignment, feather=0.10, margin=0.04, mask=None,
               interpolation="bilinear"):
    """(IMAGE with the crops pasted back, blend MASK). No face: the images unchanged and an empty mask."""
    if len(alignment) == 0 and image.ndim == 4 and image.shape[-1] == 3:
        # No face: the images pass through untouched, without a trip to the device.
        return (image, torch.zeros(image.shape[:3], device=image.device))
    device = dev.compute_device()
    x = image_to_bchw(image, device, "paste-back image")
    if len(alignment) == 0:
        return (bchw_to_image(x), mask_out(torch.zeros_like(x[:, :1])))
    crops = image_to_bchw(face_crops, device, "face crops")
    face_mask = image_mask = None
    m = mask_in(mask, device)
    if m is not None:
        if m.shape[0] == len(alignment) and m.shape[-1] == m.shape[-2] and \
                tuple(m.shape[-2:]) != tuple(x.shape[-2:]):
            face_mask = m
        else:
            image_mask = m
    dev.check_interrupt()
    out, blend = paste_faces(x, crops, alignment, margin=margin, feather=feather, face_mask=face_mask,
                             image_mask=image_mask, interpolation=interpolation)
    return (bchw_to_image(out), mask_out(blend))


# Node id -> what it computes (keyword arguments = the node's inputs; returns the node's outputs as a tuple).
OPS = {
    "FaceMend_DetectorLoader": lambda model, precision="fp32", anchors="auto": (
        load_face_detector(model, precision, anchors),),
    "FaceMend_DetectAlign": detect_align,
    "FaceMend_PasteBack": paste_back,
}
