"""Tiny random-weight RestorerID networks and files in the official layouts (tests only).

The key names and nesting are the official ones (RestorerIDFull.ckpt: {'state_dict': {model.diffusion_model.*,
structcond_stage_model.*, first_stage_model.*}}; ip-adapter-faceid-plus_sd15.bin: {'image_proj', 'ip_adapter'});
only widths and depths are reduced. The context width stays 768 and the LoRA rank 128, because the official
IDBalance and LoRA hard-code them.
"""
from __future__ import annotations

import torch

from facemend.pipelines.identity.structure_encoder import StructureEncoder, StructureEncoderConfig
from facemend.pipelines.identity.unet import RestorerIDUNet, UNetConfig

TINY_UNET = UNetConfig(model_channels=32, num_res_blocks=1, attention_resolutions=(1, 2), channel_mult=(1, 2),
                       num_heads=2, struct_channels=32)
TINY_STRUCT = StructureEncoderConfig(model_channels=32, out_channels=32, num_res_blocks=1,
                                     attention_resolutions=(1, 2), channel_mult=(1, 2), num_heads=2)
# official constructor arguments for the same networks
OFFICIAL_UNET_ARGS = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                          num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                          transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False, semb_channels=32)
OFFICIAL_STRUCT_ARGS = dict(image_size=96, in_channels=4, model_channels=32, out_channels=32, num_res_blocks=1,
                            attention_resolutions=[1, 2], dropout=0, channel_mult=[1, 2], conv_resample=True, dims=2,
                            use_checkpoint=False, use_fp16=False, num_heads=2, num_head_channels=-1,
                            use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False)


def randomise(module: torch.nn.Module, seed: int, norm_jitter: float = 0.1, scale: float = 1.0):
    """Seeded default init, then non-trivial norm affines (every parameter matters, nothing is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.split(".")[-2].isdigit() is False and "ln" in name):
                p.add_(torch.randn(p.shape, generator=g) * norm_jitter)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (scale / fan_in ** 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def tiny_unet(seed: int = 0) -> RestorerIDUNet:
    return randomise(RestorerIDUNet(TINY_UNET), seed).eval()


def tiny_structure_encoder(seed: int = 1) -> StructureEncoder:
    return randomise(StructureEncoder(TINY_STRUCT), seed).eval()
