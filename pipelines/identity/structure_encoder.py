"""StableSR's time-aware structure encoder as RestorerID configures it (`structcond_stage_model.*`).

A half UNet on the LQ latent at the current timestep. The activation just before each spatial downsample and
the middle block's output go through one `fea_tran` ResBlock each, giving {str(width): [B, out_channels, H, W]}:
for a 64x64 latent the keys '64', '32', '16', '8' (the dict the denoiser's SPADE/IDBalance layers index by width).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import Downsample, LegacyAttentionBlock, ResBlock, time_mlp, timestep_embedding


@dataclass(frozen=True)
class StructureEncoderConfig:
    in_channels: int = 4
    model_channels: int = 256
    out_channels: int = 256
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2, 1)
    channel_mult: tuple = (1, 1, 2, 2)
    num_heads: int = 4


class _Step(nn.ModuleList):
    """One `input_blocks.N` entry: layers called in turn, ResBlocks with the time embedding."""

    def forward(self, h, emb):
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class StructureEncoder(nn.Module):
    def __init__(self, cfg: StructureEncoderConfig = StructureEncoderConfig()):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_ch = 4 * mc
        self.time_embed = time_mlp(mc)
        self.input_blocks = nn.ModuleList([_Step([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        tapped = []  # channels of the features handed to fea_tran
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(LegacyAttentionBlock(ch, cfg.num_heads))
                self.input_blocks.append(_Step(layers))
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(_Step([Downsample(ch)]))
                tapped.append(ch)
                ds *= 2
        self.middle_block = _Step([ResBlock(ch, emb_ch), LegacyAttentionBlock(ch, cfg.num_heads), ResBlock(ch, emb_ch)])
        tapped.append(ch)
        self.fea_tran = nn.ModuleList([ResBlock(c, emb_ch, cfg.out_channels) for c in tapped])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> dict:
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))
        h = x.to(dtype)
        feats = []
        for block in self.input_blocks:
            prev = h
            h = block(h, emb)
            if h.shape[-1] != prev.shape[-1]:  # a downsample: keep the full-resolution feature
                feats.append(prev)
        feats.append(self.middle_block(h, emb))
        return {str(f.shape[-1]): tran(f, emb) for f, tran in zip(feats, self.fea_tran)}
