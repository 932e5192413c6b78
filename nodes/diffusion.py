"""V3 nodes: one-step diffusion SR loaders (TSD-SR / OSEDiff / OSDFace) and the SR / refine node. What they compute
is ops/diffusion.py.

The loader keeps one flat set of widgets for all backends (each tooltip says which backend reads it) rather than a
dynamic combo: ComfyUI 0.3.64's ComboDynamic is a placeholder, and the DynamicCombo of later versions names the
inputs under it `backend.<name>` in prompts, which would break every saved API workflow."""
from __future__ import annotations

from ..ops import diffusion as op
from ..pipelines.io.errors import FaceMendError
from .api import CATEGORY, OneStepSR, file_fingerprint, io, preview


def _not_in(name: str, value, options) -> str | None:
    """ComfyUI's own combo check, for inputs that validate_inputs names (the host then skips them; and 0.3.64 never
    checks V3 combos at all)."""
    if value is None or value in options:
        return None
    listed = f"(list of length {len(options)})" if len(options) > 20 else str(list(options))
    return f"Value not in list: {name}: '{value}' not in {listed}"


def _first(*messages) -> bool | str:
    return next((m for m in messages if m), True)


def _files_message(backend, base_model, lora, tokens="embedding change") -> str | None:
    """The error loading would raise for these files (missing ones listed with where to get them), or None."""
    try:
        op.check_files(backend, base_model, lora, tokens)
    except FaceMendError as exc:
        return str(exc)
    return None


def _files_fingerprint(backend, base_model, lora) -> tuple:
    """The resolved base model and the backend's own files, by their listing (names, sizes, mtimes): a file replaced
    in a diffusers or LoRA folder loads again, unchanged ones are not re-read."""
    try:
        paths = op.model_files(backend, base_model, lora)
    except (FaceMendError, KeyError):  # a name outside the model folders, an unknown backend: validation says so
        return ("unresolved", backend, base_model, lora)
    return tuple(file_fingerprint(p) for p in paths)


class OneStepSRLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_OneStepSRLoader", display_name="FaceMend One-Step SR Loader (TSD-SR / OSEDiff)",
            category=CATEGORY,
            description=("Loads a one-step diffusion SR model. TSD-SR: the SD3-medium diffusers folder (transformer/ "
                         "and vae/ are used, no text encoders) from models/diffusers/, or the single file "
                         "sd3_medium*.safetensors from models/checkpoints/, and the TSD-SR folder models/onestep_sr/"
                         "tsdsr/ with transformer.safetensors, vae.safetensors, prompt_embeds.pt, pool_embeds.pt. "
                         "OSEDiff: the SD2.1-base diffusers folder and models/onestep_sr/osediff.pkl. Missing files "
                         "are listed in the error with where they go."),
            inputs=[
                io.Combo.Input("backend", options=list(op.BACKENDS), default="tsdsr", tooltip=(
                    "tsdsr: TSD-SR (SD3-medium, one step at t=1000; the NTIRE 2025 AIIA face refiner). "
                    "osediff: OSEDiff (SD2.1-base, one step at t=999; lighter, Apache-2.0). "
                    "osdface: OSDFace (SD2.1-base, a face prior: the prompt is made from the face; lora = its "
                    "folder osdface; the OSDFace loader has its options).")),
                io.Combo.Input("base_model", options=op.onestep_base_choices(), default=op.BASE_DEFAULTS["tsdsr"],
                               tooltip=(
                    "Every backend; each needs its own base. TSD-SR: stable-diffusion-3-medium-diffusers in "
                    "models/diffusers/, or the single-file SD3-medium checkpoint in models/checkpoints/ "
                    "(sd3_medium.safetensors or the _incl_clips variants; only the MMDiT and VAE are read). "
                    "OSEDiff: stable-diffusion-2-1-base in models/diffusers/ (a folder only). OSDFace: "
                    "stable-diffusion-2-1-base, or the single file v2-1_512-ema-pruned.safetensors.")),
                io.Combo.Input("lora", options=op.onestep_lora_choices(), default=op.LORA_DEFAULTS["tsdsr"],
                               tooltip=(
                    "Every backend; each reads its own, in models/onestep_sr/. TSD-SR: its folder (tsdsr, or "
                    "tsdsr-mse). OSEDiff: the file osediff.pkl. OSDFace: its folder (osdface).")),
                io.Combo.Input("precision", options=list(op.PRECISIONS), default="auto", tooltip=(
                    "Every backend. auto: fp16 on GPUs (the official setting of TSD-SR and OSEDiff), fp32 on CPU.")),
                io.String.Input("prompt", default="", multiline=False, optional=True, tooltip=(
                    "OSEDiff only: the text prompt (encoded once with SD2.1's text encoder; the official script "
                    "adds RAM tags per image). Empty: a generic face prompt. TSD-SR uses its precomputed "
                    "embeddings; OSDFace makes its prompt from the face.")),
            ],
            outputs=[OneStepSR.Output(display_name="sr_model")],
        )

    @classmethod
    def validate_inputs(cls, backend=None, base_model=None, lora=None, precision=None):
        # Missing or mismatched files are named before the run starts (linked inputs arrive as None: not checked).
        refused = _first(_not_in("backend", backend, op.BACKENDS),
                         _not_in("base_model", base_model, op.onestep_base_choices()),
                         _not_in("lora", lora, op.onestep_lora_choices()),
                         _not_in("precision", precision, op.PRECISIONS))
        if refused is not True or None in (backend, base_model, lora):
            return refused
        return _first(_files_message(backend, base_model, lora))

    @classmethod
    def fingerprint_inputs(cls, backend, base_model, lora, precision="auto", prompt=""):
        return (_files_fingerprint(backend, base_model, lora), backend, precision, prompt)

    @classmethod
    def execute(cls, backend, base_model, lora, precision="auto", prompt="") -> io.NodeOutput:
        return io.NodeOutput(op.load_onestep(backend, base_model, lora, precision, prompt))


class OneStepSRNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_OneStepSR", display_name="FaceMend One-Step Diffusion SR", category=CATEGORY,
            description=("One-step diffusion super-resolution / refinement (TSD-SR, OSEDiff or OSDFace): scale 1 "
                         "refines (the NTIRE 2025 setting on 512 face crops), 2 and 4 upscale whole images. Large "
                         "images run in overlapping latent tiles with blended borders; out of memory retries with "
                         "smaller batches and tiles. Output is pixel-aligned with the input. Follow with Color Fix "
                         "(wavelet) against the input. OSDFace restores each face at 512 in one piece (the tile "
                         "inputs do not apply; max_batch does)."),
            inputs=[
                io.Image.Input("image", tooltip="Images or face crops; a batch of same-size images runs together."),
                OneStepSR.Input("sr_model", tooltip="From the FaceMend one-step SR loader."),
                io.Combo.Input("scale", options=list(op.SCALES), default=1, tooltip=(
                    "1: same-size refinement; 2 / 4: bicubic upscale, then the diffusion step restores detail.")),
                io.Int.Input("tile_size", default=0, min=0, max=4096, step=64, tooltip=(
                    "TSD-SR and OSEDiff (OSDFace runs each face whole at 512). Denoiser tile in output pixels "
                    "(0: the backend's default, TSD-SR 512, OSEDiff 768). Images up to this area run in one piece.")),
                io.Int.Input("tile_overlap", default=-1, min=-1, max=2048, step=8, tooltip=(
                    "TSD-SR and OSEDiff (not OSDFace). Overlap of neighbouring tiles in output pixels (-1: default, "
                    "TSD-SR 64, OSEDiff 256).")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip=(
                    "Every backend. Seed of the VAE posterior sample: same seed, same output (OSDFace with "
                    "latent 'mean' draws none).")),
                io.Combo.Input("blend", options=list(op.TILE_BLENDS), default="gaussian", optional=True, tooltip=(
                    "TSD-SR and OSEDiff (not OSDFace). Tile weights: gaussian (the official TSD-SR/OSEDiff weights) "
                    "or a linear cross-fade.")),
                io.Int.Input("vae_tile_size", default=1024, min=256, max=8192, step=64, optional=True, tooltip=(
                    "TSD-SR and OSEDiff (not OSDFace). VAE encoder/decoder tile in output pixels; lower it when "
                    "memory is short. On a CPU 512 is faster (the VAE's attention grows with the square of the "
                    "tile area).")),
                io.Int.Input("max_batch", default=4, min=1, max=64, optional=True, tooltip=(
                    "Every backend. Images x tiles per network call (OSDFace: faces per call); halved "
                    "automatically on out-of-memory.")),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def validate_inputs(cls, scale=None, blend=None):
        # ComfyUI 0.3.64 does not check V3 combo values itself; a wrong one would fail only inside the run.
        return _first(_not_in("scale", scale, op.SCALES), _not_in("blend", blend, op.TILE_BLENDS))

    @classmethod
    def execute(cls, image, sr_model, scale=1, tile_size=0, tile_overlap=-1, seed=0, blend="gaussian",
                vae_tile_size=1024, max_batch=4) -> io.NodeOutput:
        (out,) = op.one_step_sr(image, sr_model, scale, tile_size, tile_overlap, seed, blend, vae_tile_size,
                                max_batch)
        return io.NodeOutput(out, ui=preview(out, cls))


class OSDFaceLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FaceMend_OSDFaceLoader", display_name="FaceMend OSDFace Loader (one-step face diffusion)",
            category=CATEGORY,
            description=("Loads OSDFace (CVPR 2025), the one-step face diffusion prior: SD-2.1-base (unet/, vae/, "
                         "scheduler/ of the diffusers folder in models/diffusers/, or the single file "
                         "v2-1_512-ema-pruned.safetensors in models/checkpoints/) and models/onestep_sr/osdface/ "
                         "with the three official files pytorch_lora_weights.safetensors, "
                         "embedding_change_weights.pth and associate_2.ckpt. Feed the One-Step Diffusion SR node "
                         "(scale 1 on 512 face crops) with it. Missing files are listed in the error with where "
                         "they go."),
            inputs=[
                io.Combo.Input("base_model", options=op.osdface_base_choices(), default=op.BASE_DEFAULTS["osdface"],
                               tooltip=(
                    "The SD-2.1-base diffusers folder in models/diffusers/ (unet/, vae/, scheduler/ are read; "
                    "no text encoder: the prompt is made from the face), or the single file "
                    "v2-1_512-ema-pruned.safetensors in models/checkpoints/ (its UNet and VAE are read).")),
                io.Combo.Input("osdface_folder", options=op.osdface_folder_choices(),
                               default=op.LORA_DEFAULTS["osdface"], tooltip=(
                    "Folder in models/onestep_sr/ with OSDFace's pytorch_lora_weights.safetensors, "
                    "embedding_change_weights.pth and associate_2.ckpt.")),
                io.Combo.Input("precision", options=list(op.PRECISIONS), default="auto", tooltip=(
                    "auto: fp16 on GPUs, fp32 on CPU (the official script runs fp32 unless --mixed_precision "
                    "fp16).")),
                io.Combo.Input("lora_mode", options=list(op.LORA_MODES), default="merged", tooltip=(
                    "merged: the LoRA added into the UNet weights once (the official --merge_lora, fastest). "
                    "applied: kept as a separate low-rank branch (the official default path); same result "
                    "within float rounding.")),
                io.Combo.Input("tokens", options=list(op.OSDFACE_TOKENS), default="embedding change", tooltip=(
                    "The released weights: 'embedding change' (77 distinct codes -> embedding_change_weights.pth). "
                    "'concat' / 'concat + position table' are the official --cat_prompt_embedding "
                    "(/ --use_pos_embedding) variants, for weights trained that way.")),
                io.Combo.Input("latent", options=list(op.LATENTS), default="sample", tooltip=(
                    "sample: the VAE posterior sampled with the SR node's seed (the official behaviour); mean: "
                    "its mean (no randomness).")),
            ],
            outputs=[OneStepSR.Output(display_name="sr_model")],
        )

    @classmethod
    def validate_inputs(cls, base_model=None, osdface_folder=None, precision=None, lora_mode=None, tokens=None,
                        latent=None):
        refused = _first(_not_in("base_model", base_model, op.osdface_base_choices()),
                         _not_in("osdface_folder", osdface_folder, op.osdface_folder_choices()),
                         _not_in("precision", precision, op.PRECISIONS),
                         _not_in("lora_mode", lora_mode, op.LORA_MODES),
                         _not_in("tokens", tokens, op.OSDFACE_TOKENS),
                         _not_in("latent", latent, op.LATENTS))
        if refused is not True or None in (base_model, osdface_folder, tokens):
            return refused
        return _first(_files_message("osdface", base_model, osdface_folder, tokens))

    @classmethod
    def fingerprint_inputs(cls, base_model, osdface_folder, precision="auto", lora_mode="merged",
                           tokens="embedding change", latent="sample"):
        return (_files_fingerprint("osdface", base_model, osdface_folder), precision, lora_mode, tokens, latent)

    @classmethod
    def execute(cls, base_model, osdface_folder, precision="auto", lora_mode="merged", tokens="embedding change",
                latent="sample") -> io.NodeOutput:
        return io.NodeOutput(op.load_osdface_model(base_model, osdface_folder, precision, lora_mode, tokens, latent))


NODES = [OneStepSRLoader, OneStepSRNode, OSDFaceLoader]
