"""RestorerID loader, adaptive ID scale and restoration from a reference photo: what the nodes
FaceMend_RestorerIDLoader, FaceMend_AdaptiveIDScale and FaceMend_RestorerIDRestore compute."""
from __future__ import annotations

import json
import os
import time

import torch

from ..host import device as dev
from ..host import models as hm
from ..host.model_paths import find_dir, find_optional_file, list_dirs, list_files, missing_file_message
from ..pipelines.io.errors import ModelFileNotFound
from .common import bchw_to_image, empty_faces, image_to_bchw, no_faces

DEFAULT_CKPT = "RestorerIDFull.ckpt"
DEFAULT_IP_ADAPTER = "ip-adapter-faceid-plus_sd15.bin"
DEFAULT_CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_TEXT_ENCODER = "stable-diffusion-v1-5"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SCALE_MODES = ("auto", "adaptive", "fixed")
COLOR_FIXES = ("none", "wavelet", "adain")
FIXED_ID_SCALE = 0.75  # the scale RestorerID was trained with
DEFAULT_PROMPT = "best quality, high quality"
DEFAULT_NEGATIVE_PROMPT = "cartoon, 3d, paint, monochrome, lowres, bad anatomy, worst quality, low quality"
SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")
_cache: dict = {}
ACTIVATION_BYTES = 2 * 1024 ** 3  # what the sampler needs besides the weights (memory asked of ComfyUI)


def _choices(names, default) -> list[str]:
    # The default is always offered, so a fresh install shows the node; running it then names the missing file.
    return sorted(set(names) | {default})


def checkpoint_files() -> list[str]:
    return _choices(list_files("restorer_id"), DEFAULT_CKPT)


def ip_adapter_files() -> list[str]:
    return _choices(list_files("ipadapter"), DEFAULT_IP_ADAPTER)


def clip_vision_sources() -> list[str]:
    return _choices(list_dirs("clip_vision") + list_files("clip_vision"), DEFAULT_CLIP_VISION)


def text_encoder_sources() -> list[str]:
    return _choices(list_dirs("diffusers") + list_files("checkpoints"), DEFAULT_TEXT_ENCODER)


def default_musiq():
    """(MUSIQ metric, None) when its weights are in models/facemend_iqa/, else (None, why). Only a missing file
    is tolerated (the caller then uses a fixed scale and says so); weights that are there but fail to load raise."""
    from .quality import open_metric  # lazy: ops/quality.py is the quality stage's (migrated in its own branch)

    try:
        return open_metric("musiq"), None
    except ModelFileNotFound as exc:
        return None, f"no MUSIQ weights ({str(exc).splitlines()[0]})"


def locate_sources(checkpoint=DEFAULT_CKPT, ip_adapter=DEFAULT_IP_ADAPTER, clip_vision=DEFAULT_CLIP_VISION,
                   text_encoder=DEFAULT_TEXT_ENCODER) -> list[tuple[str, str, str, str | None]]:
    """The loader's four sources as (what, models folder, name, path or None when missing), without raising: the
    node's validation and fingerprint ask this before any loading."""
    clip = find_dir("clip_vision", clip_vision) or (
        find_optional_file("clip_vision", clip_vision) if os.path.splitext(clip_vision)[1] else None)
    if os.path.splitext(text_encoder)[1].lower() in SINGLE_FILE_EXTENSIONS:  # an SD-1.x single file
        te_folder, te = "checkpoints", find_optional_file("checkpoints", text_encoder)
    else:
        te_folder, te = "diffusers", find_dir("diffusers", text_encoder)
    return [("checkpoint", "restorer_id", checkpoint, find_optional_file("restorer_id", checkpoint)),
            ("ip_adapter", "ipadapter", ip_adapter, find_optional_file("ipadapter", ip_adapter)),
            ("image_encoder", "clip_vision", clip_vision, clip),
            ("text_encoder", te_folder, text_encoder, te)]


def missing_source(sources) -> str | None:
    """The message for the first missing source of locate_sources(...) (file, folders searched, where to get it)."""
    for _, folder, name, path in sources:
        if path is None:
            return missing_file_message(folder, name)
    return None


def resolve_sources(checkpoint=DEFAULT_CKPT, ip_adapter=DEFAULT_IP_ADAPTER, clip_vision=DEFAULT_CLIP_VISION,
                    text_encoder=DEFAULT_TEXT_ENCODER) -> dict:
    """The loader's four sources -> {checkpoint, ip_adapter, image_encoder, text_encoder: path}; the first one
    missing raises ModelFileNotFound naming the file, the folders searched and where to get it."""
    sources = locate_sources(checkpoint, ip_adapter, clip_vision, text_encoder)
    missing = missing_source(sources)
    if missing:
        raise ModelFileNotFound(missing)
    return {what: path for what, _, _, path in sources}


def load_restorer_id(checkpoint=DEFAULT_CKPT, ip_adapter=DEFAULT_IP_ADAPTER, clip_vision=DEFAULT_CLIP_VISION,
                     text_encoder=DEFAULT_TEXT_ENCODER, precision="auto"):
    """Resolve the four sources in the models folders and load RestorerID (cached; one resident at a time)."""
    from ..pipelines.identity.restorer import RestorerID

    paths = resolve_sources(checkpoint, ip_adapter, clip_vision, text_encoder)
    device = dev.compute_device()
    dtype = dev.resolve_dtype(precision, device)
    key = tuple((p, os.path.getmtime(p)) for p in paths.values()) + (str(device), dtype)
    if key not in _cache:
        hm.unload(*_cache.values())
        _cache.clear()  # 1.2 B parameters: never two resident
        dev.soft_empty_cache()
        # Hosted: on the offload device until the restore node asks ComfyUI to load it (host/models.py).
        where = dev.offload_device() if dev.is_hosted() else device
        model = RestorerID.load(**paths, device=where, dtype=dtype)
        _cache[key] = hm.manage(model, "RestorerID", follow_moves=True)
    return _cache[key]


def adaptive_scale(musiq=None, mode="adaptive", alpha=9.5, beta=10.0, min_scale=0.0, max_scale=0.0,
                   fixed_scale=FIXED_ID_SCALE):
    """(id_scale,) = exp((alpha - musiq) / beta), clamped by the non-zero limits; fixed_scale in fixed mode."""
    from ..pipelines.identity.adaptive_scale import adaptive_id_scale

    if musiq is None:
        raise ValueError("FaceMend Adaptive ID Scale: the musiq input is not connected. Wire the IQA score "
                         "node's mean_score (IQA loader with metric musiq) into it; there is no default score.")
    if mode == "fixed":
        return (float(fixed_scale),)
    return (adaptive_id_scale(float(musiq), alpha, beta, min_scale or None, max_scale or None),)


def _id_similarity(id_model, faces: torch.Tensor, ref) -> list:
    from ..pipelines.identity.stage import similarity_to_reference

    return [round(float(v), 5) for v in similarity_to_reference(id_model, faces, ref)]


def _scales(faces, id_scale, scale_mode, musiq_metric, alpha, beta):
    """(per-face scales, MUSIQ scores or None, where the scale came from) for the restore node."""
    from ..pipelines.identity.adaptive_scale import adaptive_id_scale

    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be auto, adaptive or fixed, got {scale_mode!r}")
    n = faces.shape[0]
    if scale_mode == "fixed":
        return torch.full((n,), float(id_scale)), None, f"fixed id_scale {float(id_scale)} (scale_mode fixed)"
    metric, source = musiq_metric, "adaptive from the wired musiq_metric"
    if metric is None:
        metric, why = default_musiq()
        if metric is None:
            if scale_mode == "adaptive":
                raise ModelFileNotFound(f"scale_mode adaptive needs MUSIQ: wire musiq_metric or put its weights in "
                                        f"models/facemend_iqa/ ({why}).")
            return (torch.full((n,), float(id_scale)), None,
                    f"fixed id_scale {float(id_scale)}: no musiq_metric wired and {why}; wire one or add the "
                    "weights for the adaptive scale")
        source = f"adaptive from MUSIQ's weights {metric.weights} (no musiq_metric wired)"
    with torch.no_grad(), hm.on_device(metric):
        musiq = torch.cat([metric.score(faces[i:i + 1]).float().cpu() for i in range(n)])
    return adaptive_id_scale(musiq, alpha, beta), musiq, source


def restore_with_reference(face_crops, restorer_id, reference, detector, id_model, id_scale=0.75, seed=42, steps=50,
                           cfg=4.0, musiq_metric=None, alpha=9.5, beta=10.0, prompt=DEFAULT_PROMPT,
                           negative_prompt=DEFAULT_NEGATIVE_PROMPT, batch_size=0, scale_mode="auto",
                           color_fix="none"):
    """(restored IMAGE, report JSON): RestorerID on the crops with the reference's identity; an empty batch passes
    through. Hosted, each finished batch of faces is the node's live preview."""
    from ..pipelines.identity.reference import reference_identity
    from ..pipelines.identity.stage import restore_in_batches
    from .tune import preview_hook

    if no_faces(face_crops):  # Detect + Align found no face: nothing to restore, no reference to embed
        return (empty_faces(face_crops), json.dumps({"faces": 0, "note": "no faces found: nothing was restored"}))
    device = dev.compute_device()
    t0 = time.perf_counter()
    faces = image_to_bchw(face_crops, device, "face_crops")
    refs = image_to_bchw(reference, device, "reference")
    with hm.on_device(detector):
        ref = reference_identity(refs, detector, id_model)
    n = faces.shape[0]
    report = {"faces": n, "reference": ref.report, "steps": int(steps), "cfg": float(cfg), "seed": int(seed),
              "color_fix": color_fix}
    scales, musiq, report["id_scale_source"] = _scales(faces, id_scale, scale_mode, musiq_metric, alpha, beta)
    if musiq is not None:
        report["musiq"] = [round(float(v), 4) for v in musiq]
    report["id_scale"] = [round(float(v), 5) for v in scales]
    report["id_similarity_before"] = _id_similarity(id_model, faces, ref)
    bs = int(batch_size) or (8 if device.type == "cuda" else 1)
    progress = dev.Progress(int(steps) * ((n + bs - 1) // bs))
    hook = preview_hook(progress)
    notes: list = []
    with hm.on_device(restorer_id, memory_required=ACTIVATION_BYTES):
        # Standalone, a model loaded elsewhere is moved for this run only (hosted: ComfyUI placed it).
        moved = not hm.same_device(restorer_id.device, device)
        if moved:
            dev.free_memory(restorer_id.model_bytes() + ACTIVATION_BYTES, device)
            restorer_id.to(device)
        try:
            # face k draws from seed + k whatever batch_size is
            out = restore_in_batches(restorer_id, faces, ref, scales, bs, int(seed), notes, steps=int(steps),
                                     cfg=float(cfg), prompt=prompt, negative_prompt=negative_prompt, hook=hook,
                                     color_fix=color_fix)
        finally:
            if moved:
                restorer_id.to(dev.offload_device())
                dev.soft_empty_cache()
    if notes:
        report["notes"] = notes
    report["id_similarity_after"] = _id_similarity(id_model, out, ref)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return (bchw_to_image(out), json.dumps(report))


# Node id -> what it computes (keyword arguments = the node's inputs; returns the node's outputs as a tuple).
OPS = {
    "FaceMend_RestorerIDLoader": lambda checkpoint=DEFAULT_CKPT, ip_adapter=DEFAULT_IP_ADAPTER,
    clip_vision=DEFAULT_CLIP_VISION, text_encoder=DEFAULT_TEXT_ENCODER, precision="auto": (
        load_restorer_id(checkpoint, ip_adapter, clip_vision, text_encoder, precision),),
    "FaceMend_AdaptiveIDScale": adaptive_scale,
    "FaceMend_RestorerIDRestore": restore_with_reference,
}
