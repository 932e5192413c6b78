"""Nodes: face restorer loader and restore (GFPGAN v1.3/v1.4, CodeFormer, RestoreFormer(++), GPEN)."""
from __future__ import annotations

import os

from ..host import device as dev
from ..host import models as hm
from ..host.model_paths import find_file, list_files
from .common import CATEGORY, bchw_to_image, empty_faces, image_to_bchw, no_faces

_cache: dict = {}


def load_restorer(name: str, precision: str = "auto"):
    """Resolve `name` in facerestore_models/ and load it (cached per file, mtime, device and dtype)."""
    from ..pipelines.restore.restorer import FaceRestorer

    path = find_file("facerestore_models", name)
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


class FaceRestorerLoader:
    DESCRIPTION = ("Loads a face restorer from models/facerestore_models/: GFPGAN v1.3 / v1.4, CodeFormer, "
                   "RestoreFormer / RestoreFormer++ (.ckpt), GPEN-BFR 256/512/1024/2048, in .pth/.ckpt or "
                   ".safetensors; the architecture is recognised from the weights.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FACE_RESTORER",)
    RETURN_NAMES = ("restorer",)

    @classmethod
    def INPUT_TYPES(cls):
        files = list_files("facerestore_models") or ["GFPGANv1.4.pth"]
        return {"required": {
            "model": (files, {"tooltip": "Restorer weights in models/facerestore_models/ (e.g. GFPGANv1.4.pth, codeformer.pth, "
                      "RestoreFormer++.ckpt, GPEN-BFR-512.pth)."}),
            "precision": (["auto", "fp32", "fp16", "bf16"], {"default": "auto", "tooltip":
                          "auto: fp16 on GPUs that support it, fp32 on CPU. GFPGAN in fp16 stays within 1/255 "
                          "of fp32 on most pixels."}),
        }}

    def load(self, model, precision="auto"):
        return (load_restorer(model, precision),)


class RestoreFaces:
    DESCRIPTION = ("Restores aligned face crops (from Detect + Align) in batches on the GPU. Output has the same "
                   "size and order as the input, so Paste Back can put the faces back.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("restored_faces",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_crops": ("IMAGE", {"tooltip": "Aligned faces (512x512 for GFPGAN/CodeFormer/RestoreFormer, the "
                                                "model's size for GPEN; other sizes are resized in and back out)."}),
            "restorer": ("FACE_RESTORER", {"tooltip": "From the FaceMend face restorer loader."}),
            "visibility": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                           "Blend of restored (1) and input (0) faces."}),
            "fidelity": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                         "CodeFormer's w: higher keeps more of the input's identity. Ignored by GFPGAN."}),
            "batch_size": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip":
                           "Faces per network call; halved automatically on out-of-memory. 0 = automatic: 8 on "
                           "a GPU, 1 on a CPU (batching is no faster there and multiplies memory)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip":
                     "Seed of GFPGAN's noise inputs (the official code draws them at random every run)."}),
        }}

    def run(self, face_crops, restorer, visibility=1.0, fidelity=0.5, batch_size=0, seed=0):
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


NODES = {
    "FaceMend_RestorerLoader": (FaceRestorerLoader, "FaceMend Face Restorer Loader"),
    "FaceMend_RestoreFaces": (RestoreFaces, "FaceMend Restore Faces"),
}
