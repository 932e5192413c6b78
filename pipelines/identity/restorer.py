"""RestorerID assembled: the official files loaded unchanged, and the restoration of aligned face crops with a
reference identity (reference/restorerid_and_adaptation.md A.1).

Per batch of faces: LQ latent = 0.18215 * VAE posterior *sample* of 2x-1; text contexts of the fixed prompts
(77 CLIP-L tokens, `last_hidden_state`); ID tokens = FaceID-Plus projection of (ArcFace embedding, CLIP-ViT-H
penultimate features), unconditional ones from (zeros, CLIP(zeros)); context = [text | ID tokens]; the official
DDIM sampler (sampler.py); decode; the official colour fix (wavelet or AdaIN against the LQ input) on the
unclamped decode, then the clamp to [0,1], in Inference.py's order.
Random draws: face k of a call with seed s has its own CPU generator seeded s + k (+ the offset of its chunk),
drawing in the official order (posterior, x_T, per-step noise), all of it before sampling and moved to the
device in one copy. So a seed gives the same faces on every device and batch size, face 0 equals the official
run after torch.manual_seed(s), and the sampler loop does no host work.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..color.fix import wavelet_lowpass
from ..io.errors import InvalidImage, ModelFileInvalid, ModelFileNotFound
from .checkpoint import build_image_proj, build_struct, build_unet, build_vae, read_ip_adapter, read_restorerid
from .layers import FP32GroupNorm
from .reference import Reference
from .sampler import ddim_sample
from .unet import TEXT_TOKENS

DEFAULT_PROMPT = "best quality, high quality"
DEFAULT_NEGATIVE_PROMPT = "cartoon, 3d, paint, monochrome, lowres, bad anatomy, worst quality, low quality"
LATENT_SCALE = 0.18215
COLOR_FIXES = ("wavelet", "adain", "none")


def face_noise(seed: int, n: int, shape, steps: int, first: int = 0) -> torch.Tensor:
    """[steps + 2, n, *shape] float32 on the CPU: per face k (generator seeded seed + first + k) the posterior
    sample's noise, x_T and one eta noise per step, each drawn as the official loop draws it (one randn of the
    face's latent shape after another)."""
    out = torch.empty((steps + 2, n, *shape))
    for k in range(n):
        g = torch.Generator().manual_seed(int(seed) + int(first) + k)
        for j in range(steps + 2):
            out[j, k] = torch.randn(tuple(shape), generator=g)
    return out


def official_color_fix(decoded: torch.Tensor, lq: torch.Tensor, method: str) -> torch.Tensor:
    """Inference.py's colour fix of the unclamped decode against the LQ input, both in [-1,1] as there (AdaIN's
    eps makes the scale matter): wavelet_reconstruction (the decode's high frequencies + the LQ's 5-level low
    frequencies) or adaptive_instance_normalization (eps 1e-5 on the unbiased variance)."""
    if method == "wavelet":
        lows = wavelet_lowpass(torch.cat([decoded, lq]))
        return decoded - lows[:decoded.shape[0]] + lows[decoded.shape[0]:]
    if method == "adain":
        def stats(x):
            flat = x.flatten(2)
            return flat.mean(2)[..., None, None], (flat.var(2) + 1e-5).sqrt()[..., None, None]

        (mc, sc), (ms, ss) = stats(decoded), stats(lq)
        return (decoded - mc) / sc * ss + ms
    return decoded

# CLIP vision towers by width, for single files without a config (ComfyUI's models/clip_vision/*.safetensors).
_VISION_TOWERS = {1280: dict(num_attention_heads=16, hidden_act="gelu"),       # ViT-H-14 (laion2B)
                  1024: dict(num_attention_heads=16, hidden_act="quick_gelu"),  # ViT-L-14 (OpenAI)
                  768: dict(num_attention_heads=12, hidden_act="quick_gelu")}


def _fp32_group_norms(module: nn.Module) -> nn.Module:
    """diffusers' GroupNorms compute in fp32 too (the official VAE runs under autocast, which does that)."""
    for m in module.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = FP32GroupNorm
    return module


def load_image_encoder(path: str, dtype=torch.float32):
    """CLIP-ViT-H-14 from a transformers/diffusers folder (config.json + weights, or an image_encoder/ sub-folder)
    or from a single safetensors file with transformers' key names (ComfyUI's clip_vision folder)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if os.path.isdir(path):
        sub = os.path.join(path, "image_encoder")
        folder = sub if os.path.isfile(os.path.join(sub, "config.json")) else path
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelFileInvalid(f"{path} is not a CLIP vision model folder (no config.json): use the folder of "
                                   "laion/CLIP-ViT-H-14-laion2B-s32B-b79K or its single model.safetensors file.")
        try:
            return CLIPVisionModelWithProjection.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise ModelFileInvalid(f"Cannot load the CLIP vision model in {folder}: {str(exc).splitlines()[0]}") from exc
    if not os.path.isfile(path):
        raise ModelFileNotFound(f"CLIP vision model not found: {path}")
    from ..io.checkpoints import load_weights

    sd = load_weights(path)
    try:
        hidden = sd["vision_model.embeddings.class_embedding"].shape[0]
        patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        n_pos = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
        layers = len({k.split(".")[3] for k in sd if k.startswith("vision_model.encoder.layers.")})
        cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"]
                               .shape[0], num_hidden_layers=layers, patch_size=patch,
                               image_size=patch * round((n_pos - 1) ** 0.5),
                               projection_dim=sd["visual_projection.weight"].shape[0],
                               **_VISION_TOWERS.get(hidden, dict(num_attention_heads=max(1, hidden // 64),
                                                                 hidden_act="gelu")))
    except KeyError as exc:
        raise ModelFileInvalid(f"{os.path.basename(path)} is not a CLIP vision model with transformers' key names "
                               f"(no {exc}); RestorerID needs CLIP-ViT-H-14 (laion2B).") from exc
    sd.pop("vision_model.embeddings.position_ids", None)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(cfg)
    model = model.to_empty(device="cpu")
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("position_ids")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ModelFileInvalid(f"{os.path.basename(path)} does not match a CLIP vision model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}.")
    model.load_state_dict(sd, strict=False)
    if hasattr(model.vision_model.embeddings, "position_ids"):
        model.vision_model.embeddings.position_ids.copy_(torch.arange(n_pos)[None])
    return model.to(dtype).eval()


TEXT_PREFIX = "cond_stage_model.transformer."


def comfy_sd1_tokenizer() -> Optional[str]:
    """ComfyUI's own copy of the SD-1.x CLIP tokenizer files (comfy/sd1_tokenizer/), when running inside it."""
    import sys

    comfy = sys.modules.get("comfy")
    folder = os.path.join(os.path.dirname(comfy.__file__), "sd1_tokenizer") if comfy is not None and getattr(
        comfy, "__file__", None) else None
    return folder if folder and os.path.isfile(os.path.join(folder, "vocab.json")) else None


def _text_encoder_from_file(path: str, tokenizer_dir: Optional[str], dtype):
    """CLIP-L from an SD-1.x single-file checkpoint (cond_stage_model.transformer.text_model.*, transformers' names
    as LDM saved them); the tokenizer from `tokenizer_dir` (ComfyUI's sd1_tokenizer when hosted)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ..io.checkpoints import load_weights, unwrap_state_dict

    sd = unwrap_state_dict(load_weights(path), preferred_keys=("state_dict",))
    # LDM saved transformers-4 names (text_model.*); normalised here, matched to the installed version below.
    sd = {k[len(TEXT_PREFIX):]: v for k, v in sd.items() if k.startswith(TEXT_PREFIX)}
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    if "text_model.embeddings.token_embedding.weight" not in sd:
        raise ModelFileInvalid(f"{os.path.basename(path)} has no SD-1.x text encoder ({TEXT_PREFIX}text_model.*): use "
                               "a Stable Diffusion 1.5 checkpoint or diffusers folder.")
    tokenizer_dir = tokenizer_dir or comfy_sd1_tokenizer()
    if tokenizer_dir is None:
        raise ModelFileNotFound(f"{os.path.basename(path)} holds the text encoder but no tokenizer: outside ComfyUI "
                                "use the stable-diffusion-v1-5 diffusers folder (text_encoder/ + tokenizer/) instead.")
    vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
    sd.pop("text_model.embeddings.position_ids", None)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=max(1, hidden // 64),
                         intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                         num_hidden_layers=len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")}),
                         max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
                         hidden_act="quick_gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1)
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    model = model.to_empty(device="cpu")
    own = {k for k in model.state_dict() if not k.endswith("position_ids")}
    if not any(k.startswith("text_model.") for k in own):  # transformers 5 drops the prefix
        sd = {k[len("text_model."):]: v for k, v in sd.items()}
    if own != set(sd):
        raise ModelFileInvalid(f"{os.path.basename(path)}: the text encoder does not match CLIP-L: missing "
                               f"{sorted(own - set(sd))[:3]}, unexpected {sorted(set(sd) - own)[:3]}.")
    model.load_state_dict(sd, strict=False)
    emb = getattr(model, "text_model", model).embeddings
    if hasattr(emb, "position_ids"):
        emb.position_ids.copy_(torch.arange(emb.position_ids.shape[-1])[None])
    return model.to(dtype).eval(), CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def load_text_encoder(path: str, dtype=torch.float32, tokenizer_dir: Optional[str] = None):
    """SD-1.5's CLIP-L text encoder and tokenizer from a diffusers model folder (text_encoder/, tokenizer/), or
    from an SD-1.x single-file checkpoint (then the tokenizer from `tokenizer_dir` / ComfyUI's sd1_tokenizer)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    if os.path.isfile(path):
        return _text_encoder_from_file(path, tokenizer_dir, dtype)
    te, tok = os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
    if not (os.path.isdir(te) and os.path.isdir(tok)):
        raise ModelFileNotFound(f"{path} is not a Stable Diffusion 1.5 diffusers folder: it needs text_encoder/ and "
                                "tokenizer/ (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 in models/diffusers/; "
                                "only those two sub-folders are read), or give an SD-1.5 single-file checkpoint.")
    try:
        return (CLIPTextModel.from_pretrained(te, torch_dtype=dtype, local_files_only=True).eval(),
                CLIPTokenizer.from_pretrained(tok, local_files_only=True))
    except (OSError, ValueError) as exc:
        raise ModelFileInvalid(f"Cannot load the text encoder in {path}: {str(exc).splitlines()[0]}") from exc


class RestorerID:
    def __init__(self, unet, struct, vae, image_proj, image_encoder, text_encoder, tokenizer, dtype=torch.float32,
                 files: Optional[dict] = None):
        self.unet, self.struct, self.vae = unet, struct, _fp32_group_norms(vae)
        self.image_proj, self.image_encoder = image_proj, image_encoder
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.dtype = dtype
        self.files = files or {}
        self._text_cache: dict = {}

    @classmethod
    def load(cls, checkpoint: str, ip_adapter: str, image_encoder: str, text_encoder: str,
             device="cpu", dtype=torch.float32, tokenizer: Optional[str] = None) -> "RestorerID":
        for p in (checkpoint, ip_adapter):
            if not os.path.isfile(p):
                raise ModelFileNotFound(f"Model file not found: {p}")
        parts = read_restorerid(checkpoint)
        unet = build_unet(parts["unet"], checkpoint, dtype)
        struct = build_struct(parts["struct"], checkpoint, dtype)
        vae = build_vae(parts["vae"], checkpoint, dtype)
        del parts
        proj = build_image_proj(read_ip_adapter(ip_adapter), ip_adapter, dtype)
        enc = load_image_encoder(image_encoder, dtype)
        te, tok = load_text_encoder(text_encoder, dtype, tokenizer)
        if proj.proj_in.in_features != enc.config.hidden_size:
            raise ModelFileInvalid(f"the CLIP vision model {image_encoder} is {enc.config.hidden_size} wide but the "
                                   f"FaceID-Plus projection expects {proj.proj_in.in_features}: use CLIP-ViT-H-14.")
        if te.config.hidden_size != unet.cfg.context_dim:
            raise ModelFileInvalid(f"the text encoder in {text_encoder} is {te.config.hidden_size} wide, RestorerID "
                                   f"expects {unet.cfg.context_dim} (SD-1.5's CLIP-L).")
        files = {"checkpoint": checkpoint, "ip_adapter": ip_adapter, "image_encoder": image_encoder,
                 "text_encoder": text_encoder}
        return cls(unet, struct, vae, proj, enc, te, tok, dtype, files).to(device)

    # -- placement ---------------------------------------------------------------------------------------------
    def modules(self):
        return (self.unet, self.struct, self.vae, self.image_proj, self.image_encoder, self.text_encoder)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device) -> "RestorerID":
        for m in self.modules():
            m.to(device)
        device = torch.device(device)
        self._text_cache = {(prompt, str(device)): v.to(device) for (prompt, _), v in self._text_cache.items()}
        return self

    def model_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.modules() for p in m.parameters())

    def latent_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x the denoiser's downsamplings)."""
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return vae_factor * 2 ** (len(self.unet.cfg.channel_mult) - 1)

    # -- conditioning ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        # Keyed by device too: a host that moves the modules itself (not through .to) gets embeddings on the
        # modules' device, never a stale copy on the old one.
        key = (prompt, str(self.device))
        if key not in self._text_cache:
            ids = self.tokenizer([prompt], truncation=True, max_length=TEXT_TOKENS, padding="max_length",
                                 return_tensors="pt").input_ids.to(self.device)
            self._text_cache[key] = self.text_encoder(input_ids=ids).last_hidden_state.to(self.dtype)
        return self._text_cache[key]

    @torch.no_grad()
    def id_tokens(self, ref: Reference) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) ID tokens [1, n_id, 768] of a reference."""
        pix = ref.clip_pixels.to(self.device, self.dtype)
        feats = self.image_encoder(pix, output_hidden_states=True).hidden_states[-2]
        zero = self.image_encoder(torch.zeros_like(pix[:1]), output_hidden_states=True).hidden_states[-2]
        emb = ref.id_embed.to(self.device, self.dtype)

        def project(id_embed, clip):
            self.image_proj.clip_embeds = clip.mean(0, keepdim=True)[:, None]  # [1, 1, 257, C]
            try:
                return self.image_proj(id_embed)
            finally:
                self.image_proj.clip_embeds = None

        return project(emb, feats), project(torch.zeros_like(emb), zero)

    # -- restoration -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def restore(self, faces: torch.Tensor, ref: Reference, ip_scale=1.0, steps: int = 50, cfg: float = 4.0,
                seed: int = 0, prompt: str = DEFAULT_PROMPT, negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
                eta: float = 1.0, hook: Optional[Callable[[int], None]] = None, first: int = 0,
                color_fix: str = "none") -> torch.Tensor:
        """faces [B,3,H,W] RGB in [0,1] (aligned crops, 512 for the released model) -> restored [B,3,H,W] in [0,1].
        ip_scale: a float or one value per face. first: the index of faces[0] among all faces of the run (face k
        draws from seed + first + k). color_fix: "wavelet" / "adain" against the input, on the unclamped decode
        as the official inference does ("none": the decode clamped)."""
        if faces.ndim != 4 or faces.shape[1] != 3:
            raise InvalidImage(f"RestorerID expects [B,3,H,W] RGB faces, got {tuple(faces.shape)}")
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {COLOR_FIXES}, got {color_fix!r}")
        device = self.device
        b, _, h, w = faces.shape
        m = self.latent_multiple()
        th, tw = max(m, round(h / m) * m), max(m, round(w / m) * m)
        x = faces.to(device, torch.float32)
        if (th, tw) != (h, w):  # the denoiser needs sides divisible by m; back to the input size at the end
            x = F.interpolate(x, size=(th, tw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        dist = self.vae.encode((2 * x - 1).to(self.dtype)).latent_dist
        noise = face_noise(seed, b, dist.mean.shape[1:], steps, first).to(device)   # one copy
        z = dist.mean.float() + dist.std.float() * noise[0]
        lq_latent = LATENT_SCALE * z
        id_c, id_u = self.id_tokens(ref)
        cond = torch.cat([self.encode_prompt(prompt), id_c], 1).expand(b, -1, -1)
        uncond = torch.cat([self.encode_prompt(negative_prompt), id_u], 1).expand(b, -1, -1)
        latents = ddim_sample(self.unet, self.struct, lq_latent, cond, uncond, ip_scale=ip_scale, steps=steps,
                              cfg=cfg, eta=eta, x_T=noise[1], noise=lambda i: noise[2 + i], hook=hook)
        out = self.vae.decode((latents / LATENT_SCALE).to(self.dtype)).sample.float()
        out = ((official_color_fix(out, 2 * x - 1, color_fix) + 1) / 2).clamp(0, 1)  # fix, then clamp
        if (th, tw) != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return out
