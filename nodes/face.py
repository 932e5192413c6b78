"""Nodes: face detector loader, detect + align, paste-back."""
from __future__ import annotations

import torch

from ..host import device as dev
from ..host import models as hm
from ..host.model_paths import find_file, list_files
from ..pipelines.face.align import GEOMETRIES, FaceAlignment, detect_and_align
from ..pipelines.face.detection import SELECTION_MODES
from ..pipelines.face.detectors import ANCHOR_CHOICES, EMBEDDED_MTCNN, load_detector
from ..pipelines.face.geometry import BORDER_MODES, INTERPOLATIONS
from ..pipelines.face.paste import paste_faces
from ..ops.common import CATEGORY, bchw_to_image, image_to_bchw, mask_in, mask_out


class FaceDetectorLoader:
    DESCRIPTION = ("Loads a face detector: the embedded MTCNN (no download; weights come with the `mtcnn` "
                   "package) or a RetinaFace checkpoint from models/facedetection/ (facexlib's files).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FACE_DETECTOR",)
    RETURN_NAMES = ("detector",)

    @classmethod
    def INPUT_TYPES(cls):
        choices = [EMBEDDED_MTCNN] + [f for f in list_files("facedetection") if not f.lower().endswith(".onnx")]
        return {"required": {
            "model": (choices, {"default": EMBEDDED_MTCNN, "tooltip":
                      "Detector. 'mtcnn (embedded)' needs no file; RetinaFace files (detection_Resnet50_Final.pth, "
                      "detection_mobilenet0.25_Final.pth) go in models/facedetection/."}),
            "precision": (["fp32", "auto", "fp16", "bf16"], {"default": "fp32", "tooltip":
                          "Detector weights precision. fp32 is exact and detection is cheap; fp16 saves GPU time."}),
        }, "optional": {
            "anchors": (list(ANCHOR_CHOICES), {"default": "auto", "tooltip":
                        "RetinaFace anchor configuration: auto (from the file), facexlib, or 1mb "
                        "(biubug6 Face-Detector-1MB training)."}),
        }}

    def load(self, model, precision="fp32", anchors="auto"):
        device = dev.compute_device()
        dtype = dev.resolve_dtype(precision, device)
        if model == EMBEDDED_MTCNN:
            det = load_detector(EMBEDDED_MTCNN, device=device, dtype=dtype)
        else:
            det = load_detector(model, find_file("facedetection", model), device=device, dtype=dtype, anchors=anchors)
        return (manage_detector(det),)


def manage_detector(det):
    """The detector under ComfyUI's model management when hosted; its own `to` follows ComfyUI's moves (RetinaFace
    drops its fused inference copy and anchor cache, so no copy stays on the GPU after an eviction)."""
    return hm.manage(det, f"detector {det.name}", follow_moves=True)


class FaceDetectAlign:
    DESCRIPTION = ("Finds faces in every image of the batch, picks them (all / largest / center / index), and "
                   "warps each to the FFHQ 512 template. No face: an empty crop batch and count 0; the face "
                   "nodes then do nothing and Paste Back returns the images unchanged.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "FACE_ALIGNMENT", "INT", "STRING")
    RETURN_NAMES = ("face_crops", "alignment", "face_count", "faces_json")
    OUTPUT_TOOLTIPS = ("Aligned face crops, all faces of all images in one batch (an empty batch if there is none).",
                       "Face geometry for the paste-back node.", "Number of faces found.",
                       "Boxes, scores, landmarks and transforms as JSON.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Images to search for faces (any size; a batch is processed together)."}),
            "detector": ("FACE_DETECTOR", {"tooltip": "From the FaceMend face detector loader."}),
            "selection": (list(SELECTION_MODES), {"default": "all", "tooltip":
                          "Which faces per image: all, the largest, the one nearest the centre, or the one at "
                          "face_index (largest first)."}),
            "face_index": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
                           "With selection 'index': which face, counting from the largest (0)."}),
            "score_threshold": ("FLOAT", {"default": 0.8, "min": 0.05, "max": 1.0, "step": 0.01, "tooltip":
                                "Minimum detector confidence."}),
            "min_face_size": ("INT", {"default": 16, "min": 0, "max": 4096, "tooltip":
                              "Ignore faces whose box is smaller than this many pixels (shorter side)."}),
            "max_faces": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip":
                          "Keep at most this many faces per image, largest first (0 = no limit)."}),
            "crop_size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip":
                          "Size of the aligned crops. Restorers expect 512."}),
        }, "optional": {
            "detect_max_side": ("INT", {"default": 1600, "min": 0, "max": 16384, "tooltip":
                                "Detect on a copy whose longer side is at most this (0 = full size); crops are "
                                "still cut from the full-resolution image."}),
            "border": (list(BORDER_MODES), {"default": "constant", "tooltip":
                       "How crops are filled beyond the image edge: constant gray (as facexlib), reflect, edge."}),
            "interpolation": (list(INTERPOLATIONS), {"default": "bilinear", "tooltip":
                              "bilinear: as facexlib (the restorers' training crops). bicubic: sharper where a face "
                              "is enlarged into the crop (about 1 dB on small faces), for tuning/upscaling stages."}),
            "crop_geometry": (list(GEOMETRIES), {"default": "ffhq", "tooltip":
                              "ffhq: faces rotated and scaled onto the FFHQ template at crop_size (restorers need "
                              "this). native: unrotated, unscaled crops of the photo's own pixels centred on each "
                              "face, sized for the largest face (crop_size ignored): no resampling, for per-image "
                              "tuning (ZSSR) pasted into an upscaled image."}),
        }}

    def run(self, image, detector, selection="all", face_index=0, score_threshold=0.8, min_face_size=16,
            max_faces=0, crop_size=512, detect_max_side=1600, border="constant", interpolation="bilinear",
            crop_geometry="ffhq"):
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


class FacePasteBack:
    DESCRIPTION = ("Puts face crops (restored or not) back into the images they were detected in, through the "
                   "inverse of the alignment with a feathered mask. Also returns the blend mask.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "blend_mask")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The images the faces were detected in (may be resized or upscaled "
                                           "since; the faces follow)."}),
            "face_crops": ("IMAGE", {"tooltip": "One crop per detected face, same order (any square size)."}),
            "alignment": ("FACE_ALIGNMENT", {"tooltip": "From the detect + align node."}),
            "feather": ("FLOAT", {"default": 0.10, "min": 0.0, "max": 0.5, "step": 0.01, "tooltip":
                        "Width of the soft edge, as a fraction of the crop size."}),
            "margin": ("FLOAT", {"default": 0.04, "min": 0.0, "max": 0.45, "step": 0.01, "tooltip":
                       "Part of the crop border left out entirely, as a fraction of the crop size."}),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Optional: one mask per face crop (crop space, e.g. a face parsing "
                                         "mask) or one per image (image space) limiting where faces are pasted."}),
            "interpolation": (list(INTERPOLATIONS), {"default": "bilinear", "tooltip":
                              "bilinear: as facexlib. bicubic: sharper where crops are enlarged into the image "
                              "(big faces, upscaled images)."}),
        }}

    def run(self, image, face_crops, alignment: FaceAlignment, feather=0.10, margin=0.04, mask=None,
            interpolation="bilinear"):
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


NODES = {
    "FaceMend_DetectorLoader": (FaceDetectorLoader, "FaceMend Face Detector Loader"),
    "FaceMend_DetectAlign": (FaceDetectAlign, "FaceMend Detect + Align Faces"),
    "FaceMend_PasteBack": (FacePasteBack, "FaceMend Paste Faces Back"),
}
