"""One-step diffusion SR (TSD-SR, OSEDiff, OSDFace): what the nodes FaceMend_OneStepSRLoader,
FaceMend_OSDFaceLoader and FaceMend_OneStepSR compute, the files they resolve and the choices they list."""
from __future__ import annotations

import os
from dataclasses import replace

from ..host import device as dev
from ..host import models as hm
from ..host.model_paths import expected_path, find_dir, find_optional_file, list_dirs, list_files
from .common import bchw_to_image, content_stamp, empty_faces, image_to_bchw, no_faces

BACKENDS = ("tsdsr", "osediff", "osdface")
BASE_DEFAULTS = {"tsdsr": "stable-diffusion-3-medium-diffusers", "osediff": "stable-diffusion-2-1-base",
                 "osdface": "stable-diffusion-2-1-base"}
LORA_DEFAULTS = {"tsdsr": "tsdsr", "osediff": "osediff.pkl", "osdface": "osdface"}
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
OSDFACE_TOKENS = ("embedding change", "concat", "concat + position table")
LORA_MODES = ("merged", "applied")
LATENTS = ("sample", "mean")
SCALES = (1, 2, 4)
TILE_BLENDS = ("gaussian", "linear")
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


def lora_path(backend: str, name: str) -> str:
    """The backend's own files in models/onestep_sr/: a folder (TSD-SR, OSDFace) or a file (OSEDiff's .pkl)."""
    if backend in ("tsdsr", "osdface"):  # folders of files
        return find_dir("onestep_sr", name) or expected_path("onestep_sr", name)
    return find_optional_file("onestep_sr", name) or expected_path("onestep_sr", name)


def base_choices(defaults: set) -> list:
    """Base-model choices: diffusers folders (plus the defaults, so a missing one is named in the error) and
    single-file checkpoints."""
    return sorted(set(list_dirs("diffusers")) | defaults) + [
        f for f in list_files(CHECKPOINTS) if f.lower().endswith(".safetensors")]


def onestep_base_choices() -> list:
    """The one-step loader's base_model choices."""
    return base_choices(set(BASE_DEFAULTS.values()))


def onestep_lora_choices() -> list:
    """The one-step loader's lora choices: folders and files in models/onestep_sr/ plus every backend's default."""
    return sorted(set(list_dirs("onestep_sr")) | set(list_files("onestep_sr")) | set(LORA_DEFAULTS.values()))


def osdface_base_choices() -> list:
    return base_choices({BASE_DEFAULTS["osdface"]})


def osdface_folder_choices() -> list:
    return sorted(set(list_dirs("onestep_sr")) | {LORA_DEFAULTS["osdface"]})


def model_files(backend: str, base_model: str = "", lora: str = "") -> tuple[str, str]:
    """(base model path, the backend's own folder or file) that the loaders read, resolved as they resolve them."""
    return (base_model_path(base_model or BASE_DEFAULTS[backend]),
            lora_path(backend, lora or LORA_DEFAULTS[backend]))


def check_files(backend: str, base_model: str = "", lora: str = "", tokens: str = "embedding change") -> None:
    """What loading would raise for missing files or a refused base (ModelFileNotFound / ModelFileInvalid, the
    same messages), without reading any weights: the loader nodes run it when a prompt is validated."""
    from ..pipelines.diffusion.backends import check_osediff_files, check_tsdsr_files
    from ..pipelines.diffusion.osdface import check_osdface_files
    from ..pipelines.io.errors import ModelFileInvalid

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    base_dir, own = model_files(backend, base_model, lora)
    name = lora or LORA_DEFAULTS[backend]
    wants_file = backend == "osediff"
    is_dir = os.path.isdir(own)
    is_file = not is_dir and (os.path.isfile(own) or name.lower().endswith(".pkl") or _is_file_name(name))
    if (wants_file and is_dir) or (not wants_file and is_file):  # another backend's files: refused, said why
        raise ModelFileInvalid(
            f"{backend}: lora '{name}' is a {'folder' if is_dir else 'file'}, but {backend} reads "
            + ("a file in models/onestep_sr/ (osediff.pkl)" if wants_file else
               f"its folder in models/onestep_sr/ ({LORA_DEFAULTS[backend]})")
            + ": choose its own files, or the backend these belong to (TSD-SR: the tsdsr folder, OSEDiff: "
              "osediff.pkl, OSDFace: the osdface folder).")
    if backend == "tsdsr":
        check_tsdsr_files(base_dir, own)
    elif backend == "osediff":
        check_osediff_files(base_dir, own)
    else:
        check_osdface_files(base_dir, own, "concat" if tokens.startswith("concat") else "change")


def load_onestep(backend: str, base_model: str = "", lora: str = "", precision: str = "auto", prompt: str = ""):
    """Resolve the folders/files and load the backend (cached: one one-step model resident at a time)."""
    from ..pipelines.diffusion.backends import BACKENDS as SD_BACKENDS
    from ..pipelines.diffusion.backends import OSEDIFF_DEFAULT_PROMPT, load_osediff, load_tsdsr

    if backend == "osdface":
        return load_osdface_model(base_model, lora, precision)
    if backend not in SD_BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    base_dir, own = model_files(backend, base_model, lora)
    device = dev.compute_device()
    dtype = dev.resolve_dtype(precision, device)
    prompt = prompt or OSEDIFF_DEFAULT_PROMPT

    def build(where):
        if backend == "tsdsr":
            return load_tsdsr(base_dir, own, device=where, dtype=dtype)
        return load_osediff(base_dir, own, device=where, dtype=dtype, prompt=prompt)

    return _cached((backend, base_dir, own, device, dtype, prompt if backend == "osediff" else ""), build)


def _cached(key: tuple, build):
    """One one-step model resident at a time (billions of parameters), keyed by its files (their listing: names,
    sizes, times) and settings. Hosted, it is loaded on the offload device and put under ComfyUI's model
    management, which moves it to the GPU for the SR node and keeps it there while it fits (host/models.py)."""
    backend, base_dir, files, device = key[:4]
    stamp = (content_stamp(base_dir), content_stamp(files))
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
    base_dir, own_dir = model_files("osdface", base_model, folder)
    device = dev.compute_device()
    dtype = dev.resolve_dtype(precision, device)

    def build(where):
        return load_osdface(base_dir, own_dir, device=where, dtype=dtype, lora_mode=lora_mode,
                            embedding="change" if tokens == "embedding change" else "concat",
                            pos_embedding=tokens == "concat + position table", latent=latent)

    return _cached(("osdface", base_dir, own_dir, device, dtype, lora_mode, tokens, latent), build)


def _preview_hook(progress):
    """step_hook for the one-step models: interruption and progress per unit of work, plus live previews of what
    is decoded (pipelines/diffusion/tiling.show_preview asks wants_preview first, so standalone nothing is made)."""
    def hook(n: int = 1) -> None:
        dev.check_interrupt()
        progress.update(n)

    hook.wants_preview = progress.wants_preview
    hook.preview = lambda image: progress.update(0, preview=image)
    return hook


def one_step_sr(image, sr_model, scale=1, tile_size=0, tile_overlap=-1, seed=0, blend="gaussian",
                vae_tile_size=1024, max_batch=4):
    """IMAGE -> (IMAGE x scale,): one-step SR / refinement in overlapping latent tiles, out of memory retried with
    smaller batches and tiles; an empty batch (no face found) passes through."""
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
    hook = _preview_hook(progress)
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


# Node id -> what it computes (keyword arguments = the node's inputs; returns the node's outputs as a tuple).
OPS = {
    "FaceMend_OneStepSRLoader": lambda backend, base_model, lora, precision="auto", prompt="": (
        load_onestep(backend, base_model, lora, precision, prompt),),
    "FaceMend_OneStepSR": one_step_sr,
    "FaceMend_OSDFaceLoader": lambda base_model, osdface_folder, precision="auto", lora_mode="merged",
    tokens="embedding change", latent="sample": (
        load_osdface_model(base_model, osdface_folder, precision, lora_mode, tokens, latent),),
}
