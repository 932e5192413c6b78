"""The reference identity RestorerID conditions on, from photos of the person, with our own detectors.

The official inference (scripts/Inference.py) runs insightface's buffalo_l on the BGR reference and takes
faces[0]: its L2-normalised ArcFace embedding (512) and `norm_crop(img, kps, 224)`, the 5-point ArcFace template
crop at 224 px. That crop (still BGR) goes through CLIPImageProcessor as if it were RGB - the channel order the
FaceID-Plus weights were used with - so we reproduce it: the crop's channels are reversed before the CLIP
normalisation (`BGR_QUIRK`). Here the landmarks come from the pack's detectors (MTCNN / RetinaFace) and the
embedding from the FACE_ID ArcFace model; with several faces in a photo the largest is used (insightface would
take its first detection), and the report says so.

Several photos of the same person: the mean of their normalised ArcFace embeddings (not re-normalised, as
IP-Adapter FaceID does with several faces) and the mean of their CLIP features.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..face.detection import select_faces
from ..io.errors import FaceMendError, InvalidImage
from ..face.geometry import fit_similarity, warp_to_crops
from ..quality.id_similarity import ARCFACE_TEMPLATE_112, INPUT_SIZE

CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP (CLIPImageProcessor defaults)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BGR_QUIRK = True


@dataclass
class Reference:
    id_embed: torch.Tensor        # [1, 512]: mean of the normalised ArcFace embeddings
    clip_pixels: torch.Tensor     # [R, 3, 224, 224]: CLIP inputs of each reference face (normalised)
    report: list = field(default_factory=list)


def arcface_template(size: int) -> torch.Tensor:
    """insightface's norm_crop template (arcface_dst) for a square crop of `size` (a multiple of 112 or 128)."""
    if size % 112 == 0:
        ratio, dx = size / 112.0, 0.0
    else:
        ratio = size / 128.0
        dx = 8.0 * ratio
    t = torch.tensor(ARCFACE_TEMPLATE_112, dtype=torch.float32) * ratio
    t[:, 0] += dx
    return t


def norm_crop(images: torch.Tensor, index: torch.Tensor, landmarks: torch.Tensor, size: int) -> torch.Tensor:
    """Similarity warp of each face (its 5 landmarks) onto the ArcFace template at `size`, bilinear, black
    border (cv2.warpAffine as insightface calls it), quantised to 8 bits like its uint8 crop."""
    affine = fit_similarity(landmarks.float().cpu(), arcface_template(size)).to(images.device)
    crops = warp_to_crops(images.float(), index, affine, size, border="constant", border_value=(0.0, 0.0, 0.0),
                          antialias=False)
    return (crops.clamp(0, 1) * 255).round() / 255


def clip_pixels(crops224: torch.Tensor, bgr_quirk: bool = BGR_QUIRK) -> torch.Tensor:
    """[N,3,224,224] RGB in [0,1] -> CLIPImageProcessor's pixel_values (resize/centre-crop are no-ops at 224)."""
    x = crops224.flip(1) if bgr_quirk else crops224
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def find_reference_faces(images: torch.Tensor, detector, score_threshold: float = 0.5) -> tuple[torch.Tensor, list]:
    """Largest face of each reference photo: (landmarks [R,5,2], report). A photo with no face is an error."""
    dets = detector.detect(images, score_threshold=score_threshold)
    marks, report = [], []
    for i, d in enumerate(dets):
        if d.shape[0] == 0:
            raise InvalidImage(f"reference photo {i + 1} of {len(dets)} has no face the detector finds (score "
                               f">= {score_threshold}): use a clear, front-facing photo of the person, or lower the "
                               "score threshold.")
        best = select_faces(d, images.shape[-2:], mode="largest")
        entry = {"reference": i, "faces_found": int(d.shape[0]),
                 "box": [round(float(v), 1) for v in best[0, :4]], "score": round(float(best[0, 4]), 4)}
        if d.shape[0] > 1:
            entry["note"] = f"{int(d.shape[0])} faces in this photo: the largest was used"
        report.append(entry)
        marks.append(best[0, 5:15].reshape(5, 2))
    return torch.stack(marks), report


def reference_identity(images: torch.Tensor, detector, arcface, score_threshold: float = 0.5) -> Reference:
    """images [R,3,H,W] RGB in [0,1] (one or more photos of the person; same size, or pass them one by one and
    use combine()). arcface: the FACE_ID model (embed([N,3,112,112]) -> [N,D] unit vectors)."""
    if getattr(arcface, "name", "") == "adaface":  # another embedding space than the one the tokens learnt
        raise FaceMendError("RestorerID needs an ArcFace model (insightface w600k_r50.onnx: IP-Adapter-FaceID was "
                            "trained on its embeddings); AdaFace (adaface_ir50_ms1mv2.ckpt) is for ID similarity "
                            "and the NTIRE gate only. Load w600k_r50.onnx in the ID model loader for RestorerID.")
    landmarks, report = find_reference_faces(images, detector, score_threshold)
    idx = torch.arange(images.shape[0], device=images.device)
    emb = arcface.embed(norm_crop(images, idx, landmarks, INPUT_SIZE))
    emb = torch.nn.functional.normalize(emb.float(), dim=1)
    return Reference(emb.mean(0, keepdim=True), clip_pixels(norm_crop(images, idx, landmarks, CLIP_SIZE)), report)


def combine(refs: list) -> Reference:
    """Several references (e.g. photos of different sizes) -> one: the mean over all reference faces."""
    n = [r.clip_pixels.shape[0] for r in refs]
    emb = sum(r.id_embed * k for r, k in zip(refs, n)) / sum(n)
    return Reference(emb, torch.cat([r.clip_pixels for r in refs]), [e for r in refs for e in r.report])
