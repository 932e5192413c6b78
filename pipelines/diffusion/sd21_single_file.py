"""Stable Diffusion 2.1-base single-file checkpoints (ComfyUI's models/checkpoints/v2-1_512-*.safetensors) as the
diffusers UNet and VAE, offline (OSDFace's base model).

The file holds the UNet under 'model.diffusion_model.' and the VAE under 'first_stage_model.' in Stability's original
layout ('cond_stage_model.*', the text encoder, is never read: OSDFace prompts with tokens made from the face).
diffusers' own key conversions (convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint) are applied to those
tensors, read lazily, into modules built from the shipped stable-diffusion-2-1-base configs (configs/sd21_base/).
The layout is checked on the meta device, from the header's shapes, before any tensor is read. SD-2.1-base and the
768 v-prediction SD-2.1 share their shapes: the shipped scheduler config is the base model's (epsilon).
"""
from __future__ import annotations

import json
import os

import torch

from ..io.errors import ModelFileInvalid, ModelFileNotFound
from .sd3_single_file import _Header, _config, _empty, _load, describe_checkpoint

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sd21_base")
EXPECTED = ("the single-file Stable Diffusion 2.1-base checkpoint (v2-1_512-ema-pruned.safetensors or "
            "v2-1_512-nonema-pruned.safetensors) with the UNet under 'model.diffusion_model.*' and the VAE under "
            "'first_stage_model.*'")


def shipped_config(part: str) -> dict:
    """The SD-2.1-base diffusers config of `part` ('unet', 'vae' or 'scheduler') shipped with the pack."""
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    with open(os.path.join(CONFIG_DIR, part, name), encoding="utf-8") as f:
        return json.load(f)


def _converted(fn, tensors: dict, path: str, what: str, config: dict) -> dict:
    try:
        return fn(tensors, config)
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        raise ModelFileInvalid(f"{path}: the {what} tensors are incomplete or not in the original SD 2.x layout "
                               f"({type(exc).__name__}: {str(exc)[:200]}). Expected {EXPECTED}.") from exc


def _check(converted: dict, model, what: str, path: str, found: str) -> None:
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    missing, extra = sorted(set(own) - set(got)), sorted(set(got) - set(own))
    wrong = sorted(k for k in set(own) & set(got) if own[k] != got[k])
    if missing or extra or wrong:
        parts = [f"{len(x)} {label} (e.g. {x[:2]})" for x, label in
                 ((missing, "tensors absent"), (extra, "tensors without a place"), (wrong, "shape mismatches"))
                 if x]
        raise ModelFileInvalid(f"{path}: the {what} does not fit the SD-2.1-base config: {'; '.join(parts)}. The file "
                               f"holds {found}. Expected {EXPECTED}.")


def load_sd21_single_file(path: str, unet_config=None, vae_config=None, dtype=torch.float32):
    """(UNet2DConditionModel, AutoencoderKL) from a single-file SD-2.x checkpoint. unet_config / vae_config: a
    diffusers config dict, config.json or its folder (None: the shipped SD-2.1-base configs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    if not os.path.isfile(path):
        raise ModelFileNotFound(f"{path} does not exist. Expected {EXPECTED} in models/checkpoints/.")
    if not path.lower().endswith(".safetensors"):
        raise ModelFileInvalid(f"{path}: single-file checkpoints are read as .safetensors only (expected {EXPECTED})")
    header = _Header(path)
    found = describe_checkpoint(header)
    probe = f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if probe not in header or header.shape(probe)[-1] != 1024:
        raise ModelFileInvalid(f"{path} is not a Stable Diffusion 2.x checkpoint: it holds {found}. "
                               f"Expected {EXPECTED}.")
    if f"{VAE_PREFIX}encoder.conv_in.weight" not in header:
        raise ModelFileInvalid(f"{path} holds {found} but no VAE ('first_stage_model.*'). Expected {EXPECTED}.")
    ucfg = shipped_config("unet") if unet_config is None else _config(unet_config, "unet")
    vcfg = shipped_config("vae") if vae_config is None else _config(vae_config, "vae")
    unet, vae = _empty(UNet2DConditionModel, ucfg), _empty(AutoencoderKL, vcfg)
    # Layout check from the header alone (meta tensors): a wrong model fails before gigabytes are read.
    _check(_converted(convert_ldm_unet_checkpoint, header.meta(UNET_PREFIX), path, "UNet", ucfg), unet, "UNet",
           path, found)
    _check(_converted(convert_ldm_vae_checkpoint, header.meta(VAE_PREFIX), path, "VAE", vcfg), vae, "VAE", path,
           found)
    unet = _load(unet, _converted(convert_ldm_unet_checkpoint, header.read(UNET_PREFIX, dtype), path, "UNet", ucfg),
                 path, "UNet")
    vae = _load(vae, _converted(convert_ldm_vae_checkpoint, header.read(VAE_PREFIX, dtype), path, "VAE", vcfg), path,
                "VAE")
    return unet, vae
