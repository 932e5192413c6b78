"""Nodes: one-step diffusion SR loaders (TSD-SR / OSEDiff / OSDFace) and the SR / refine node."""
from __future__ import annotations

import os
from dataclasses import replace

from ..host import device as dev
from ..host import models as hm
from ..host.model_paths import expected_path, find_dir, find_optional_file, list_dirs, list_files
from ..ops.common import CATEGORY, bchw_to_image, empty_faces, image_to_bchw, no_faces

BASE_DEFAULTS = {"tsdsr": "stable-diffusion-3-medium-diffusers", "osediff": "stable-diffusion-2-1-base",
                 "osdface": "stable-diffusion-2-1-base"}
LORA_DEFAULTS = {"tsdsr": "tsdsr", "osediff": "osediff.pkl", "osdface": "osdface"}
_cache: dict = {}
ACTIVATION_BYTES = 2 * 1024 ** 3  # what a tiled one-step run needs besides the weights (memory asked of ComfyUI)


CHECKPOINTS = "checkpoints"  # ComfyUI's own folder of single-file checkpoints (sd3_medium*.safetensors)


def _is_file_name(name: str) -> bool:
    from ..pipelines.diffusion.backends import SINGLE_FILE_EXTENSIONS

    return name.lower().endswith(SINGLE_FILE_EXTENSIONS)


def base_model_path(name: str) -> str:
    """A diffusers folder in models/diffusers/, or a single file in models/checkpoints/ (names with an extension)."""
    if not _is_file_name(name):
        return find_dir("diffusers", name) or expected_path("diffusers", name)
    return find_optional_file(CHECKPOINTS, name) or expected_path(CHECKPOINTS, name)


def _lora_path(backend: str, name: str) -> str:
    if backend in ("tsdsr", "osdface"):  # folders of files
        return find_dir("onestep_sr", name) or expected_path("onestep_sr", name)
    return find_optional_file("onestep_sr", name) or expected_path("onestep_sr", name)


def _base_choices(defaults: set) -> list:
    """Base-model choices: diffusers folders (plus the defaults, so a missing one is named in the error) and
    single-file checkpoints."""
    return sorted(set(list_dirs("diffusers")) | defaults) + [
        f for f in list_files(CHECKPOINTS) if f.lower().endswith(".safetensors")]


def load_onestep(backend: str, base_model: str = "", lora: str = "", precision: str = "auto", prompt: str = ""):
    """Resolve the folders/files and load the backend (cached: one one-step model resident at a time)."""
    from ..pipelines.diffusion.backends import BACKENDS, OSEDIFF_DEFAULT_PROMPT, load_osediff, load_tsdsr

    if backend == "osdface":
        return load_osdface_model(base_model, lora, precision)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    base_dir = base_model_path(base_model or BASE_DEFAULTS[backend])
    lora_path = _lora_path(backend, lora or LORA_DEFAULTS[backend])
    device = dev.compute_device()
    dtype = dev.resolve_dtype(precision, device)
    prompt = prompt or OSEDIFF_DEFAULT_PROMPT

    def build(where):
        if backend == "tsdsr":
            return load_tsdsr(base_dir, lora_path, device=where, dtype=dtype)
        return load_osediff(base_dir, lora_path, device=where, dtype=dtype, prompt=prompt)

    return _cached((backend, base_dir, lora_path, device, dtype, prompt if backend == "osediff" else ""), build)


def _cached(key: tuple, build):
    """One one-step model resident at a time (billions of parameters), keyed by its files (and their times) and
    settings. Hosted, it is loaded on the offload device and put under ComfyUI's model management, which moves it
    to the GPU for the SR node and keeps it there while it fits (host/models.py)."""
    backend, base_dir, files, device = key[:4]
    stamp = tuple(os.path.getmtime(p) if os.path.exists(p) else 0 for p in (base_dir, files))
    key = (backend, os.path.abspath(base_dir), os.path.abspath(files), stamp, str(device)) + key[4:]
    if key not in _cache:
        hm.unload(*_cache.values())
        _cache.clear()  # never two resident
        dev.soft_empty_cache()
        model = build(dev.offload_device() if dev.is_hosted() else device)
        _cache[key] = hm.manage(model, f"one-step SR {backend}")
    return _cache[key]


def load_osdface_model(base_model: str = "", folder: str = "", precision: str = "auto", lora_mode: str = "merged",
                       tokens: str = "embedding change", latent: str = "sample"):
    """OSDFace: SD-2.1-base folder + models/onestep_sr/<folder>/ with the three official files (cached like
    load_onestep: one one-step model resident at a time)."""
    from ..pipelines.diffusion.osdface import load_osdface

    if tokens not in OSDFACE_TOKENS:
        raise ValueError(f"tokens must be one of {OSDFACE_TOKENS}, got {tokens!r}")
    base_dir = base_model_path(base_model or BASE_DEFAULTS["osdface"])
    own_dir = _lora_path("osdface", folder or LORA_DEFAULTS["osdface"])
    device = dev.compute_device()
    dtype = dev.resolve_dtype(precision, device)

    def build(where):
        return load_osdface(base_dir, own_dir, device=where, dtype=dtype, lora_mode=lora_mode,
                            embedding="change" if tokens == "embedding change" else "concat",
                            pos_embedding=tokens == "concat + position table", latent=latent)

    return _cached(("osdface", base_dir, own_dir, device, dtype, lora_mode, tokens, latent), build)


OSDFACE_TOKENS = ("embedding change", "concat", "concat + position table")


class OSDFaceLoader:
    DESCRIPTION = ("Loads OSDFace (CVPR 2025), the one-step face diffusion prior: SD-2.1-base (unet/, vae/, "
                   "scheduler/ of the diffusers folder in models/diffusers/, or the single file "
                   "v2-1_512-ema-pruned.safetensors in models/checkpoints/) and models/onestep_sr/osdface/ with the "
                   "three official files pytorch_lora_weights.safetensors, embedding_change_weights.pth and "
                   "associate_2.ckpt. Feed the One-Step Diffusion SR node (scale 1 on 512 face crops) with it. "
                   "Missing files are listed in the error with where they go.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("ONESTEP_SR",)
    RETURN_NAMES = ("sr_model",)

    @classmethod
    def INPUT_TYPES(cls):
        bases = _base_choices({BASE_DEFAULTS["osdface"]})
        folders = sorted(set(list_dirs("onestep_sr")) | {LORA_DEFAULTS["osdface"]})
        return {"required": {
            "base_model": (bases, {"default": BASE_DEFAULTS["osdface"], "tooltip":
                           "The SD-2.1-base diffusers folder in models/diffusers/ (unet/, vae/, scheduler/ are read; "
                           "no text encoder: the prompt is made from the face), or the single file "
                           "v2-1_512-ema-pruned.safetensors in models/checkpoints/ (its UNet and VAE are read)."}),
            "osdface_folder": (folders, {"default": LORA_DEFAULTS["osdface"], "tooltip":
                               "Folder in models/onestep_sr/ with OSDFace's pytorch_lora_weights.safetensors, "
                               "embedding_change_weights.pth and associate_2.ckpt."}),
            "precision": (["auto", "fp32", "fp16", "bf16"], {"default": "auto", "tooltip":
                          "auto: fp16 on GPUs, fp32 on CPU (the official script runs fp32 unless --mixed_precision "
                          "fp16)."}),
            "lora_mode": (["merged", "applied"], {"default": "merged", "tooltip":
                          "merged: the LoRA added into the UNet weights once (the official --merge_lora, fastest). "
                          "applied: kept as a separate low-rank branch (the official default path); same result "
                          "within float rounding."}),
            "tokens": (list(OSDFACE_TOKENS), {"default": "embedding change", "tooltip":
                       "The released weights: 'embedding change' (77 distinct codes -> embedding_change_weights.pth). "
                       "'concat' / 'concat + position table' are the official --cat_prompt_embedding "
                       "(/ --use_pos_embedding) variants, for weights trained that way."}),
            "latent": (["sample", "mean"], {"default": "sample", "tooltip":
                       "sample: the VAE posterior sampled with the SR node's seed (the official behaviour); mean: "
                       "its mean (no randomness)."}),
        }}

    def load(self, base_model, osdface_folder, precision="auto", lora_mode="merged", tokens="embedding change",
             latent="sample"):
        return (load_osdface_model(base_model, osdface_folder, precision, lora_mode, tokens, latent),)


class OneStepSRLoader:
    DESCRIPTION = ("Loads a one-step diffusion SR model. TSD-SR: the SD3-medium diffusers folder (transformer/ and "
                   "vae/ are used, no text encoders) from models/diffusers/, or the single file sd3_medium*.safetensors "
                   "from models/checkpoints/, and the TSD-SR folder models/onestep_sr/"
                   "tsdsr/ with transformer.safetensors, vae.safetensors, prompt_embeds.pt, pool_embeds.pt. "
                   "OSEDiff: the SD2.1-base diffusers folder and models/onestep_sr/osediff.pkl. Missing files are "
                   "listed in the error with where they go.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("ONESTEP_SR",)
    RETURN_NAMES = ("sr_model",)

    @classmethod
    def INPUT_TYPES(cls):
        bases = _base_choices(set(BASE_DEFAULTS.values()))
        loras = sorted(set(list_dirs("onestep_sr")) | set(list_files("onestep_sr")) | set(LORA_DEFAULTS.values()))
        return {"required": {
            "backend": (["tsdsr", "osediff", "osdface"], {"default": "tsdsr", "tooltip":
                        "tsdsr: TSD-SR (SD3-medium, one step at t=1000; the NTIRE 2025 AIIA face refiner). "
                        "osediff: OSEDiff (SD2.1-base, one step at t=999; lighter, Apache-2.0). "
                        "osdface: OSDFace (SD2.1-base, a face prior: the prompt is made from the face; lora = its "
                        "folder osdface; the OSDFace loader has its options)."}),
            "base_model": (bases, {"default": BASE_DEFAULTS["tsdsr"], "tooltip":
                           "Diffusers folder in models/diffusers/: stable-diffusion-3-medium-diffusers for TSD-SR, "
                           "stable-diffusion-2-1-base for OSEDiff. TSD-SR also reads the single-file SD3-medium "
                           "checkpoint in models/checkpoints/ (sd3_medium.safetensors or the _incl_clips variants; "
                           "only the MMDiT and VAE are read)."}),
            "lora": (loras, {"default": LORA_DEFAULTS["tsdsr"], "tooltip":
                     "In models/onestep_sr/: the TSD-SR folder (tsdsr, or tsdsr-mse), osediff.pkl or the OSDFace "
                     "folder (osdface)."}),
            "precision": (["auto", "fp32", "fp16", "bf16"], {"default": "auto", "tooltip":
                          "auto: fp16 on GPUs (the official setting of both), fp32 on CPU."}),
        }, "optional": {
            "prompt": ("STRING", {"default": "", "multiline": False, "tooltip":
                       "OSEDiff only: the text prompt (encoded once with SD2.1's text encoder; the official script "
                       "adds RAM tags per image). Empty: a generic face prompt. TSD-SR uses its precomputed "
                       "embeddings."}),
        }}

    def load(self, backend, base_model, lora, precision="auto", prompt=""):
        return (load_onestep(backend, base_model, lora, precision, prompt),)


class OneStepSRNode:
    DESCRIPTION = ("One-step diffusion super-resolution / refinement (TSD-SR, OSEDiff or OSDFace): scale 1 refines "
                   "(the NTIRE 2025 setting on 512 face crops), 2 and 4 upscale whole images. Large images run in "
                   "overlapping latent tiles with blended borders; out of memory retries with smaller batches and "
                   "tiles. Output is pixel-aligned with the input. Follow with Color Fix (wavelet) against the input. "
                   "OSDFace restores each face at 512 in one piece (the tile inputs do not apply; max_batch does).")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Images or face crops; a batch of same-size images runs together."}),
            "sr_model": ("ONESTEP_SR", {"tooltip": "From the FaceMend one-step SR loader."}),
            "scale": ([1, 2, 4], {"default": 1, "tooltip":
                      "1: same-size refinement; 2 / 4: bicubic upscale, then the diffusion step restores detail."}),
            "tile_size": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64, "tooltip":
                          "Denoiser tile in output pixels (0: the backend's default, TSD-SR 512, OSEDiff 768). "
                          "Images up to this area run in one piece."}),
            "tile_overlap": ("INT", {"default": -1, "min": -1, "max": 2048, "step": 8, "tooltip":
                             "Overlap of neighbouring tiles in output pixels (-1: default, TSD-SR 64, OSEDiff 256)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip":
                     "Seed of the VAE posterior sample: same seed, same output."}),
        }, "optional": {
            "blend": (["gaussian", "linear"], {"default": "gaussian", "tooltip":
                      "Tile weights: gaussian (the official TSD-SR/OSEDiff weights) or a linear cross-fade."}),
            "vae_tile_size": ("INT", {"default": 1024, "min": 256, "max": 8192, "step": 64, "tooltip":
                              "VAE encoder/decoder tile in output pixels; lower it when memory is short. On a CPU 512 is "
                              "faster (the VAE's attention grows with the square of the tile area)."}),
            "max_batch": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip":
                          "Images x tiles per network call; halved automatically on out-of-memory."}),
        }}

    def run(self, image, sr_model, scale=1, tile_size=0, tile_overlap=-1, seed=0, blend="gaussian",
            vae_tile_size=1024, max_batch=4):
        if no_faces(image):  # Detect + Align found no face: nothing to refine, the model stays where it is
            return (empty_faces(image, int(scale)),)
        device = dev.compute_device()
        t = sr_model.tiles
        f = sr_model.vae_factor
        if tile_size:
            t = replace(t, latent_tile=max(16, int(tile_size) // f // 2 * 2))
        if tile_overlap >= 0:
            t = replace(t, latent_overlap=min(int(tile_overlap) // f, t.latent_tile // 2))
        vt = max(256, int(vae_tile_size) // 64 * 64)
        t = replace(t, blend=blend, encoder_tile=vt, decoder_tile=vt // f, max_batch=int(max_batch))
        x = image_to_bchw(image, device, "image")
        n, _, h, w = x.shape
        progress = dev.Progress(sr_model.count_tiles(h, w, int(scale), t, n))
        hook = dev.step_hook(progress)
        dev.check_interrupt()
        with hm.on_device(sr_model, memory_required=ACTIVATION_BYTES):
            # Standalone, a model loaded elsewhere is moved for this run only (hosted: ComfyUI placed it).
            moved = not hm.same_device(sr_model.device, device)
            if moved:
                dev.free_memory(sr_model.model_bytes() + ACTIVATION_BYTES, device)
                sr_model.to(device)
            try:
                out = sr_model(x, scale=int(scale), seed=int(seed), tiles=t, hook=hook, is_oom=dev.is_oom)
            finally:
                if moved:
                    sr_model.to(dev.offload_device())
                    dev.soft_empty_cache()
        return (bchw_to_image(out),)


NODES = {
    "FaceMend_OneStepSRLoader": (OneStepSRLoader, "FaceMend One-Step SR Loader (TSD-SR / OSEDiff)"),
    "FaceMend_OneStepSR": (OneStepSRNode, "FaceMend One-Step Diffusion SR"),
    "FaceMend_OSDFaceLoader": (OSDFaceLoader, "FaceMend OSDFace Loader (one-step face diffusion)"),
}
