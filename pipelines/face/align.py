"""Detect -> select -> align for a batch of images. The result is the crops and a FaceAlignment that
the paste-back stage needs to put the (restored) crops back."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .detection import resize_for_detection, rescale_detections, select_faces
from .geometry import (BORDER_GRAY_RGB, affine_scale, face_template, fit_similarity, invert_affine,
                            warp_to_crops)
from ..io.images import check_images
from ..io.memory import run_halving


@dataclass
class FaceAlignment:
    """Geometry of N faces found in a batch of B images (kept on the CPU; it is tiny).

    image_index [N] long: source image of each face; affine [N,2,3]: image -> crop pixel map;
    inverse [N,2,3]: crop -> image; boxes [N,4]; landmarks [N,5,2]; scores [N]; crop_size S;
    image_sizes: (H,W) of each source image, so paste-back can check and rescale its background.
    """
    image_index: torch.Tensor
    affine: torch.Tensor
    inverse: torch.Tensor
    boxes: torch.Tensor
    landmarks: torch.Tensor
    scores: torch.Tensor
    crop_size: int
    image_sizes: list = field(default_factory=list)
    detector: str = ""

    def __len__(self) -> int:
        return int(self.image_index.numel())

    @classmethod
    def empty(cls, image_sizes, crop_size: int, detector: str = "") -> "FaceAlignment":
        z = torch.zeros
        return cls(z(0, dtype=torch.long), z(0, 2, 3), z(0, 2, 3), z(0, 4), z(0, 5, 2), z(0), crop_size,
                   list(image_sizes), detector)

    def faces_of(self, image: int) -> torch.Tensor:
        return (self.image_index == image).nonzero().flatten()

    def counts(self) -> list[int]:
        return [int((self.image_index == b).sum()) for b in range(len(self.image_sizes))]

    def select(self, indices) -> "FaceAlignment":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return FaceAlignment(self.image_index[idx], self.affine[idx], self.inverse[idx], self.boxes[idx],
                             self.landmarks[idx], self.scores[idx], self.crop_size, list(self.image_sizes),
                             self.detector)

    def to_dict(self) -> dict:
        return {
            "detector": self.detector, "crop_size": self.crop_size,
            "image_sizes": [list(s) for s in self.image_sizes],
            "faces": [{"image": int(self.image_index[i]),
                       "box": [round(float(v), 2) for v in self.boxes[i]],
                       "score": round(float(self.scores[i]), 4),
                       "landmarks": [[round(float(v), 2) for v in p] for p in self.landmarks[i]],
                       "affine": [[round(float(v), 6) for v in r] for r in self.affine[i]]}
                      for i in range(len(self))],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


GEOMETRIES = ("ffhq", "native")
NATIVE_CROP_RANGE = (64, 1024)


def native_crop_size(detections: list[torch.Tensor], multiple: int = 8, limits=NATIVE_CROP_RANGE) -> int:
    """The crop size whose FFHQ-template crop of the largest selected face samples it at its own resolution
    (one image pixel per crop pixel), rounded up to `multiple` and clamped to `limits`."""
    lms = [d[:, 5:15].reshape(-1, 5, 2).float().cpu() for d in detections if d.shape[0]]
    if not lms:
        return limits[1]
    scale_512 = affine_scale(fit_similarity(torch.cat(lms), face_template(512)))
    size = 512.0 / float(scale_512.min())
    return int(min(max(-(-size // multiple) * multiple, limits[0]), limits[1]))


def _native_affines(landmarks: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Pure integer translations: a crop_size square of the image's own pixels centred where the FFHQ crop of
    each face is centred. Crops are exact pixel copies, and a crop enlarged k times pastes onto the k-times
    upscaled image on its pixel grid, with no resampling at all."""
    sim = fit_similarity(landmarks, face_template(crop_size)).double()
    centre = torch.full((landmarks.shape[0], 2, 1), (crop_size - 1) / 2, dtype=torch.float64)
    inv = invert_affine(sim)
    c = (inv[:, :, :2] @ centre)[..., 0] + inv[:, :, 2]
    origin = torch.round(c - (crop_size - 1) / 2)
    affine = torch.zeros_like(sim)
    affine[:, 0, 0] = affine[:, 1, 1] = 1
    affine[:, :, 2] = -origin
    return affine.to(torch.float32)


def align_faces(images: torch.Tensor, detections: list[torch.Tensor], crop_size: int = 512,
                border: str = "constant", border_value=BORDER_GRAY_RGB, detector: str = "",
                interpolation: str = "bilinear", geometry: str = "ffhq"):
    """Crops and FaceAlignment for already selected detections (per image [K,15]).
    geometry "ffhq": rotated and scaled onto the FFHQ template (what restorers expect); "native": unrotated,
    unscaled crops of the image's own pixels centred on the face (for stages that learn from the photo itself,
    e.g. ZSSR, then pasted into an upscaled image)."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    sizes = [(int(images.shape[2]), int(images.shape[3]))] * images.shape[0]
    dets = [d.float().cpu() for d in detections]
    if sum(d.shape[0] for d in dets) == 0:
        return images[:0].new_empty((0, images.shape[1], crop_size, crop_size)), \
            FaceAlignment.empty(sizes, crop_size, detector)
    allf = torch.cat(dets)
    index = torch.cat([torch.full((d.shape[0],), b, dtype=torch.long) for b, d in enumerate(dets)])
    landmarks = allf[:, 5:15].reshape(-1, 5, 2)
    affine = _native_affines(landmarks, crop_size) if geometry == "native" else \
        fit_similarity(landmarks, face_template(crop_size))
    alignment = FaceAlignment(index, affine, invert_affine(affine), allf[:, :4].clone(), landmarks,
                              allf[:, 4].clone(), crop_size, sizes, detector)
    crops = warp_to_crops(images, index, affine, crop_size, border=border, border_value=border_value,
                          interpolation=interpolation)
    if geometry == "native":  # bit-exact copies where the crop lies inside its image (the grid is float32)
        h, w = images.shape[-2:]
        for k, (x0, y0) in enumerate((-affine[:, :, 2]).round().long().tolist()):
            if x0 >= 0 and y0 >= 0 and x0 + crop_size <= w and y0 + crop_size <= h:
                crops[k] = images[int(index[k]), :, y0:y0 + crop_size, x0:x0 + crop_size]
    return crops, alignment


def detect_faces(images: torch.Tensor, detector, score_threshold: float = 0.8, detect_max_side: int = 0,
                 chunk: int = 8, hook=None) -> list[torch.Tensor]:
    """Run `detector` over a [B,3,H,W] batch in chunks of `chunk` images (hook(n) after each chunk:
    progress and interruption); a chunk that runs out of memory runs again with half as many images, down to
    one. detect_max_side > 0 runs the detector on a copy downscaled so its longer side is at most that
    (detection does not need 24 MP) and maps the results back."""
    def run(start: int, stop: int) -> list[torch.Tensor]:
        part = images[start:stop]
        small, scale = resize_for_detection(part, detect_max_side) if detect_max_side else (part, 1.0)
        found = detector.detect(small, score_threshold=score_threshold)
        found = rescale_detections(found, scale) if scale != 1.0 else found
        if hook is not None:
            hook(part.shape[0])
        return found

    return [d for found in run_halving(images.shape[0], max(1, chunk), run, device=images.device) for d in found]


def detect_and_align(images: torch.Tensor, detector, *, score_threshold: float = 0.8, mode: str = "all",
                     index: int = 0, min_size: float = 0.0, max_faces: int = 0, crop_size: int = 512,
                     detect_max_side: int = 0, border: str = "constant", chunk: int = 8, hook=None,
                     interpolation: str = "bilinear", geometry: str = "ffhq"):
    """Detect faces in a [B,3,H,W] batch, select per image, and align them to the FFHQ template.
    Crops are cut from the full-resolution images; crop_size 0 = native_crop_size of the selected faces;
    geometry as align_faces.
    Returns (crops [N,3,S,S], FaceAlignment, selected detections per image)."""
    images = check_images(images)
    dets = detect_faces(images, detector, score_threshold, detect_max_side, chunk, hook)
    dets = [select_faces(d, images.shape[-2:], mode=mode, index=index, min_size=min_size,
                         min_score=score_threshold, max_faces=max_faces) for d in dets]
    if crop_size == 0:
        crop_size = native_crop_size(dets)
    crops, alignment = align_faces(images, dets, crop_size, border=border,
                                   detector=getattr(detector, "name", type(detector).__name__),
                                   interpolation=interpolation, geometry=geometry)
    return crops, alignment, dets
