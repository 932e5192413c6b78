"""RestorerID's denoiser (`model.diffusion_model.*`): the SD-1.5 LDM UNet with, in every ResBlock, a SPADE
modulation from the structure features and an IDBalance block, and in every transformer the FaceID-Plus LoRA
plus the decoupled ID cross-attention (to_k_ip / to_v_ip).

The context is [B, 77 + n_id, 768]: 77 text tokens, then the ID tokens. `ip_scale` (a float, or a tensor [B]
for one scale per sample) multiplies only the ID cross-attention term; LoRA and IDBalance do not depend on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Downsample, ResBlock, Upsample, group_norm, time_mlp, timestep_embedding

TEXT_TOKENS = 77


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    num_res_blocks: int = 2
    attention_resolutions: tuple = (4, 2, 1)
    channel_mult: tuple = (1, 2, 4, 4)
    num_heads: int = 8
    context_dim: int = 768
    struct_channels: int = 256   # semb_channels: width of the structure features
    lora_rank: int = 128
    transformer_depth: int = 1


def _attend(q, k, v, heads):
    b, n, inner = q.shape
    q, k, v = (t.reshape(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, inner)


class LoRA(nn.Module):
    """up(down(x)) with no scaling (IP-Adapter FaceID's LoRA, weight 1)."""

    def __init__(self, dim_in: int, dim_out: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim_in, rank, bias=False)
        self.up = nn.Linear(rank, dim_out, bias=False)

    def forward(self, x):
        return self.up(self.down(x))


class CrossAttention(nn.Module):
    """Plain multi-head attention (to_q/to_k/to_v without bias, to_out.0 with bias)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context):
        return self.to_out(_attend(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class LoRAAttention(nn.Module):
    """Attention whose q/k/v/out projections each add a LoRA term. With `ip=True` it is the cross-attention
    of RestorerID: text tokens through the LoRA'd k/v, ID tokens through to_k_ip/to_v_ip (no LoRA), and
    out = text_attention + ip_scale * id_attention before the (LoRA'd) output projection."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, rank: int, ip: bool):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.ip = ip
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_q_lora = LoRA(query_dim, inner, rank)
        self.to_k_lora = LoRA(context_dim, inner, rank)
        self.to_v_lora = LoRA(context_dim, inner, rank)
        if ip:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.to_out_lora = LoRA(inner, query_dim, rank)

    def forward(self, x, context=None, ip_scale=1.0):
        text = x if context is None else (context[:, :TEXT_TOKENS] if self.ip else context)
        q = self.to_q(x) + self.to_q_lora(x)
        k = self.to_k(text) + self.to_k_lora(text)
        v = self.to_v(text) + self.to_v_lora(text)
        out = _attend(q, k, v, self.heads)
        # A scale of exactly 0 skips the ID branch: bit-identical to a model without it.
        if self.ip and not (isinstance(ip_scale, (int, float)) and ip_scale == 0):
            ref = context[:, TEXT_TOKENS:]
            ip_out = _attend(q, self.to_k_ip(ref), self.to_v_ip(ref), self.heads)
            if isinstance(ip_scale, torch.Tensor):
                ip_scale = ip_scale.to(ip_out.dtype).reshape(-1, 1, 1)
            out = out + ip_scale * ip_out
        return self.to_out(out) + self.to_out_lora(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, rank: int):
        super().__init__()
        self.attn1 = LoRAAttention(dim, dim, heads, dim_head, rank, ip=False)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.attn2 = LoRAAttention(dim, context_dim, heads, dim_head, rank, ip=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context, ip_scale):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, ip_scale)
        return x + self.ff.net(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, rank: int, depth: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, dim_head, context_dim, rank) for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x, context, ip_scale):
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            t = block(t, context, ip_scale)
        return x + self.proj_out(t.transpose(1, 2).reshape(b, -1, h, w))


class SPADE(nn.Module):
    """norm(h) * (1 + gamma(s)) + beta(s), s the structure feature at h's width."""

    def __init__(self, channels: int, struct_channels: int, hidden: int = 128):
        super().__init__()
        self.param_free_norm = group_norm(channels)
        self.mlp_shared = nn.Sequential(nn.Conv2d(struct_channels, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, h, s):
        a = self.mlp_shared(s)
        return self.param_free_norm(h) * (1 + self.mlp_gamma(a)) + self.mlp_beta(a)


class IDBalance(nn.Module):
    """RestorerID's FIR-Adapter: the structure feature attends to the ID tokens (residual), then modulates
    norm(h) as norm(h) * gamma + beta (no 1 +: the block's output is *added* to h)."""

    def __init__(self, channels: int, struct_channels: int, context_dim: int = 768, hidden: int = 128):
        super().__init__()
        self.param_free_norm = group_norm(channels)
        self.norm = nn.LayerNorm(struct_channels)
        self.crossattn = CrossAttention(struct_channels, context_dim, heads=8, dim_head=struct_channels // 8)
        self.mlp_shared = nn.Sequential(nn.Conv2d(struct_channels, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, h, s, ref):
        b, c, hh, ww = s.shape
        t = s.flatten(2).transpose(1, 2)
        t = t + self.crossattn(self.norm(t), ref)
        a = self.mlp_shared(t.transpose(1, 2).reshape(b, c, hh, ww))
        return self.param_free_norm(h) * self.mlp_gamma(a) + self.mlp_beta(a)


class IDResBlock(ResBlock):
    """ResBlock + SPADE before the skip add + IDBalance after it (LDM's ResBlockV3)."""

    def __init__(self, channels, emb_channels, out_channels, struct_channels, context_dim):
        super().__init__(channels, emb_channels, out_channels)
        self.out_layers[0] = group_norm(self.out_channels)  # always 32 groups here
        self.spade = SPADE(self.out_channels, struct_channels)
        self.IDBalance = IDBalance(self.out_channels, struct_channels, context_dim)

    def forward(self, x, emb, struct, context):
        h = self.residual(x, emb)
        s = struct[str(h.shape[-1])]
        h = self.skip_connection(x) + self.spade(h, s)
        return h + self.IDBalance(h, s, context[:, TEXT_TOKENS:])


class _Step(nn.ModuleList):
    def forward(self, h, emb, context, struct, ip_scale):
        for layer in self:
            if isinstance(layer, IDResBlock):
                h = layer(h, emb, struct, context)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, ip_scale)
            else:
                h = layer(h)
        return h


class RestorerIDUNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_ch = 4 * mc
        self.time_embed = time_mlp(mc)

        def res(cin, cout):
            return IDResBlock(cin, emb_ch, cout, cfg.struct_channels, cfg.context_dim)

        def attn(ch):
            return SpatialTransformer(ch, cfg.num_heads, ch // cfg.num_heads, cfg.context_dim, cfg.lora_rank,
                                      cfg.transformer_depth)

        self.input_blocks = nn.ModuleList([_Step([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skips = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(_Step(layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(_Step([Downsample(ch)]))
                skips.append(ch)
                ds *= 2
        self.middle_block = _Step([res(ch, ch), attn(ch), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(_Step(layers))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, struct: dict,
                ip_scale=1.0) -> torch.Tensor:
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))
        context = context.to(dtype)
        struct = {k: v.to(dtype) for k, v in struct.items()}
        h = x.to(dtype)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb, context, struct, ip_scale)
            hs.append(h)
        h = self.middle_block(h, emb, context, struct, ip_scale)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context, struct, ip_scale)
        return self.out(h).to(x.dtype)
