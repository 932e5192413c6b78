"""RestoreFormer (Wang et al., CVPR 2022) and RestoreFormer++ (TPAMI 2023): a VQGAN autoencoder whose decoder
cross-attends to the encoder's features. Pure PyTorch inference, written for this pack.

Weights (wzhouxiff/RestoreFormerPlusPlus releases, Apache-2.0): `RestoreFormer++.ckpt` and `RestoreFormer.ckpt`
hold {'state_dict': {'vqvae.<key>': ...}} (training checkpoints; the official inference strips 'vqvae.' and
loads non-strictly, so anything outside 'vqvae.' is ignored here too). GFPGAN's release ships `RestoreFormer.pth`
with the same keys unprefixed under 'params'/'params_ema'. This module re-implements the official
`VQVAEGANMultiHeadTransformer` (RestoreFormer/modules/vqvae/vqvae_arch.py) with its key names and shapes and
computes what `net(x)[0]` computes:

- encoder (`encoder.*`): conv_in, per level `num_res_blocks` GroupNorm/swish residual blocks (multi-head
  self-attention after each block at the attention levels), strided-conv downsampling; the features before each
  downsampling are kept (`block_<level>`), as are the middle block's input (`block_<last>_atten`) and output
  (`mid_atten`);
- `quant_conv`, nearest-code quantisation against `quantize.embedding` (squared-distance argmin, first index on
  ties), `post_quant_conv`;
- decoder (`decoder.*`): conv_in, middle block whose attention takes its queries from `mid_atten`, then per level
  `num_res_blocks + 1` residual blocks, each followed at attention levels by cross-attention with queries from the
  encoder feature of that level (the official lookup: `block_<level>_atten` if present, else `block_<level>`).

The two official configurations differ in what the weights cannot tell: RestoreFormer uses 8 heads and attends at
16x16 only; RestoreFormer++ uses 4 heads and its decoder also attends at 32x32 (`ex_multi_scale_num=1`). The
official inference picks (8, none) / (4, one extra scale) by name; here the extra decoder attention level in the
weights decides, which is the same choice for the released files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

# The VQGAN building blocks both taming-transformers descendants share (same key names).
from .codeformer import Downsample, ResBlock, Upsample, _group_norm

PREFIX = "vqvae."


@dataclass(frozen=True)
class RestoreFormerConfig:
    ch: int = 64
    ch_mult: tuple = (1, 2, 2, 4, 4, 8)
    num_res_blocks: int = 2
    enc_attn_levels: tuple = (5,)
    dec_attn_levels: tuple = (5, 4)
    head_size: int = 4
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024
    enable_mid: bool = True
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 512

    @property
    def plus_plus(self) -> bool:
        return len(self.dec_attn_levels) > len(self.enc_attn_levels)


class ResnetBlock(ResBlock):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, shortcut_name="nin_shortcut")


class MultiHeadAttnBlock(nn.Module):
    """Keys/values from norm1(x); queries from norm2(y) when y is given (cross-attention), else from norm1(x)."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = _group_norm(ch)
        self.norm2 = _group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        hx = self.norm1(x)
        hy = hx if y is None else self.norm2(y)
        # Channel c = head * (c // heads) + i, as the official reshape(b, heads, c // heads, hw).
        # Contiguous [b, heads, hw, ch]: CUDA's fused attention kernels need the last dim at stride 1 (else the
        # math path, with the whole hw x hw matrix).
        split = lambda t: t.reshape(b, self.heads, c // self.heads, h * w).transpose(2, 3).contiguous()  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(hy)), split(self.k(hx)), split(self.v(hx)))
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


def _level(blocks: list, attns: list) -> nn.Module:
    m = nn.Module()
    m.block = nn.ModuleList(blocks)
    m.attn = nn.ModuleList(attns)
    return m


def _mid(ch: int, heads: int) -> nn.Module:
    m = nn.Module()
    m.block_1 = ResnetBlock(ch, ch)
    m.attn_1 = MultiHeadAttnBlock(ch, heads)
    m.block_2 = ResnetBlock(ch, ch)
    return m


class Encoder(nn.Module):
    def __init__(self, c: RestoreFormerConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        block_in = c.ch
        n = len(c.ch_mult)
        for level, mult in enumerate(c.ch_mult):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(block_in, c.ch * mult))
                block_in = c.ch * mult
                if level in c.enc_attn_levels:
                    attns.append(MultiHeadAttnBlock(block_in, c.head_size))
            m = _level(blocks, attns)
            if level != n - 1:
                m.downsample = Downsample(block_in)
            self.down.append(m)
        if c.enable_mid:
            self.mid = _mid(block_in, c.head_size)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, c.z_channels, 3, 1, 1)
        self.enable_mid = c.enable_mid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        feats = {}
        h = self.conv_in(x)
        last = len(self.down) - 1
        for level, m in enumerate(self.down):
            for i, block in enumerate(m.block):
                h = block(h)
                if len(m.attn):
                    h = m.attn[i](h)
            if level != last:
                feats[f"block_{level}"] = h
                h = m.downsample(h)
        if self.enable_mid:
            h = self.mid.block_1(h)
            feats[f"block_{last}_atten"] = h
            h = self.mid.attn_1(h)
            h = self.mid.block_2(h)
            feats["mid_atten"] = h
        return self.conv_out(F.silu(self.norm_out(h))), feats


class Decoder(nn.Module):
    def __init__(self, c: RestoreFormerConfig):
        super().__init__()
        n = len(c.ch_mult)
        block_in = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, 1, 1)
        if c.enable_mid:
            self.mid = _mid(block_in, c.head_size)
        up = []
        for level in reversed(range(n)):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, c.ch * c.ch_mult[level]))
                block_in = c.ch * c.ch_mult[level]
                if level in c.dec_attn_levels:
                    attns.append(MultiHeadAttnBlock(block_in, c.head_size))
            m = _level(blocks, attns)
            if level != 0:
                m.upsample = Upsample(block_in)
            up.insert(0, m)
        self.up = nn.ModuleList(up)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, 1, 1)
        self.enable_mid = c.enable_mid

    def forward(self, z: torch.Tensor, feats: dict) -> torch.Tensor:
        h = self.conv_in(z)
        if self.enable_mid:
            h = self.mid.block_1(h)
            h = self.mid.attn_1(h, feats["mid_atten"])
            h = self.mid.block_2(h)
        for level in reversed(range(len(self.up))):
            m = self.up[level]
            if len(m.attn):
                enc = feats.get(f"block_{level}_atten", feats.get(f"block_{level}"))
            for i, block in enumerate(m.block):
                h = block(h)
                if len(m.attn):
                    h = m.attn[i](h, enc)
            if level != 0:
                h = m.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Codebook(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        e = self.embedding.weight
        # The official distance expression and argmin (the first index on ties, like torch.min).
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * (flat @ e.t())
        zq = e[d.argmin(dim=1)].view(b, h, w, c).permute(0, 3, 1, 2)
        return z + (zq - z)                                   # the straight-through form, as computed officially


class RestoreFormer(nn.Module):
    arch_name = "RestoreFormer"

    def __init__(self, config: RestoreFormerConfig = RestoreFormerConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = _Codebook(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def input_size(self) -> int:
        return self.config.resolution

    def forward(self, x: torch.Tensor, **_ignored) -> torch.Tensor:
        """x: [B,3,512,512] in [-1,1] -> [B,3,512,512] (nominally [-1,1])."""
        z, feats = self.encoder(x)
        q = self.quantize(self.quant_conv(z).float()).to(z.dtype)
        return self.decoder(self.post_quant_conv(q), feats).float()


# ------------------------------------------------------------------------------------------------ recognition

_REQUIRED = ("quantize.embedding.weight", "encoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight",
             "encoder.down.0.block.0.norm1.weight", "decoder.conv_out.weight", "encoder.conv_out.weight")


def strip_prefix(sd: Mapping) -> Mapping:
    """The official checkpoints' 'vqvae.' sub-dict (other entries, e.g. training losses, are ignored)."""
    if f"{PREFIX}quantize.embedding.weight" in sd:
        return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    return sd


def is_restoreformer(sd: Mapping) -> bool:
    # CodeFormer also has encoder/decoder/quantize keys but no conv_in/quant_conv; the attention blocks' `norm2`
    # (query norm of the cross-attention) tells RestoreFormer from a plain VQGAN autoencoder.
    return all(k in sd for k in _REQUIRED) and "encoder.mid.attn_1.norm2.weight" in sd


def _levels(sd: Mapping, prefix: str) -> int:
    return 1 + max(int(k.split(".")[2]) for k in sd if k.startswith(prefix))


def config_from_state_dict(sd: Mapping) -> RestoreFormerConfig:
    ch = int(sd["encoder.conv_in.weight"].shape[0])
    n_levels = _levels(sd, "encoder.down.")
    ch_mult = tuple(int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in range(n_levels))
    nrb = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    has = lambda prefix: any(k.startswith(prefix) for k in sd)  # noqa: E731  (any key: a missing one is named later)
    enc_attn = tuple(i for i in range(n_levels) if has(f"encoder.down.{i}.attn."))
    dec_attn = tuple(i for i in reversed(range(n_levels)) if has(f"decoder.up.{i}.attn."))
    plus_plus = len(dec_attn) > len(enc_attn)
    emb = sd["quantize.embedding.weight"]
    return RestoreFormerConfig(
        ch=ch, ch_mult=ch_mult, num_res_blocks=nrb, enc_attn_levels=enc_attn, dec_attn_levels=dec_attn,
        head_size=4 if plus_plus else 8, z_channels=int(sd["quant_conv.weight"].shape[1]),
        embed_dim=int(emb.shape[1]), n_embed=int(emb.shape[0]), enable_mid="encoder.mid.block_1.norm1.weight" in sd,
        in_channels=int(sd["encoder.conv_in.weight"].shape[1]), out_ch=int(sd["decoder.conv_out.weight"].shape[0]),
        resolution=512)
