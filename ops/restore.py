"""Face restorer loader and restore (GFPGAN v1.3/v1.4, CodeFormer, RestoreFormer(++), GPEN): what the nodes
FaceMend_RestorerLoader and FaceMend_RestoreFaces compute."""
from __future__ import annotations

import os

from ..host import device as dev
from ..host import models as hm
from ..host.model_paths import find_file, list_files
from .common import bchw_to_image, empty_faces, image_to_bchw, no_faces

FOLDER = "facerestore_models"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_cache: dict = {}


def restorer_files() -> list[str]:
    """The loader's choices: restorer files found in facerestore_models/ (a default name when there is none, so the
    node still shows; running it then names the missing file)."""
    return list_files(FOLDER) or ["GFPGANv1.4.pth"]


def load_restorer(name: str, precision: str = "auto"):
    """Resolve `name` in facerestore_models/ and load it (cached per file, mtime, device and dtype)."""
    from ..pipelines.restore.restorer import FaceRestorer

    path = find_file(FOLDER, name)
    device = dev.compute_device()
    dtype = dev.resolve_dtype(precision, device)
    key = (os.path.abspath(path), os.path.getmtime(path), str(device), dtype)
    if key not in _cache:
        hm.unload(*_cache.values())
        _cache.clear()  # one restorer resident at a time: they are hundreds of MB each
        dev.free_memory(600 * 1024 ** 2, device)
        restorer = FaceRestorer.from_file(path, device=device, dtype=dtype)
        _cache[key] = hm.manage(restorer, f"FaceRestorer {os.path.basename(path)}")
    return _cache[key]


def restore_faces(face_crops, restorer, visibility=1.0, fidelity=0.5, batch_size=0, seed=0):
    """IMAGE of aligned crops -> (restored IMAGE,), same size and order; an empty batch passes through."""
    if no_faces(face_crops):  # Detect + Align found no face
        return (empty_faces(face_crops),)
    with hm.on_device(restorer):
        x = image_to_bchw(face_crops, restorer.device, "face crops")
        progress = dev.Progress(x.shape[0])
        hook = dev.step_hook(progress)
        dev.check_interrupt()
        out = restorer(x, visibility=visibility, fidelity=fidelity, batch_size=batch_size, seed=seed,
                       callback=hook)
    return (bchw_to_image(out),)


# Node id -> what it computes (keyword arguments = the node's inputs; returns the node's outputs as a tuple).
OPS = {
    "FaceMend_RestorerLoader": lambda model, precision="auto": (load_restorer(model, precision),),
    "FaceMend_RestoreFaces": restore_faces,
}
