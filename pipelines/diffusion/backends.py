"""TSD-SR and OSEDiff backends of the one-step refiner: load diffusers model folders + the official LoRA files
(TSD-SR's SD3 base also from a single-file checkpoint: sd3_single_file.py).

TSD-SR (Microtreei/TSD-SR, test/test_tsdsr.py): SD3-medium transformer + VAE; LoRA rank 64 with lora_alpha = rank
(scale 1) on the transformer (to_q/k/v, to_out.0, add_q/k/v_proj, proj, linear, proj_out) and on the VAE encoder;
files transformer.safetensors / vae.safetensors written by StableDiffusion3Pipeline.save_lora_weights, keys
'transformer.<module>.lora_A.weight' (the VAE file uses the same 'transformer.' prefix); precomputed prompt
embeddings prompt_embeds.pt [1,333,4096] and pool_embeds.pt [1,2048]; t = 1000; z0 = z - v.

OSEDiff (cswry/OSEDiff, osediff.py): SD2.1-base UNet + VAE; osediff.pkl is a torch.save dict with rank_unet,
rank_vae, the target module lists and peft state dicts ('<module>.lora_A.default_encoder.weight', plus the
fine-tuned 'conv_in.base_layer.*'); LoraConfig without lora_alpha, i.e. peft's default 8, so scale = 8 / rank;
DDPM epsilon step at t = 999 (to t = -1: z0 = (z - sqrt(1-a) eps) / sqrt(a)); the prompt goes through the SD2.1
CLIP text encoder once at load time (the official script adds RAM tags per image; here it is a fixed prompt).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch

from ..io.checkpoints import load_weights
from ..io.errors import ModelFileInvalid, ModelFileNotFound
from .lora import lora_pairs, lora_rank, merge_lora
from .refiner import Conditioning, OneStepSR, TileSettings

BACKENDS = ("tsdsr", "osediff")

TSDSR_TIMESTEP = 1000.0
OSEDIFF_TIMESTEP = 999
OSEDIFF_LORA_ALPHA = 8.0  # peft LoraConfig default; OSEDiff never sets it
OSEDIFF_DEFAULT_PROMPT = "face, portrait, person, high quality, detailed, sharp"

# What each backend needs, for the "missing files" error: (path relative to the folder, what it is).
SD3_SOURCE = ("https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers (gated: accept the "
              "Stability AI Community licence) -> models/diffusers/stable-diffusion-3-medium-diffusers/, "
              "or instead the single file sd3_medium.safetensors (sd3_medium_incl_clips*.safetensors work too) from "
              "https://huggingface.co/stabilityai/stable-diffusion-3-medium -> models/checkpoints/")
SD21_SOURCE = ("https://huggingface.co/stabilityai/stable-diffusion-2-1-base (or a mirror; CreativeML "
               "Open RAIL++-M) -> models/diffusers/stable-diffusion-2-1-base/")
TSDSR_SOURCE = ("the TSD-SR release (Google Drive / OneDrive links in https://github.com/Microtreei/TSD-SR): "
                "checkpoint/tsdsr/{transformer,vae}.safetensors and dataset/default/{prompt_embeds,pool_embeds}.pt, "
                "all four into models/onestep_sr/tsdsr/")
OSEDIFF_SOURCE = ("https://github.com/cswry/OSEDiff (preset/models/osediff.pkl, Google Drive link in its README) "
                  "-> models/onestep_sr/")

SD3_PARTS = ("transformer", "vae")
SD21_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TSDSR_FILES = ("transformer.safetensors", "vae.safetensors", "prompt_embeds.pt", "pool_embeds.pt")
SINGLE_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _has_weights(folder: str) -> bool:
    pats = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin", "model*.safetensors",
            "pytorch_model*.bin")
    return any(glob.glob(os.path.join(folder, p)) for p in pats)


def missing_base_parts(base_dir: str, parts) -> list[str]:
    """Files of a diffusers folder that are absent (config + weights per model part)."""
    missing = []
    for part in parts:
        sub = os.path.join(base_dir, part)
        if part == "tokenizer":
            if not (glob.glob(os.path.join(sub, "*.json")) or glob.glob(os.path.join(sub, "*.txt"))):
                missing.append(f"{part}/ (tokenizer_config.json, vocab.json, merges.txt)")
            continue
        if part == "scheduler":
            if not os.path.isfile(os.path.join(sub, "scheduler_config.json")):
                missing.append(f"{part}/scheduler_config.json")
            continue
        if not os.path.isfile(os.path.join(sub, "config.json")):
            missing.append(f"{part}/config.json")
        if not _has_weights(sub):
            missing.append(f"{part}/diffusion_pytorch_model.safetensors (or model.safetensors / sharded files)")
    return missing


def is_single_file(base: str) -> bool:
    """A single-file checkpoint (models/checkpoints/) rather than a diffusers folder."""
    return os.path.isfile(base) or base.lower().endswith(SINGLE_FILE_EXTENSIONS)


def missing_files_error(backend: str, base_dir: str, base_missing: list, lora_missing: list, base_source: str,
                        lora_source: str) -> ModelFileNotFound:
    lines = [f"{backend}: model files are missing."]
    if base_missing and is_single_file(base_dir):
        lines.append(f"Base model file {base_dir} does not exist.")
        lines.append(f"  Get the diffusers folder or the single file from {base_source}")
    elif base_missing:
        lines.append(f"Base model folder {base_dir}" + (" does not exist" if not os.path.isdir(base_dir) else "")
                     + "; it needs:")
        lines += [f"  - {os.path.join(base_dir, m)}" for m in base_missing]
        lines.append(f"  Get them from {base_source}")
    if lora_missing:
        lines.append("LoRA / embedding files needed:")
        lines += [f"  - {m}" for m in lora_missing]
        lines.append(f"  Get them from {lora_source}")
    lines.append("FaceMend never downloads models by itself.")
    return ModelFileNotFound("\n".join(lines))


def _load_tensor_file(path: str) -> torch.Tensor:
    obj = load_weights(path) if not path.endswith(".pkl") else _torch_load(path)
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor):
        raise ModelFileInvalid(f"{path} holds a {type(obj).__name__}, expected one tensor (prompt embeddings)")
    return obj


def _torch_load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure becomes an actionable message
        raise ModelFileInvalid(f"Cannot read {path} ({os.path.getsize(path)} bytes): {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:300]}. Corrupt or not the official file?") from exc


def _from_pretrained(cls, base_dir: str, part: str, dtype):
    try:
        return cls.from_pretrained(base_dir, subfolder=part, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelFileInvalid(f"Cannot load {os.path.join(base_dir, part)} as a diffusers {cls.__name__}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc


def _prepare(modules, device, dtype):
    for m in modules:
        m.requires_grad_(False)
        m.eval()
        torch.nn.Module.to(m, device=device, dtype=dtype)  # diffusers .to() warns on dtype casts


# --- TSD-SR ------------------------------------------------------------------------------------------------
def check_tsdsr_files(base_dir: str, lora_dir: str) -> None:
    """ModelFileNotFound listing every file TSD-SR needs that is absent (no weights are read): what load_tsdsr
    raises, and what the loader node's validation reports before a run."""
    if is_single_file(base_dir):
        base_missing = [] if os.path.isfile(base_dir) else [os.path.basename(base_dir)]
    else:
        base_missing = missing_base_parts(base_dir, SD3_PARTS)
    lora_missing = [os.path.join(lora_dir, f) for f in TSDSR_FILES if not os.path.isfile(os.path.join(lora_dir, f))]
    if base_missing or lora_missing:
        raise missing_files_error("TSD-SR", base_dir, base_missing, lora_missing, SD3_SOURCE, TSDSR_SOURCE)


def check_osediff_files(base_dir: str, pkl_path: str) -> None:
    """ModelFileInvalid for a single-file base, ModelFileNotFound listing the absent files (no weights are read)."""
    if is_single_file(base_dir):
        raise ModelFileInvalid(
            f"OSEDiff reads the SD2.1-base diffusers folder only, not a single-file checkpoint ({base_dir}): its "
            f"prompt needs the tokenizer files a single file lacks. Get the folder from {SD21_SOURCE}")
    base_missing = missing_base_parts(base_dir, SD21_PARTS)
    lora_missing = [] if os.path.isfile(pkl_path) else [pkl_path]
    if base_missing or lora_missing:
        raise missing_files_error("OSEDiff", base_dir, base_missing, lora_missing, SD21_SOURCE, OSEDIFF_SOURCE)


def load_tsdsr(base_dir: str, lora_dir: str, device="cpu", dtype=torch.float32, transformer_config=None,
               vae_config=None) -> OneStepSR:
    """base_dir: an SD3-medium diffusers folder or a single-file checkpoint (sd3_medium*.safetensors). For single
    files, transformer_config / vae_config (dict, config.json or its folder) replace the shipped SD3-medium
    configs (tests use tiny ones)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    check_tsdsr_files(base_dir, lora_dir)
    single = is_single_file(base_dir)
    # Merge in float32, then cast: LoRA deltas are small against fp16 weights.
    if single:
        from .sd3_single_file import load_sd3_single_file

        transformer, vae = load_sd3_single_file(base_dir, transformer_config, vae_config, torch.float32)
    else:
        transformer = _from_pretrained(SD3Transformer2DModel, base_dir, "transformer", torch.float32)
        vae = _from_pretrained(AutoencoderKL, base_dir, "vae", torch.float32)
    for name, model, what in (("transformer.safetensors", transformer, "SD3 transformer"),
                              ("vae.safetensors", vae, "VAE")):
        path = os.path.join(lora_dir, name)
        pairs = lora_pairs(load_weights(path), path, strip_prefixes=("transformer.", "vae."))
        if not pairs:
            raise ModelFileInvalid(f"{path} holds no LoRA weights (keys like "
                                   "'transformer.<module>.lora_A.weight' expected)")
        if what == "VAE" and any(not m.startswith(("encoder.", "quant_conv")) for m in pairs):
            raise ModelFileInvalid(f"{path}: TSD-SR's VAE LoRA targets only the encoder; found "
                                   f"{[m for m in pairs if not m.startswith('encoder.')][:3]}")
        lora_rank(pairs)
        merge_lora(model, pairs, 1.0, path, what)  # lora_alpha == rank in TSD-SR
    prompt = _load_tensor_file(os.path.join(lora_dir, "prompt_embeds.pt"))
    pooled = _load_tensor_file(os.path.join(lora_dir, "pool_embeds.pt"))
    return tsdsr_from_modules(transformer, vae, prompt, pooled, device, dtype,
                              f"TSD-SR on {os.path.basename(os.path.normpath(base_dir))}", base_dir)


def tsdsr_from_modules(transformer, vae, prompt: torch.Tensor, pooled: torch.Tensor, device="cpu",
                       dtype=torch.float32, description: str = "TSD-SR", where: str = "the model") -> OneStepSR:
    """The TSD-SR step around an SD3 transformer and VAE whose LoRAs are already merged (also used by the
    benchmark's real-size random models)."""
    if prompt.ndim == 2:
        prompt = prompt[None]
    if pooled.ndim == 1:
        pooled = pooled[None]
    cfg = transformer.config
    if prompt.shape[-1] != cfg.joint_attention_dim or pooled.shape[-1] != cfg.pooled_projection_dim:
        raise ModelFileInvalid(
            f"prompt embeddings {tuple(prompt.shape)} / pooled {tuple(pooled.shape)} do not fit the transformer "
            f"(expects [..,{cfg.joint_attention_dim}] and [..,{cfg.pooled_projection_dim}]; the official files "
            "are [1,333,4096] and [1,2048])")
    if vae.config.latent_channels != cfg.in_channels:
        raise ModelFileInvalid(f"{where}: VAE latent channels {vae.config.latent_channels} != transformer "
                               f"input channels {cfg.in_channels}; is this an SD3 folder?")
    cond = Conditioning(prompt=prompt[:1], pooled=pooled[:1])  # buffers: they move with OneStepSR.to
    _prepare((transformer, vae, cond), device, dtype)

    def denoise(z):
        n = z.shape[0]
        t = torch.full((n,), TSDSR_TIMESTEP, device=z.device, dtype=z.dtype)
        return transformer(hidden_states=z, timestep=t, encoder_hidden_states=cond.prompt.expand(n, -1, -1),
                           pooled_projections=cond.pooled.expand(n, -1), return_dict=False)[0]

    def update(z, v):
        return z - v  # flow matching: x0 = x_t - sigma * v at sigma = 1

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return OneStepSR("TSD-SR", vae, denoise, update, [transformer, vae, cond], size_multiple=factor * cfg.patch_size,
                     tiles=TileSettings(latent_tile=64, latent_overlap=8), description=description)


# --- OSEDiff -----------------------------------------------------------------------------------------------
@dataclass
class OSEDiffCheckpoint:
    rank_unet: int
    rank_vae: int
    unet: dict
    vae: dict


def read_osediff_pkl(path: str) -> OSEDiffCheckpoint:
    obj = _torch_load(path)
    need = ("rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae")
    if not isinstance(obj, dict) or any(k not in obj for k in need):
        found = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise ModelFileInvalid(f"{path} is not an OSEDiff checkpoint: expected keys {need}, found {found}")
    return OSEDiffCheckpoint(int(obj["rank_unet"]), int(obj["rank_vae"]), obj["state_dict_unet"],
                             obj["state_dict_vae"])


def _apply_osediff_state(model, sd: dict, rank: int, path: str, what: str) -> None:
    pairs = lora_pairs(sd, path)
    if pairs and lora_rank(pairs) != rank:
        raise ModelFileInvalid(f"{path}: {what} LoRA rank {lora_rank(pairs)} != rank {rank} stored in the file")
    # Fine-tuned base weights of LoRA-wrapped modules (OSEDiff trains the UNet's conv_in): 'x.base_layer.w'.
    own = model.state_dict()
    with torch.no_grad():
        for key, value in sd.items():
            if ".base_layer." not in key:
                continue
            target = key.replace(".base_layer.", ".")
            if target not in own or own[target].shape != value.shape:
                raise ModelFileInvalid(f"{path}: {key} does not fit the {what} ({target} "
                                       f"{tuple(own[target].shape) if target in own else 'absent'})")
            own[target].copy_(value.to(own[target].dtype))
    merge_lora(model, pairs, OSEDIFF_LORA_ALPHA / rank, path, what)


def encode_prompt(base_dir: str, prompt: str, device, dtype) -> torch.Tensor:
    """[1,77,C] CLIP text-encoder hidden states of `prompt` (SD2.1: last layer of the pruned OpenCLIP)."""
    from transformers import AutoTokenizer, CLIPTextModel

    try:
        tok = AutoTokenizer.from_pretrained(os.path.join(base_dir, "tokenizer"), local_files_only=True)
        enc = CLIPTextModel.from_pretrained(os.path.join(base_dir, "text_encoder"), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelFileInvalid(f"Cannot load the text encoder/tokenizer of {base_dir}: {exc}") from exc
    ids = tok(prompt, max_length=tok.model_max_length, padding="max_length", truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        emb = enc(ids)[0]
    del enc
    return emb.to(device, dtype)


def load_osediff(base_dir: str, pkl_path: str, device="cpu", dtype=torch.float32,
                 prompt: str = OSEDIFF_DEFAULT_PROMPT) -> OneStepSR:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    check_osediff_files(base_dir, pkl_path)
    ckpt = read_osediff_pkl(pkl_path)
    unet = _from_pretrained(UNet2DConditionModel, base_dir, "unet", torch.float32)
    vae = _from_pretrained(AutoencoderKL, base_dir, "vae", torch.float32)
    _apply_osediff_state(unet, ckpt.unet, ckpt.rank_unet, pkl_path, "SD2.1 UNet")
    _apply_osediff_state(vae, ckpt.vae, ckpt.rank_vae, pkl_path, "VAE")
    scheduler = DDPMScheduler.from_pretrained(base_dir, subfolder="scheduler", local_files_only=True)
    embeds = encode_prompt(base_dir, prompt, device, dtype)
    return osediff_from_modules(unet, vae, scheduler, embeds, device, dtype,
                                f"OSEDiff on {os.path.basename(os.path.normpath(base_dir))}")


def osediff_from_modules(unet, vae, scheduler, embeds: torch.Tensor, device="cpu", dtype=torch.float32,
                         description: str = "OSEDiff") -> OneStepSR:
    """The OSEDiff step around an SD2.1 UNet and VAE whose LoRAs are already merged."""
    alpha = float(scheduler.alphas_cumprod[OSEDIFF_TIMESTEP])
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ModelFileInvalid(f"scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction)")
    cond = Conditioning(embeds=embeds)  # a buffer: it moves with OneStepSR.to
    _prepare((unet, vae, cond), device, dtype)

    def denoise(z):
        n = z.shape[0]
        t = torch.full((n,), OSEDIFF_TIMESTEP, device=z.device, dtype=torch.long)
        return unet(z, t, encoder_hidden_states=cond.embeds.expand(n, -1, -1), return_dict=False)[0]

    a, s = alpha ** 0.5, (1 - alpha) ** 0.5

    def update(z, pred):
        # DDPMScheduler.step from t=999 to t=-1 (alpha_prev = 1): the prediction of x0, in float32.
        z32, p32 = z.float(), pred.float()
        x0 = (z32 - s * p32) / a if kind == "epsilon" else a * z32 - s * p32
        return x0.to(z.dtype)

    return OneStepSR("OSEDiff", vae, denoise, update, [unet, vae, cond], size_multiple=8,
                     tiles=TileSettings(latent_tile=96, latent_overlap=32), description=description)
