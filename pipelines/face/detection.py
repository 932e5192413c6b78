"""Detector-independent parts of face detection: the result layout, pure-torch NMS, resizing for
detection and face selection.

Every detector returns, per image, a float tensor [K, 15] on the compute device:
    x1, y1, x2, y2, score, then 5 landmarks (x, y) in the order
    left eye, right eye, nose, left mouth corner, right mouth corner (as seen in the image),
in pixel coordinates of the image it was given.
"""
from __future__ import annotations

import math
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

SELECTION_MODES = ("all", "largest", "center", "index")


class FaceDetector(Protocol):
    name: str

    def detect(self, images: torch.Tensor, score_threshold: float) -> list[torch.Tensor]:
        """images: [B,3,H,W] RGB float in [0,1] on the detector's device -> per image [K,15]."""


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix between boxes [N,4] and [M,4] (x1,y1,x2,y2), with facexlib's +1 pixel convention off."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, plus_one: bool = False) -> torch.Tensor:
    """Greedy NMS in pure torch (no torchvision op, works on every device). Returns kept indices,
    highest score first. plus_one=True uses the (x2-x1+1) area convention of py_cpu_nms (facexlib)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True)
    b = boxes[order].float()
    if plus_one:
        b = b.clone()
        b[:, 2:] += 1
    iou = box_iou(b, b)
    n = b.shape[0]
    # The suppression pass needs sequential decisions; it runs over a small [n,n] matrix on the host.
    iou_cpu = (iou > iou_threshold).cpu()
    keep = torch.ones(n, dtype=torch.bool)
    for i in range(n):
        if keep[i]:
            suppress = iou_cpu[i].clone()
            suppress[: i + 1] = False
            keep &= ~suppress
    return order[keep.to(order.device)]


def resize_for_detection(images: torch.Tensor, max_side: int) -> tuple[torch.Tensor, float]:
    """Downscale (antialiased) so the longer side is at most max_side; returns (images, scale) where
    detections on the result are divided by `scale` to get original pixel coordinates."""
    h, w = images.shape[-2:]
    if max_side <= 0 or max(h, w) <= max_side:
        return images, 1.0
    scale = max_side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = F.interpolate(images, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    return out, scale


def rescale_detections(dets: list[torch.Tensor], scale_x: float, scale_y: float | None = None) -> list[torch.Tensor]:
    if scale_y is None:
        scale_y = scale_x
    out = []
    for d in dets:
        d = d.clone()
        d[:, [0, 2, 5, 7, 9, 11, 13]] /= scale_x
        d[:, [1, 3, 6, 8, 10, 12, 14]] /= scale_y
        out.append(d)
    return out


def select_faces(
    dets: torch.Tensor,
    image_hw: Sequence[int],
    mode: str = "all",
    index: int = 0,
    min_size: float = 0.0,
    min_score: float = 0.0,
    max_faces: int = 0,
) -> torch.Tensor:
    """Filter and order one image's detections [K,15].

    Faces are ordered largest first (stable, deterministic). `min_size` is the minimum of box width/height
    in pixels; `mode`: all | largest (one) | center (the one closest to the image centre) | index (the
    `index`-th in largest-first order, nothing if out of range); `max_faces` > 0 caps the count afterwards.
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"face selection must be one of {SELECTION_MODES}, got {mode!r}")
    if dets.numel() == 0:
        return dets.reshape(0, 15)
    wh = dets[:, 2:4] - dets[:, 0:2]
    keep = (wh.min(dim=1).values >= min_size) & (dets[:, 4] >= min_score)
    dets = dets[keep]
    if dets.shape[0] == 0:
        return dets
    area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
    # Sort by area descending; ties broken by x then y for determinism: stable sorts from the last key to the
    # first, on the device (a per-face float() would wait for the device once per face).
    order = torch.arange(dets.shape[0], device=dets.device)
    for key in (dets[:, 1], dets[:, 0], -area):
        order = order[torch.sort(key[order], stable=True).indices]
    dets = dets[order]
    if mode == "largest":
        dets = dets[:1]
    elif mode == "center":
        h, w = image_hw
        centre = dets.new_tensor([w / 2.0, h / 2.0])
        c = (dets[:, 0:2] + dets[:, 2:4]) / 2
        dets = dets[torch.argmin(((c - centre) ** 2).sum(1)).reshape(1)]
    elif mode == "index":
        dets = dets[index: index + 1] if 0 <= index < dets.shape[0] else dets[:0]
    if max_faces > 0:
        dets = dets[:max_faces]
    return dets


def eye_distance(dets: torch.Tensor) -> torch.Tensor:
    return torch.linalg.norm(dets[:, 5:7] - dets[:, 7:9], dim=1)


def ceil_div(a: int, b: int) -> int:
    return int(math.ceil(a / b))
