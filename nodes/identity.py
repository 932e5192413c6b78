"""Nodes: RestorerID loader, adaptive ID scale, and restoration of face crops from a reference photo."""
from __future__ import annotations

import json
import os
import time

import torch

from ..host import device as dev
from ..host import models as hm
from ..host.model_paths import find_dir, find_file, list_dirs, list_files, missing_file_message
from ..pipelines.io.errors import ModelFileNotFound
from ..ops.common import CATEGORY, bchw_to_image, empty_faces, image_to_bchw, no_faces

DEFAULT_CKPT = "RestorerIDFull.ckpt"
DEFAULT_IP_ADAPTER = "ip-adapter-faceid-plus_sd15.bin"
DEFAULT_CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_TEXT_ENCODER = "stable-diffusion-v1-5"
FIXED_ID_SCALE = 0.75  # the scale RestorerID was trained with
_cache: dict = {}
ACTIVATION_BYTES = 2 * 1024 ** 3  # what the sampler needs besides the weights (memory asked of ComfyUI)


def default_musiq():
    """(MUSIQ metric, None) when its weights are in models/facemend_iqa/, else (None, why). Only a missing file
    is tolerated (the caller then uses a fixed scale and says so); weights that are there but fail to load raise."""
    from ..ops.quality import open_metric  # the identity stage moves to ops: this line goes with it

    try:
        return open_metric("musiq"), None
    except ModelFileNotFound as exc:
        return None, f"no MUSIQ weights ({str(exc).splitlines()[0]})"


def _file_or_dir(folder: str, name: str) -> str:
    path = find_dir(folder, name)
    if path is None:
        path = find_file(folder, name) if os.path.splitext(name)[1] else None
    if path is None:
        raise ModelFileNotFound(missing_file_message(folder, name))
    return path


def load_restorer_id(checkpoint=DEFAULT_CKPT, ip_adapter=DEFAULT_IP_ADAPTER, clip_vision=DEFAULT_CLIP_VISION,
                     text_encoder=DEFAULT_TEXT_ENCODER, precision="auto"):
    """Resolve the four sources in the models folders and load RestorerID (cached; one resident at a time)."""
    from ..pipelines.identity.restorer import RestorerID

    paths = dict(checkpoint=find_file("restorer_id", checkpoint), ip_adapter=find_file("ipadapter", ip_adapter),
                 image_encoder=_file_or_dir("clip_vision", clip_vision))
    if os.path.splitext(text_encoder)[1].lower() in (".safetensors", ".ckpt", ".pt", ".pth"):
        paths["text_encoder"] = find_file("checkpoints", text_encoder)  # an SD-1.x single file
    else:
        paths["text_encoder"] = find_dir("diffusers", text_encoder)
        if paths["text_encoder"] is None:
            raise ModelFileNotFound(missing_file_message("diffusers", text_encoder))
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


class RestorerIDLoader:
    DESCRIPTION = ("Loads RestorerID (identity-preserving face restoration from a reference photo): "
                   "RestorerIDFull.ckpt from models/restorer_id/, ip-adapter-faceid-plus_sd15.bin from "
                   "models/ipadapter/, CLIP-ViT-H-14 from models/clip_vision/ (folder or file) and SD-1.5's text "
                   "encoder from a diffusers folder in models/diffusers/. The IP-Adapter-FaceID weights and the "
                   "insightface ArcFace models are non-commercial.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("RESTORER_ID",)
    RETURN_NAMES = ("restorer_id",)

    @classmethod
    def INPUT_TYPES(cls):
        def choices(names, default):
            return sorted(set(names) | {default})

        return {"required": {
            "checkpoint": (choices(list_files("restorer_id"), DEFAULT_CKPT), {"default": DEFAULT_CKPT, "tooltip":
                           "RestorerIDFull.ckpt (or a safetensors conversion) in models/restorer_id/. Plain SD-1.5 "
                           "or GFPGAN files are refused with what they are."}),
            "ip_adapter": (choices(list_files("ipadapter"), DEFAULT_IP_ADAPTER), {"default": DEFAULT_IP_ADAPTER,
                           "tooltip": "ip-adapter-faceid-plus_sd15.bin in models/ipadapter/ (its image_proj part "
                                      "turns the reference into ID tokens)."}),
            "clip_vision": (choices(list_dirs("clip_vision") + list_files("clip_vision"), DEFAULT_CLIP_VISION),
                            {"default": DEFAULT_CLIP_VISION, "tooltip":
                             "CLIP-ViT-H-14 (laion2B) in models/clip_vision/: the transformers folder or the single "
                             "safetensors file."}),
            "text_encoder": (choices(list_dirs("diffusers") + list_files("checkpoints"), DEFAULT_TEXT_ENCODER),
                             {"default": DEFAULT_TEXT_ENCODER, "tooltip":
                              "A Stable Diffusion 1.5 diffusers folder in models/diffusers/ (only text_encoder/ and "
                              "tokenizer/ are read), or an SD-1.5 single-file checkpoint in models/checkpoints/ "
                              "(its text encoder, with ComfyUI's own SD-1 tokenizer)."}),
            "precision": (["auto", "fp32", "fp16", "bf16"], {"default": "auto", "tooltip":
                          "auto: fp16 on GPUs (the official autocast setting), fp32 on CPU. GroupNorm runs in "
                          "fp32 either way."}),
        }}

    def load(self, checkpoint, ip_adapter, clip_vision, text_encoder, precision="auto"):
        return (load_restorer_id(checkpoint, ip_adapter, clip_vision, text_encoder, precision),)


class AdaptiveIDScale:
    DESCRIPTION = ("RestorerID's adaptive ID scale: lambda = exp((alpha - MUSIQ) / beta) from the MUSIQ score of "
                   "the degraded input (wire the IQA score node's mean_score with metric musiq). Low quality leans "
                   "on the reference (MUSIQ 9.5 -> 1.0), good quality hardly (27.6 -> 0.164, 40 -> 0.047).")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("FLOAT",)
    RETURN_NAMES = ("id_scale",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "musiq": ("FLOAT", {"forceInput": True, "min": 0.0, "max": 100.0, "tooltip":
                      "MUSIQ (KonIQ, 0..100) of the LQ input: wire the IQA score node's mean_score (metric musiq). "
                      "There is no default score: an unwired input is an error."}),
            "mode": (["adaptive", "fixed"], {"default": "adaptive", "tooltip":
                     "adaptive: exp((alpha - musiq) / beta); fixed: always fixed_scale."}),
            "alpha": ("FLOAT", {"default": 9.5, "min": -100.0, "max": 100.0, "step": 0.1, "tooltip":
                      "MUSIQ at which the scale is 1 (official 9.5)."}),
            "beta": ("FLOAT", {"default": 10.0, "min": 0.1, "max": 100.0, "step": 0.1, "tooltip":
                     "MUSIQ points per factor e (official 10)."}),
        }, "optional": {
            "min_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                          "Lower clamp (0: none, as the official code)."}),
            "max_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                          "Upper clamp (0: none; the official code lets very bad inputs exceed 1)."}),
            "fixed_scale": ("FLOAT", {"default": 0.75, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                            "The scale in fixed mode (0.75 is what RestorerID was trained with)."}),
        }}

    def run(self, musiq=None, mode="adaptive", alpha=9.5, beta=10.0, min_scale=0.0, max_scale=0.0,
            fixed_scale=FIXED_ID_SCALE):
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

    if scale_mode not in ("auto", "adaptive", "fixed"):
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


class RestorerIDRestore:
    DESCRIPTION = ("Restores aligned face crops (512 px from Detect + Align) with RestorerID, keeping the identity "
                   "of a reference photo of the same person: the official 50-step DDIM sampler with CFG 4. The "
                   "reference face is found with the detector and embedded with the ArcFace model; several "
                   "reference photos (a batch) are averaged. Follow with Color Fix (wavelet) against the input "
                   "crops, as the official inference does.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "report_json")
    OUTPUT_TOOLTIPS = ("Restored face crops.", "Per face: ID scale, MUSIQ (when a metric is wired), ArcFace "
                       "similarity to the reference before and after; the reference faces used.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_crops": ("IMAGE", {"tooltip": "Aligned face crops (all faces of a batch run together)."}),
            "restorer_id": ("RESTORER_ID", {"tooltip": "From the FaceMend RestorerID loader."}),
            "reference": ("IMAGE", {"tooltip": "One or more photos of the same person (a batch of same-size "
                                               "photos); the largest face of each is used."}),
            "detector": ("FACE_DETECTOR", {"tooltip": "Finds the face and its 5 landmarks in the reference."}),
            "id_model": ("FACE_ID", {"tooltip": "ArcFace model (w600k_r50.onnx of buffalo_l, as RestorerID uses)."}),
            "id_scale": ("FLOAT", {"default": 0.75, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip":
                         "Weight of the reference's ID attention, used when scale_mode is fixed, or in auto mode "
                         "when no MUSIQ metric is wired and its weights are not in models/facemend_iqa/ (the "
                         "report then says so)."}),
            "seed": ("INT", {"default": 42, "min": 0, "max": 0xFFFFFFFF, "tooltip":
                     "Seed of the posterior sample, start noise and per-step noise."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "DDIM steps (official 50)."}),
            "cfg": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 20.0, "step": 0.1, "tooltip":
                    "Classifier-free guidance (official 4; 1 runs the conditional branch only, twice as fast)."}),
        }, "optional": {
            "musiq_metric": ("IQA_METRIC", {"tooltip": "A MUSIQ metric: each face gets its own scale "
                                                       "exp((alpha - MUSIQ(face)) / beta) instead of id_scale."}),
            "alpha": ("FLOAT", {"default": 9.5, "min": -100.0, "max": 100.0, "step": 0.1, "tooltip":
                      "Adaptive scale alpha (with musiq_metric)."}),
            "beta": ("FLOAT", {"default": 10.0, "min": 0.1, "max": 100.0, "step": 0.1, "tooltip":
                     "Adaptive scale beta (with musiq_metric)."}),
            "prompt": ("STRING", {"default": "best quality, high quality", "tooltip": "Positive prompt (official)."}),
            "negative_prompt": ("STRING", {"default": "cartoon, 3d, paint, monochrome, lowres, bad anatomy, worst "
                                "quality, low quality", "tooltip": "Negative prompt (official)."}),
            "batch_size": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip":
                           "Faces per sampler run (0: 1 on CPU, 8 on GPU). Face k always draws its noise from "
                           "seed + k, so the result does not depend on it."}),
            "scale_mode": (["auto", "adaptive", "fixed"], {"default": "auto", "tooltip":
                           "auto: the adaptive scale exp((alpha - MUSIQ(face)) / beta) per face from musiq_metric, "
                           "or from MUSIQ's weights in models/facemend_iqa/ when nothing is wired; id_scale only "
                           "when neither is there (named in the report). adaptive: an error without MUSIQ. "
                           "fixed: always id_scale."}),
            "color_fix": (["none", "wavelet", "adain"], {"default": "none", "tooltip":
                          "Colour fix against the input crops in the official order (on the unclamped decode, "
                          "then clamp): use wavelet here instead of a following Color Fix node. none: the decode "
                          "clamped to [0,1] (for a Color Fix node after)."}),
        }}

    def run(self, face_crops, restorer_id, reference, detector, id_model, id_scale=0.75, seed=42, steps=50,
            cfg=4.0, musiq_metric=None, alpha=9.5, beta=10.0, prompt="best quality, high quality",
            negative_prompt="cartoon, 3d, paint, monochrome, lowres, bad anatomy, worst quality, low quality",
            batch_size=0, color_fix="none", scale_mode="auto"):
        from ..pipelines.identity.reference import reference_identity
        from ..pipelines.identity.stage import restore_in_batches

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
        hook = dev.step_hook(progress)
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


NODES = {
    "FaceMend_RestorerIDLoader": (RestorerIDLoader, "FaceMend RestorerID Loader"),
    "FaceMend_AdaptiveIDScale": (AdaptiveIDScale, "FaceMend Adaptive ID Scale (RestorerID)"),
    "FaceMend_RestorerIDRestore": (RestorerIDRestore, "FaceMend RestorerID Restore (reference photo)"),
}
