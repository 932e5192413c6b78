"""Choosing and loading a face detector by name: the embedded MTCNN, or a RetinaFace checkpoint file."""
from __future__ import annotations

import os

import torch

EMBEDDED_MTCNN = "mtcnn (embedded)"
ANCHOR_CHOICES = ("auto", "facexlib", "1mb")

_cache: dict = {}


def load_detector(name: str, path: str | None = None, device="cpu", dtype=torch.float32, anchors: str = "auto"):
    """EMBEDDED_MTCNN (weights from the `mtcnn` package) or a RetinaFace file at `path`.

    Loaded detectors are cached per (file, modification time, device, dtype, anchors), so re-running a
    graph or a folder of images does not reload them.
    """
    device = torch.device(device)
    if name in (EMBEDDED_MTCNN, "mtcnn"):
        key = ("mtcnn", str(device), dtype)
        if key not in _cache:
            from .mtcnn import MTCNNDetector
            _cache[key] = MTCNNDetector.load(device=device, dtype=dtype)
        return _cache[key]
    if path is None:
        raise ValueError(f"detector {name!r} needs a file path")
    key = (os.path.abspath(path), os.path.getmtime(path), str(device), dtype, anchors)
    if key not in _cache:
        from .retinaface import RetinaFaceDetector
        _cache[key] = RetinaFaceDetector.from_file(path, device=device, dtype=dtype, anchors=anchors)
    return _cache[key]


def clear_cache() -> None:
    _cache.clear()
