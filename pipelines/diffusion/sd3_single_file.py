"""Stable Diffusion 3 single-file checkpoints (ComfyUI's models/checkpoints/sd3_medium*.safetensors) as diffusers
modules, offline.

The file holds the MMDiT under 'model.diffusion_model.' and the VAE under 'first_stage_model.' in Stability's
original layout (the _incl_clips variants add 'text_encoders.*', which TSD-SR does not need). diffusers'
`from_single_file` would fetch the architecture config from the Hub; here the config is a parameter whose
default is the shipped stable-diffusion-3-medium-diffusers config (configs/sd3_medium/), and diffusers' own
key conversions are applied to exactly the tensors we need, read lazily with safetensors, so a 10 GB
incl_clips file never loads its text encoders. The layout is checked against the config on the meta device
(header shapes only) before any tensor is read.
"""
from __future__ import annotations

import json
import os

import torch

from ..io.errors import ModelFileInvalid, ModelFileNotFound

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sd3_medium")
EXPECTED = ("the single-file Stable Diffusion 3 medium checkpoint (sd3_medium.safetensors, or "
            "sd3_medium_incl_clips*.safetensors) with the MMDiT under 'model.diffusion_model.joint_blocks.*' and "
            "the VAE under 'first_stage_model.*'")


def shipped_config(part: str) -> dict:
    """The SD3-medium diffusers config of `part` ('transformer' or 'vae') shipped with the pack."""
    with open(os.path.join(CONFIG_DIR, part, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _config(config, part: str) -> dict:
    if config is None:
        return shipped_config(part)
    if isinstance(config, (str, os.PathLike)):
        path = os.path.join(config, "config.json") if os.path.isdir(config) else str(config)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return dict(config)


class _Header:
    """Key names and shapes of a .safetensors file, from its header only; tensors on demand."""

    def __init__(self, path: str):
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise ModelFileNotFound(f"{path} does not exist. Expected {EXPECTED} in models/checkpoints/.")
        if not path.lower().endswith(".safetensors"):
            raise ModelFileInvalid(f"{path}: single-file SD3 checkpoints are read as .safetensors only "
                                   f"(expected {EXPECTED})")
        self.path = path
        try:
            self.file = safe_open(path, framework="pt", device="cpu")
        except Exception as exc:  # noqa: BLE001 - a broken header becomes an actionable message
            raise ModelFileInvalid(f"Cannot read {path} ({os.path.getsize(path)} bytes) as safetensors: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
        self.keys = list(self.file.keys())
        self._set = set(self.keys)

    def __contains__(self, key):
        return key in self._set

    def shape(self, key) -> tuple:
        return tuple(self.file.get_slice(key).get_shape())

    def meta(self, prefix: str) -> dict:
        return {k: torch.empty(self.shape(k), device="meta") for k in self.keys if k.startswith(prefix)}

    def read(self, prefix: str, dtype) -> dict:
        return {k: self.file.get_tensor(k).to(dtype) for k in self.keys if k.startswith(prefix)}


def describe_checkpoint(header: _Header) -> str:
    """What a checkpoint holds, in words (for 'wrong kind of file' errors)."""
    keys, p = header.keys, TRANSFORMER_PREFIX
    extras = []
    if any(k.startswith("text_encoders.") for k in keys):
        extras.append("text encoders")
    if any(k.startswith(VAE_PREFIX) for k in keys):
        extras.append("a VAE")
    plus = f" plus {' and '.join(extras)}" if extras else ""
    if f"{p}joint_blocks.0.x_block.attn.qkv.weight" in header:
        depth = len({k.split(".")[3] for k in keys if k.startswith(f"{p}joint_blocks.")})
        embed = f"{p}x_embedder.proj.weight"
        width = header.shape(embed)[0] if embed in header else "?"
        kind = "an SD3-family MMDiT"
        if any(".attn2." in k for k in keys if k.startswith(p)):
            kind = "an SD3.5-medium-style MMDiT (dual attention layers)"
        elif any(".attn.ln_q." in k for k in keys if k.startswith(p)):
            kind = "an SD3.5-style MMDiT (qk norm)"
        return f"{kind} with {depth} blocks of width {width}{plus}"
    if "joint_blocks.0.x_block.attn.qkv.weight" in header:
        return "an SD3 MMDiT alone in the original layout (no 'model.diffusion_model.' prefix, no VAE)"
    if "transformer_blocks.0.attn.to_q.weight" in header and "pos_embed.proj.weight" in header:
        return ("a diffusers-format SD3 transformer (the transformer/diffusion_pytorch_model.safetensors of a "
                "diffusers folder: use that folder, with its config.json, in models/diffusers/)")
    if f"{p}double_blocks.0.img_attn.qkv.weight" in header or "double_blocks.0.img_attn.qkv.weight" in header:
        return "a Flux transformer"
    if f"{p}input_blocks.0.0.weight" in header:
        if f"{p}label_emb.0.0.weight" in header or any(k.startswith("conditioner.embedders.") for k in keys):
            return f"a Stable Diffusion XL UNet{plus}"
        v2 = f"{p}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        if v2 in header and header.shape(v2)[-1] == 1024:
            return f"a Stable Diffusion 2.x UNet{plus}"
        return f"a Stable Diffusion 1.x-style UNet{plus}"
    if "encoder.down.0.block.0.conv1.weight" in header or "encoder.down_blocks.0.resnets.0.conv1.weight" in header:
        return "a VAE alone"
    return f"an unknown model ({len(keys)} tensors; first keys {keys[:4]})"


def _empty(cls, config: dict):
    with torch.device("meta"):
        return cls.from_config(config)


def _check_layout(converted: dict, model, what: str, path: str, found: str, config_note: str) -> None:
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    missing = sorted(set(own) - set(got))
    extra = sorted(set(got) - set(own))
    wrong = sorted(k for k in set(own) & set(got) if own[k] != got[k])
    if not (missing or extra or wrong):
        return
    lines = [f"{path}: the {what} does not fit {config_note}. The file holds {found}."]
    if wrong:
        lines.append("Shape mismatches (file vs config): " + ", ".join(
            f"{k} {got[k]} vs {own[k]}" for k in wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""))
    if missing:
        lines.append(f"{len(missing)} tensors the config needs are absent, e.g. {missing[:3]}")
    if extra:
        lines.append(f"{len(extra)} tensors the config has no place for, e.g. {extra[:3]}")
    lines.append(f"Expected {EXPECTED}.")
    raise ModelFileInvalid("\n".join(lines))


def _convert(fn, tensors: dict, path: str, what: str, *args) -> dict:
    try:
        return fn(tensors, *args)
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        raise ModelFileInvalid(f"{path}: the {what} tensors are incomplete or not in the original SD3 layout "
                               f"({type(exc).__name__}: {str(exc)[:200]}). Expected {EXPECTED}.") from exc


def _load(model, converted: dict, path: str, what: str):
    model.load_state_dict(converted, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # a non-persistent buffer the file cannot fill: would silently stay empty
        raise ModelFileInvalid(f"{path}: the {what} built from the config still has empty tensors {left[:3]}")
    return model.eval().requires_grad_(False)


def load_sd3_single_file(path: str, transformer_config=None, vae_config=None, dtype=torch.float32):
    """(SD3Transformer2DModel, AutoencoderKL) from a single-file SD3 checkpoint.

    transformer_config / vae_config: a diffusers config dict, a config.json path or its folder; None = the shipped
    SD3-medium configs. Only 'model.diffusion_model.*' and 'first_stage_model.*' tensors are read.
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    header = _Header(path)
    found = describe_checkpoint(header)
    if f"{TRANSFORMER_PREFIX}joint_blocks.0.x_block.attn.qkv.weight" not in header:
        raise ModelFileInvalid(f"{path} is not a Stable Diffusion 3 checkpoint: it holds {found}. Expected {EXPECTED}.")
    if f"{VAE_PREFIX}encoder.conv_in.weight" not in header:
        raise ModelFileInvalid(f"{path} holds {found} but no VAE ('first_stage_model.*'). Expected {EXPECTED}.")
    shipped = transformer_config is None and vae_config is None
    note = "the shipped SD3-medium config" if shipped else "the given config"
    tcfg, vcfg = _config(transformer_config, "transformer"), _config(vae_config, "vae")
    transformer, vae = _empty(SD3Transformer2DModel, tcfg), _empty(AutoencoderKL, vcfg)

    def tr_convert(tensors):
        return _convert(convert_sd3_transformer_checkpoint_to_diffusers, tensors, path, "MMDiT")

    def vae_convert(tensors):
        return _convert(convert_ldm_vae_checkpoint, tensors, path, "VAE", vcfg)

    # Layout check from the header alone (meta tensors): a wrong model fails before gigabytes are read.
    _check_layout(tr_convert(header.meta(TRANSFORMER_PREFIX)), transformer, "MMDiT", path, found, note)
    _check_layout(vae_convert(header.meta(VAE_PREFIX)), vae, "VAE", path, found, note)
    transformer = _load(transformer, tr_convert(header.read(TRANSFORMER_PREFIX, dtype)), path, "MMDiT")
    vae = _load(vae, vae_convert(header.read(VAE_PREFIX, dtype)), path, "VAE")
    return transformer, vae
