"""V3 nodes: face detector loader, detect + align, paste back. What they compute is ops/face.py."""
from __future__ import annotations

import torch

from ..host import device as dev
from ..host.model_paths import find_optional_file
from ..ops import face as op
from ..pipelines.face.align import GEOMETRIES
from ..pipelines.face.detection import SELECTION_MODES
from ..pipelines.face.detectors import ANCHOR_CHOICES, EMBEDDED_MTCNN
from ..pipelines.face.geometry import BORDER_MODES, INTERPOLATIONS
from ..pipelines.io.errors import ModelFileNotFound
from ..pipelines.io.images import side_by_side
from .api import PREVIEW_MAX, CATEGORY, FaceAlignment, FaceDetector, combo_problem, file_fingerprint, io, preview

PREVIEW_SIDE = 512  # each half of Paste Back's before/after preview, longer side


class FaceDetectorLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_DetectorLoader", display_name="FaceMend Face Detector Loader", category=CATEGORY,
            description=("Loads a face detector: the embedded MTCNN (no download; weights come with the `mtcnn` "
                         "package) or a RetinaFace checkpoint from models/facedetection/ (facexlib's files)."),
            inputs=[
                io.Combo.Input("model", options=op.detector_files(), default=EMBEDDED_MTCNN, tooltip=(
                    "Detector. 'mtcnn (embedded)' needs no file; RetinaFace files (detection_Resnet50_Final.pth, "
                    "detection_mobilenet0.25_Final.pth) go in models/facedetection/.")),
                io.Combo.Input("precision", options=list(op.PRECISIONS), default="fp32", tooltip=(
                    "Detector weights precision. fp32 is exact and detection is cheap; fp16 saves GPU time.")),
                io.Combo.Input("anchors", options=list(ANCHOR_CHOICES), default="auto", optional=True, tooltip=(
                    "RetinaFace anchor configuration: auto (from the file), facexlib, or 1mb "
                    "(biubug6 Face-Detector-1MB training).")),
            ],
            outputs=[FaceDetector.Output(display_name="detector")],
        )

    @classmethod
    def validate_inputs(cls, model=None, precision=None, anchors=None):
        # Before the run, not in the middle of it: a missing file (or `mtcnn` package) named with where to get it,
        # a value that is not a choice (detector_problem checks the list too). None: linked, nothing to check.
        return (combo_problem(cls, precision=precision, anchors=anchors)
                or (model is not None and op.detector_problem(model)) or True)

    @classmethod
    def fingerprint_inputs(cls, model, precision="fp32", anchors="auto"):
        # The same file name with new weights in it loads again; an unchanged file is not re-read.
        if model == EMBEDDED_MTCNN:
            return (model, precision)
        try:
            path = find_optional_file(op.FOLDER, model)
        except ModelFileNotFound:  # a name outside the folders: validate_inputs refuses it
            path = None
        return (file_fingerprint(path), precision, anchors)

    @classmethod
    def execute(cls, model, precision="fp32", anchors="auto") -> io.NodeOutput:
        return io.NodeOutput(op.load_face_detector(model, precision, anchors))


class FaceDetectAlign(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_DetectAlign", display_name="FaceMend Detect + Align Faces", category=CATEGORY,
            description=("Finds faces in every image of the batch, picks them (all / largest / center / index), and "
                         "warps each to the FFHQ 512 template. No face: an empty crop batch and count 0; the face "
                         "nodes then do nothing and Paste Back returns the images unchanged."),
            inputs=[
                io.Image.Input("image", tooltip=(
                    "Images to search for faces (any size; a batch is processed together).")),
                FaceDetector.Input("detector", tooltip="From the FaceMend face detector loader."),
                io.Combo.Input("selection", options=list(SELECTION_MODES), default="all", tooltip=(
                    "Which faces per image: all, the largest, the one nearest the centre, or the one at "
                    "face_index (largest first).")),
                io.Int.Input("face_index", default=0, min=0, max=1000, tooltip=(
                    "With selection 'index': which face, counting from the largest (0).")),
                io.Float.Input("score_threshold", default=0.8, min=0.05, max=1.0, step=0.01,
                               tooltip="Minimum detector confidence."),
                io.Int.Input("min_face_size", default=16, min=0, max=4096, tooltip=(
                    "Ignore faces whose box is smaller than this many pixels (shorter side).")),
                io.Int.Input("max_faces", default=0, min=0, max=1000, tooltip=(
                    "Keep at most this many faces per image, largest first (0 = no limit).")),
                io.Int.Input("crop_size", default=512, min=64, max=2048, step=8, tooltip=(
                    "Size of the aligned crops. Restorers expect 512.")),
                io.Int.Input("detect_max_side", default=1600, min=0, max=16384, optional=True, tooltip=(
                    "Detect on a copy whose longer side is at most this (0 = full size); crops are "
                    "still cut from the full-resolution image.")),
                io.Combo.Input("border", options=list(BORDER_MODES), default="constant", optional=True, tooltip=(
                    "How crops are filled beyond the image edge: constant gray (as facexlib), reflect, edge.")),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="bilinear", optional=True,
                               tooltip=(
                    "bilinear: as facexlib (the restorers' training crops). bicubic: sharper where a face "
                    "is enlarged into the crop (about 1 dB on small faces), for tuning/upscaling stages.")),
                io.Combo.Input("crop_geometry", options=list(GEOMETRIES), default="ffhq", optional=True, tooltip=(
                    "ffhq: faces rotated and scaled onto the FFHQ template at crop_size (restorers need "
                    "this). native: unrotated, unscaled crops of the photo's own pixels centred on each "
                    "face, sized for the largest face (crop_size ignored): no resampling, for per-image "
                    "tuning (ZSSR) pasted into an upscaled image.")),
            ],
            outputs=[
                io.Image.Output(display_name="face_crops", tooltip=(
                    "Aligned face crops, all faces of all images in one batch (an empty batch if there is none).")),
                FaceAlignment.Output(display_name="alignment", tooltip="Face geometry for the paste-back node."),
                io.Int.Output(display_name="face_count", tooltip="Number of faces found."),
                io.String.Output(display_name="faces_json", tooltip="Boxes, scores, landmarks and transforms as JSON."),
            ],
        )

    @classmethod
    def validate_inputs(cls, selection=None, border=None, interpolation=None, crop_geometry=None):
        # A value that is not a choice (a stale saved workflow) is refused when queued, not in the middle of the run.
        return combo_problem(cls, selection=selection, border=border, interpolation=interpolation,
                             crop_geometry=crop_geometry) or True

    @classmethod
    def execute(cls, image, detector, selection="all", face_index=0, score_threshold=0.8, min_face_size=16,
                max_faces=0, crop_size=512, detect_max_side=1600, border="constant", interpolation="bilinear",
                crop_geometry="ffhq") -> io.NodeOutput:
        out = op.detect_align(image, detector, selection, face_index, score_threshold, min_face_size, max_faces,
                              crop_size, detect_max_side, border, interpolation, crop_geometry)
        # The crops on the node: what the detector found and how they were aligned (nothing when no face).
        return io.NodeOutput(*out, ui=preview(out[0][:PREVIEW_MAX], cls))


def before_after(before: torch.Tensor, after: torch.Tensor, side: int = PREVIEW_SIDE,
                 limit: int = PREVIEW_MAX) -> torch.Tensor:
    """IMAGE pairs -> IMAGE [B,h,2w+gap,3] of labelled 'before | after' halves (the first `limit` pairs), each
    downscaled to `side` first (a batch of big photos costs no full-size copy)."""
    if before.ndim == 3:  # an unbatched image, as some nodes emit
        before = before[None]
    if before.shape[-1] == 1:  # grayscale
        before = before.expand(*before.shape[:-1], 3)
    pairs = []
    for i in range(min(before.shape[0], after.shape[0], limit)):
        b, a = (dev.preview_image(x[i:i + 1], side)[0].permute(2, 0, 1) for x in (before, after))
        pairs.append(side_by_side(b, a, labels=("before", "after")).permute(1, 2, 0)[None])
    return torch.cat(pairs) if pairs else torch.zeros(0, 1, 1, 3)


class FacePasteBack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_PasteBack", display_name="FaceMend Paste Faces Back", category=CATEGORY,
            description=("Puts face crops (restored or not) back into the images they were detected in, through the "
                         "inverse of the alignment with a feathered mask. Also returns the blend mask."),
            inputs=[
                io.Image.Input("image", tooltip=(
                    "The images the faces were detected in (may be resized or upscaled since; the faces follow).")),
                io.Image.Input("face_crops", tooltip="One crop per detected face, same order (any square size)."),
                FaceAlignment.Input("alignment", tooltip="From the detect + align node."),
                io.Float.Input("feather", default=0.10, min=0.0, max=0.5, step=0.01, tooltip=(
                    "Width of the soft edge, as a fraction of the crop size.")),
                io.Float.Input("margin", default=0.04, min=0.0, max=0.45, step=0.01, tooltip=(
                    "Part of the crop border left out entirely, as a fraction of the crop size.")),
                io.Mask.Input("mask", optional=True, tooltip=(
                    "Optional: one mask per face crop (crop space, e.g. a face parsing "
                    "mask) or one per image (image space) limiting where faces are pasted.")),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="bilinear", optional=True,
                               tooltip=(
                    "bilinear: as facexlib. bicubic: sharper where crops are enlarged into the image "
                    "(big faces, upscaled images).")),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Mask.Output(display_name="blend_mask")],
        )

    @classmethod
    def validate_inputs(cls, interpolation=None):
        return combo_problem(cls, interpolation=interpolation) or True

    @classmethod
    def execute(cls, image, face_crops, alignment, feather=0.10, margin=0.04, mask=None,
                interpolation="bilinear") -> io.NodeOutput:
        out, blend = op.paste_back(image, face_crops, alignment, feather, margin, mask, interpolation)
        # Each photo before | after, downscaled: the change at a glance on the node.
        pairs = before_after(image, out)
        return io.NodeOutput(out, blend, ui=preview(pairs, cls, max_side=max(pairs.shape[1:3])))


NODES = [FaceDetectorLoader, FaceDetectAlign, FacePasteBack]
