"""Reading RestorerID's files unchanged: RestorerIDFull.ckpt and ip-adapter-faceid-plus_sd15.bin.

RestorerIDFull.ckpt is a PyTorch-Lightning checkpoint whose `state_dict` holds
    model.diffusion_model.*      the denoiser (strict: every key of our UNet, nothing else)
    structcond_stage_model.*     the structure encoder (strict)
    first_stage_model.*          the SD VAE in LDM names (strict, converted to diffusers' AutoencoderKL)
    cond_stage_model.*, Adapter.*   optional (text encoder / CLIP image encoder / ID projection; ignored here,
                                 they are read from their own files)
    betas, alphas_cumprod, ...   the DDPM schedule buffers (ignored: the schedule is recomputed)
The network widths are read from the tensors, so reduced test files load through the same code; head counts are
RestorerID's (8 in the denoiser, 4 in the structure encoder) because a state dict cannot tell them.
"""
from __future__ import annotations

import os
import re

import torch

from ..io.checkpoints import load_weights
from ..io.errors import ModelFileInvalid
from .structure_encoder import StructureEncoder, StructureEncoderConfig
from .unet import RestorerIDUNet, UNetConfig

UNET_PREFIX = "model.diffusion_model."
STRUCT_PREFIX = "structcond_stage_model."
VAE_PREFIX = "first_stage_model."
OPTIONAL_PREFIXES = ("cond_stage_model.", "Adapter.", "model_ema.")
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "scale_factor", "lvlb_weights"}

TO_SAFETENSORS = ("python -c \"import torch; from safetensors.torch import save_file; "
                  "o = torch.load('{src}', map_location='cpu', weights_only=False); {pick}"
                  "save_file({{k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}}, '{dst}')\" "
                  "(run it only on a file you trust: it unpickles)")


def _read(path: str, what: str, pick: str) -> dict:
    try:
        return load_weights(path)
    except ModelFileInvalid as exc:
        if path.lower().endswith(".safetensors"):
            raise
        dst = os.path.splitext(path)[0] + ".safetensors"
        how = TO_SAFETENSORS.format(src=path, dst=dst, pick=pick)
        raise ModelFileInvalid(f"{exc}\n{what}: if this is the genuine file, its pickle holds objects that are not "
                               f"plain tensors; convert it once to safetensors and select that file:\n  {how}") from exc


def _describe_foreign(sd: dict, path: str) -> str | None:
    """A sentence naming what another kind of file is, or None."""
    keys = list(sd)
    name = os.path.basename(path)
    if any(k.startswith(UNET_PREFIX) for k in keys):
        if not any(".spade." in k for k in keys):
            return (f"{name} is a Stable Diffusion 1.x checkpoint (its UNet has no SPADE / IDBalance layers), not "
                    "RestorerIDFull.ckpt; RestorerID needs its own checkpoint (huggingface.co/YingJiacheng/RestorerID).")
        if not any(".IDBalance." in k for k in keys):
            return (f"{name} is a RestorerID stage-1 base model (SPADE but no IDBalance layers), not "
                    "RestorerIDFull.ckpt.")
        return None
    if any(k.startswith(("conv_body_first", "stylegan_decoder", "toRGB")) for k in keys):
        return f"{name} is a GFPGAN face restorer checkpoint, not RestorerID: select it in the Restorer loader."
    if any(k.startswith(("encoder.down", "decoder.up", "quant_conv")) for k in keys) and len(keys) < 400:
        return f"{name} is a VAE, not the RestorerID checkpoint."
    if "image_proj" in sd or any(k.startswith("image_proj.") for k in keys):
        return f"{name} is an IP-Adapter file, not the RestorerID checkpoint: select it as the IP-Adapter file."
    return None


def read_restorerid(path: str) -> dict:
    """{'unet', 'struct', 'vae'} state dicts (prefixes removed) from RestorerIDFull.ckpt / .safetensors."""
    pick = "sd = o['state_dict'] if 'state_dict' in o else o; "
    obj = _read(path, "RestorerIDFull.ckpt", pick)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()
                                                       if not isinstance(v, dict)):
        raise ModelFileInvalid(f"{path} does not hold a state dict of tensors.")
    foreign = _describe_foreign(sd if isinstance(sd, dict) else {}, path)
    if foreign is None and not any(k.startswith(UNET_PREFIX) for k in sd):
        foreign = (f"{os.path.basename(path)} is not a RestorerID checkpoint: it has no {UNET_PREFIX}* keys "
                   f"(first keys: {list(sd)[:4]}).")
    if foreign:
        raise ModelFileInvalid(foreign)
    parts = {"unet": {}, "struct": {}, "vae": {}}
    unknown = []
    for k, v in sd.items():
        if k.startswith(UNET_PREFIX):
            parts["unet"][k[len(UNET_PREFIX):]] = v
        elif k.startswith(STRUCT_PREFIX):
            parts["struct"][k[len(STRUCT_PREFIX):]] = v
        elif k.startswith(VAE_PREFIX):
            parts["vae"][k[len(VAE_PREFIX):]] = v
        elif not (k.startswith(OPTIONAL_PREFIXES) or k in SCHEDULE_BUFFERS):
            unknown.append(k)
    if unknown:
        raise ModelFileInvalid(f"{os.path.basename(path)} has {len(unknown)} keys RestorerID does not have, e.g. "
                               f"{unknown[:3]}: it is not RestorerIDFull.ckpt (or was saved from another model).")
    for part, prefix in (("struct", STRUCT_PREFIX), ("vae", VAE_PREFIX)):
        if not parts[part]:
            raise ModelFileInvalid(f"{os.path.basename(path)} has no {prefix}* keys: it is not the full RestorerID "
                                   "checkpoint (RestorerIDFull.ckpt holds the denoiser, structure encoder and VAE).")
    return parts


def _levels(sd: dict, block: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd for m in [re.match(rf"{block}\.(\d+)\.", k)] if m})


def _level_layout(sd: dict, attn_key: str) -> tuple[int, int, list[int], list[int]]:
    """Model width, res blocks per level, channel multipliers and attention downsampling factors of an LDM-style
    encoder, read from its input_blocks (a level has attention when its first block holds `attn_key`)."""
    mc = sd["input_blocks.0.0.weight"].shape[0]
    ids = _levels(sd, "input_blocks")
    downs = [i for i in ids if f"input_blocks.{i}.0.op.weight" in sd]
    n_levels = len(downs) + 1
    n_res = (len(ids) - 1 - len(downs)) // n_levels
    mult, attn, ds = [], [], 1
    for level in range(n_levels):
        first = 1 + level * (n_res + 1)
        mult.append(sd[f"input_blocks.{first}.0.in_layers.2.weight"].shape[0] // mc)
        if f"input_blocks.{first}.1.{attn_key}" in sd:
            attn.append(ds)
        ds *= 2
    return mc, n_res, mult, attn


def unet_config(sd: dict) -> UNetConfig:
    """The denoiser's widths from its tensors (heads: RestorerID's 8)."""
    try:
        mc, n_res, mult, attn = _level_layout(sd, "proj_in.weight")
        any_attn2 = next(k for k in sd if k.endswith("attn2.to_k.weight"))
        rank = sd[next(k for k in sd if k.endswith("attn1.to_q_lora.down.weight"))].shape[0]
        return UNetConfig(in_channels=sd["input_blocks.0.0.weight"].shape[1], out_channels=sd["out.2.weight"].shape[0],
                          model_channels=mc, num_res_blocks=n_res, attention_resolutions=tuple(attn),
                          channel_mult=tuple(mult), context_dim=sd[any_attn2].shape[1],
                          struct_channels=sd["input_blocks.1.0.spade.mlp_shared.0.weight"].shape[1], lora_rank=rank)
    except (KeyError, StopIteration, IndexError) as exc:
        raise ModelFileInvalid(f"the RestorerID denoiser weights are incomplete: no {exc}") from exc


def struct_config(sd: dict) -> StructureEncoderConfig:
    try:
        mc, n_res, mult, attn = _level_layout(sd, "qkv.weight")
        return StructureEncoderConfig(in_channels=sd["input_blocks.0.0.weight"].shape[1], model_channels=mc,
                                      out_channels=sd["fea_tran.0.out_layers.3.weight"].shape[0], num_res_blocks=n_res,
                                      attention_resolutions=tuple(attn), channel_mult=tuple(mult))
    except (KeyError, IndexError) as exc:
        raise ModelFileInvalid(f"the RestorerID structure encoder weights are incomplete: no {exc}") from exc


def _strict(module: torch.nn.Module, sd: dict, path: str, what: str, prefix: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {[prefix + k for k in missing[:3]]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {[prefix + k for k in unexpected[:3]]}")
        if wrong:
            parts.append(f"{prefix + wrong[0]} has shape {tuple(sd[wrong[0]].shape)}, expected "
                         f"{tuple(own[wrong[0]].shape)}")
        raise ModelFileInvalid(f"{os.path.basename(path)}: the {what} does not match RestorerID: {'; '.join(parts)}.")
    module.load_state_dict(sd, strict=True)


def build_unet(sd: dict, path: str, dtype=torch.float32) -> RestorerIDUNet:
    with torch.device("meta"):
        net = RestorerIDUNet(unet_config(sd))
    net = net.to_empty(device="cpu")
    _strict(net, sd, path, "denoiser (model.diffusion_model.*)", UNET_PREFIX)
    return net.to(dtype).eval().requires_grad_(False)


def build_struct(sd: dict, path: str, dtype=torch.float32) -> StructureEncoder:
    with torch.device("meta"):
        net = StructureEncoder(struct_config(sd))
    net = net.to_empty(device="cpu")
    _strict(net, sd, path, "structure encoder (structcond_stage_model.*)", STRUCT_PREFIX)
    return net.to(dtype).eval().requires_grad_(False)


def build_vae(sd: dict, path: str, dtype=torch.float32):
    """LDM AutoencoderKL tensors -> diffusers AutoencoderKL (same network; diffusers' own key conversion)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
        mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
        n_res = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
        z = sd["post_quant_conv.weight"].shape[0]
    except (KeyError, IndexError) as exc:
        raise ModelFileInvalid(f"{os.path.basename(path)}: the VAE (first_stage_model.*) is incomplete: no {exc}") from exc
    config = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(mult),
                  up_block_types=("UpDecoderBlock2D",) * len(mult), block_out_channels=tuple(ch * m for m in mult),
                  layers_per_block=n_res, latent_channels=z, norm_num_groups=32, scaling_factor=0.18215)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    vae = vae.to_empty(device="cpu")
    try:
        converted = convert_ldm_vae_checkpoint(dict(sd), vae.config)
    except (KeyError, IndexError, ValueError) as exc:
        raise ModelFileInvalid(f"{os.path.basename(path)}: the VAE (first_stage_model.*) cannot be read: {exc}") from exc
    _strict(vae, converted, path, "VAE (first_stage_model.*, in diffusers names)", "")
    return vae.to(dtype).eval().requires_grad_(False)


# --- IP-Adapter-FaceID-Plus ------------------------------------------------------------------------------------
def read_ip_adapter(path: str) -> dict:
    """The `image_proj` state dict of ip-adapter-faceid-plus_sd15.bin ({'image_proj', 'ip_adapter'}), or of a
    safetensors conversion with 'image_proj.'-prefixed keys."""
    obj = _read(path, "ip-adapter-faceid-plus_sd15.bin",
                "sd = {f'{g}.{k}': v for g in o for k, v in o[g].items()}; ")
    if isinstance(obj.get("image_proj"), dict):
        proj = obj["image_proj"]
    else:
        proj = {k[len("image_proj."):]: v for k, v in obj.items() if k.startswith("image_proj.")}
    if "perceiver_resampler.proj_in.weight" not in proj:
        kind = "IP-Adapter FaceID (without Plus)" if "norm.weight" in proj else "not an IP-Adapter-FaceID-Plus file"
        raise ModelFileInvalid(f"{os.path.basename(path)} is {kind}: RestorerID needs ip-adapter-faceid-plus_sd15.bin "
                               "(huggingface.co/h94/IP-Adapter-FaceID; the FaceID-Plus v1, not PlusV2 or SDXL).")
    return proj


def image_proj_to_diffusers(proj: dict) -> dict:
    """ProjPlusModel keys -> diffusers IPAdapterFaceIDPlusImageProjection keys (to_kv split into to_k / to_v)."""
    out = {}
    ff = {"0": "ff.0", "1": "ff.1.net.0.proj", "3": "ff.1.net.2"}
    attn = {"norm1": "ln0", "norm2": "ln1", "to_q": "attn.to_q", "to_out": "attn.to_out.0"}
    for k, v in proj.items():
        if k.startswith("proj."):
            idx, leaf = k.split(".")[1:]
            out[f"proj.net.{'0.proj' if idx == '0' else idx}.{leaf}"] = v
        elif k.startswith("norm."):
            out[k] = v
        elif k.startswith("perceiver_resampler.layers."):
            _, _, i, j, rest = k.split(".", 4)
            if j == "0":
                name, leaf = rest.split(".", 1)
                if name == "to_kv":
                    kk, vv = v.chunk(2, dim=0)
                    out[f"layers.{i}.attn.to_k.{leaf}"], out[f"layers.{i}.attn.to_v.{leaf}"] = kk, vv
                else:
                    out[f"layers.{i}.{attn[name]}.{leaf}"] = v
            else:
                sub, leaf = rest.split(".", 1)
                out[f"layers.{i}.{ff[sub]}.{leaf}"] = v
        elif k.startswith("perceiver_resampler."):
            out[k[len("perceiver_resampler."):]] = v
        else:
            out[k] = v
    return out


def build_image_proj(proj: dict, path: str, dtype=torch.float32):
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    try:
        embed = proj["perceiver_resampler.proj_in.weight"].shape[0]
        module = IPAdapterFaceIDPlusImageProjection(
            embed_dims=embed, output_dims=proj["perceiver_resampler.proj_out.weight"].shape[0],
            hidden_dims=proj["perceiver_resampler.proj_in.weight"].shape[1],
            id_embeddings_dim=proj["proj.0.weight"].shape[1],
            depth=len({k.split(".")[2] for k in proj if k.startswith("perceiver_resampler.layers.")}),
            heads=proj["perceiver_resampler.layers.0.0.to_q.weight"].shape[0] // 64,
            num_tokens=proj["proj.2.weight"].shape[0] // embed,
            ffproj_ratio=proj["proj.0.weight"].shape[0] // proj["proj.0.weight"].shape[1])
    except (KeyError, IndexError) as exc:
        raise ModelFileInvalid(f"{os.path.basename(path)}: image_proj is incomplete: no {exc}") from exc
    _strict(module, image_proj_to_diffusers(proj), path, "ID projection (image_proj)", "image_proj.")
    return module.to(dtype).eval().requires_grad_(False)
