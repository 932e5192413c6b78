"""Building blocks shared by RestorerID's denoiser and its structure encoder (LDM layouts, our own code).

Module and parameter names follow the LDM key layout of RestorerIDFull.ckpt (`in_layers.2`, `emb_layers.1`,
`out_layers.3`, `skip_connection`, `op`, `conv`, `qkv`, `proj_out`), because those names *are* the file format.
GroupNorm always computes in float32 (as LDM's GroupNorm32), so fp16/bf16 weights stay stable.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class FP32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (LDM's GroupNorm32; also used where LDM relies on autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def group_norm(channels: int, groups: int = 32, eps: float = 1e-5) -> FP32GroupNorm:
    return FP32GroupNorm(groups, channels, eps=eps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] sinusoidal embedding of (integer) timesteps t [N] -> [N, dim] float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def time_mlp(channels: int) -> nn.Sequential:
    """`time_embed`: Linear(C, 4C), SiLU, Linear(4C, 4C)."""
    return nn.Sequential(nn.Linear(channels, 4 * channels), nn.SiLU(), nn.Linear(4 * channels, 4 * channels))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """LDM residual block without scale-shift: out(in(x) + emb) + skip(x)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.out_channels = out_channels
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # LDM uses one group per channel when the width is not a multiple of 32.
        groups = 32 if out_channels % 32 == 0 else out_channels
        self.out_layers = nn.Sequential(group_norm(out_channels, groups), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def residual(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.out_layers(h)

    def forward(self, x, emb):
        return self.skip_connection(x) + self.residual(x, emb)


class LegacyAttentionBlock(nn.Module):
    """Self-attention over pixels with a fused Conv1d qkv whose channels are ordered head-major
    (heads x [q|k|v] x ch: LDM's QKVAttentionLegacy); softmax in float32."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(flat))  # [b, heads*3*ch, T]
        ch = c // self.num_heads
        q, k, v = qkv.reshape(b, self.num_heads, 3 * ch, h * w).transpose(-1, -2).split(ch, dim=-1)
        dtype = q.dtype
        # Contiguous [b, heads, T, ch] (and fp32, as the official softmax): CUDA's memory-efficient kernel needs the
        # last dim at stride 1; otherwise SDPA falls back to the math path, which holds the whole T x T matrix
        # (128 GiB at a 128 x 128 map on an H200: gpu_check, 2026-12-04).
        q, k, v = (t.float().contiguous() if dtype in (torch.float16, torch.bfloat16) else t.contiguous()
                   for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).to(dtype)  # [b, heads, T, ch]
        a = a.transpose(-1, -2).reshape(b, c, h * w)
        return (flat + self.proj_out(a)).reshape(b, c, h, w)
