"""Diffusers SD3 modules written back in Stability's original single-file layout (sd3_medium.safetensors), for tests.

The inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers / convert_ldm_vae_checkpoint: fused qkv,
(shift, scale) order of the pre-only adaLN projections, ldm VAE block names with 1x1-conv attention. Works on meta
tensors too. `mmdit_original_shapes` states the MMDiT layout independently (ComfyUI's / sd3-ref's MMDiT: head
size 64, qkv bias, mlp ratio 4, the last context block pre-only) to check the inverse against.
"""
from __future__ import annotations

import re

import torch

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def _swap_halves(w):
    a, b = w.chunk(2, dim=0)  # diffusers (scale, shift) <-> original (shift, scale): an involution
    return torch.cat([b, a], dim=0)


def sd3_transformer_to_original(sd: dict, num_layers: int) -> dict:
    o = {"pos_embed": sd["pos_embed.pos_embed"]}
    renames = {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
               "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
               "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
               "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
               "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
               "final_layer.linear": "proj_out"}
    for wb in ("weight", "bias"):
        for orig, diff in renames.items():
            o[f"{orig}.{wb}"] = sd[f"{diff}.{wb}"]
        o[f"final_layer.adaLN_modulation.1.{wb}"] = _swap_halves(sd[f"norm_out.linear.{wb}"])
        for i in range(num_layers):
            b, j = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
            o[f"{j}x_block.attn.qkv.{wb}"] = torch.cat([sd[f"{b}attn.to_{c}.{wb}"] for c in "qkv"])
            o[f"{j}context_block.attn.qkv.{wb}"] = torch.cat([sd[f"{b}attn.add_{c}_proj.{wb}"] for c in "qkv"])
            o[f"{j}x_block.attn.proj.{wb}"] = sd[f"{b}attn.to_out.0.{wb}"]
            o[f"{j}x_block.adaLN_modulation.1.{wb}"] = sd[f"{b}norm1.linear.{wb}"]
            o[f"{j}x_block.mlp.fc1.{wb}"] = sd[f"{b}ff.net.0.proj.{wb}"]
            o[f"{j}x_block.mlp.fc2.{wb}"] = sd[f"{b}ff.net.2.{wb}"]
            if i < num_layers - 1:
                o[f"{j}context_block.attn.proj.{wb}"] = sd[f"{b}attn.to_add_out.{wb}"]
                o[f"{j}context_block.adaLN_modulation.1.{wb}"] = sd[f"{b}norm1_context.linear.{wb}"]
                o[f"{j}context_block.mlp.fc1.{wb}"] = sd[f"{b}ff_context.net.0.proj.{wb}"]
                o[f"{j}context_block.mlp.fc2.{wb}"] = sd[f"{b}ff_context.net.2.{wb}"]
            else:  # pre-only block: diffusers' AdaLayerNormContinuous orders (scale, shift)
                o[f"{j}context_block.adaLN_modulation.1.{wb}"] = _swap_halves(sd[f"{b}norm1_context.linear.{wb}"])
    return o


def vae_to_original(sd: dict, num_blocks: int) -> dict:
    o = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in sd.items():
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", k)
        k = k.replace(".conv_shortcut.", ".nin_shortcut.").replace("conv_norm_out.", "norm_out.")
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k)
        if m:
            k = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight":
                value = value[:, :, None, None]  # the original attention projections are 1x1 convolutions
        o[k] = value
    return o


def single_file_state(transformer, vae, extra: dict | None = None) -> dict:
    """{key: tensor} of an sd3_medium*.safetensors file holding these modules (plus `extra`, e.g. text encoders)."""
    tr = sd3_transformer_to_original(transformer.state_dict(), transformer.config.num_layers)
    va = vae_to_original(vae.state_dict(), len(vae.config.block_out_channels))
    out = {TRANSFORMER_PREFIX + k: v for k, v in tr.items()}
    out.update({VAE_PREFIX + k: v for k, v in va.items()})
    out.update(extra or {})
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def mmdit_original_shapes(depth=24, in_channels=16, patch=2, context_dim=4096, pooled_dim=2048, pos_max=192,
                          freq_dim=256) -> dict:
    """Key -> shape of the original SD3 MMDiT (width 64 x depth), stated from the architecture, not diffusers."""
    h = 64 * depth
    s = {"pos_embed": (1, pos_max * pos_max, h), "x_embedder.proj.weight": (h, in_channels, patch, patch),
         "x_embedder.proj.bias": (h,), "t_embedder.mlp.0.weight": (h, freq_dim), "t_embedder.mlp.0.bias": (h,),
         "t_embedder.mlp.2.weight": (h, h), "t_embedder.mlp.2.bias": (h,), "y_embedder.mlp.0.weight": (h, pooled_dim),
         "y_embedder.mlp.0.bias": (h,), "y_embedder.mlp.2.weight": (h, h), "y_embedder.mlp.2.bias": (h,),
         "context_embedder.weight": (h, context_dim), "context_embedder.bias": (h,),
         "final_layer.linear.weight": (patch * patch * in_channels, h), "final_layer.linear.bias": (patch * patch * in_channels,),
         "final_layer.adaLN_modulation.1.weight": (2 * h, h), "final_layer.adaLN_modulation.1.bias": (2 * h,)}
    for i in range(depth):
        for blk in ("x_block", "context_block"):
            p = f"joint_blocks.{i}.{blk}."
            s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"] = (3 * h, h), (3 * h,)
            if blk == "context_block" and i == depth - 1:  # pre-only: shift and scale, nothing after attention
                s[p + "adaLN_modulation.1.weight"], s[p + "adaLN_modulation.1.bias"] = (2 * h, h), (2 * h,)
                continue
            s[p + "adaLN_modulation.1.weight"], s[p + "adaLN_modulation.1.bias"] = (6 * h, h), (6 * h,)
            s[p + "attn.proj.weight"], s[p + "attn.proj.bias"] = (h, h), (h,)
            s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = (4 * h, h), (4 * h,)
            s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = (h, 4 * h), (h,)
    return s
