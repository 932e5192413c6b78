"""CodeFormer (Zhou et al., NeurIPS 2022): VQGAN encoder -> transformer code prediction -> VQGAN decoder with
controllable feature fusion (fidelity w). Pure PyTorch inference, written for this pack.

Weights: `codeformer.pth` from sczhou/CodeFormer releases (`params_ema`). The weights and the original code are
under the NTU S-Lab License 1.0 (non-commercial use only). This module does not contain the original code; it
re-implements the network so that the official file loads with its exact key names and shapes, and computes
what the official `CodeFormer.forward(x, w=w, adain=True)[0]` computes:

- encoder (`encoder.blocks.*`): conv, two GroupNorm/swish residual blocks per resolution 512..16 (channels 64, 128,
  128, 256, 256, 512) with strided-conv downsampling, single-head self-attention at 16x16, a residual/attention/
  residual middle, GroupNorm and a conv to the 256-channel latent;
- transformer (`feat_emb`, `position_emb`, `ft_layers.*`, `idx_pred_layer.*`): pre-norm layers with 8-head
  attention (learned positions added to queries and keys only) and a GELU MLP, predicting one of
  `codebook_size` codes for each of the 16x16 positions; the chosen code vectors (`quantize.embedding`) are
  AdaIN-matched to the encoder latent;
- decoder (`generator.blocks.*`), the encoder mirrored with nearest upsampling; after the first residual block at
  each resolution in `connect_list` the encoder feature is fused: dec + w * (dec * scale + shift), with scale and
  shift predicted from [enc, dec] (`fuse_convs_dict.*`). w = 0 skips the fusion (pure codebook output).

Attention uses `F.scaled_dot_product_attention` (fused kernels on GPU); everything is batched.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

NF = 64
CH_MULT = (1, 2, 2, 4, 4, 8)
RES_BLOCKS = 2
IMG_SIZE = 512
ATTN_RES = (16,)
EMB_DIM = 256


@dataclass(frozen=True)
class CodeFormerConfig:
    dim_embd: int = 512
    n_head: int = 8
    n_layers: int = 9
    codebook_size: int = 1024
    latent_size: int = 256
    connect_list: tuple = ("32", "64", "128", "256")


def _group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus a 1x1 conv on the shortcut when the width changes. The shortcut's
    state-dict name differs between the VQGAN descendants (CodeFormer: conv_out; taming: nin_shortcut)."""

    def __init__(self, c_in: int, c_out: int, shortcut_name: str = "conv_out"):
        super().__init__()
        self.norm1 = _group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2 = _group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self._shortcut_name = shortcut_name
        setattr(self, shortcut_name, nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = getattr(self, self._shortcut_name)
        return h + (shortcut(x) if shortcut is not None else x)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 q/k/v/proj convolutions and a residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))   # [B, HW, C]
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stack(nn.Module):
    """Holds `blocks` in the official index layout (the fusion taps are block indices)."""

    def __init__(self, blocks: list):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


def _encoder() -> _Stack:
    blocks, res, c = [nn.Conv2d(3, NF, 3, 1, 1)], IMG_SIZE, NF
    for level, mult in enumerate(CH_MULT):
        for _ in range(RES_BLOCKS):
            blocks.append(ResBlock(c, NF * mult))
            c = NF * mult
            if res in ATTN_RES:
                blocks.append(AttnBlock(c))
        if level != len(CH_MULT) - 1:
            blocks.append(Downsample(c))
            res //= 2
    blocks += [ResBlock(c, c), AttnBlock(c), ResBlock(c, c), _group_norm(c), nn.Conv2d(c, EMB_DIM, 3, 1, 1)]
    return _Stack(blocks)


def _generator() -> _Stack:
    c = NF * CH_MULT[-1]
    res = IMG_SIZE // 2 ** (len(CH_MULT) - 1)
    blocks = [nn.Conv2d(EMB_DIM, c, 3, 1, 1), ResBlock(c, c), AttnBlock(c), ResBlock(c, c)]
    for level in reversed(range(len(CH_MULT))):
        for _ in range(RES_BLOCKS):
            blocks.append(ResBlock(c, NF * CH_MULT[level]))
            c = NF * CH_MULT[level]
            if res in ATTN_RES:
                blocks.append(AttnBlock(c))
        if level != 0:
            blocks.append(Upsample(c))
            res *= 2
    blocks += [_group_norm(c), nn.Conv2d(c, 3, 3, 1, 1)]
    return _Stack(blocks)


class _Codebook(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)


class SelfAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter layout (in_proj_weight/bias, out_proj)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, qk_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
        """qk_in, v_in: [B, L, D] (batch first)."""
        b, n, d = v_in.shape
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        heads = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q = heads(F.linear(qk_in, w_q, b_q))
        k = heads(F.linear(qk_in, w_k, b_k))
        v = heads(F.linear(v_in, w_v, b_v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dim_mlp: int):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads)
        self.linear1 = nn.Linear(dim, dim_mlp)
        self.linear2 = nn.Linear(dim_mlp, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.self_attn(y + pos, y)
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class FuseSFT(nn.Module):
    """dec + w * (dec * scale + shift); scale/shift from a residual block over [enc, dec]."""

    def __init__(self, ch: int):
        super().__init__()
        self.encode_enc = ResBlock(2 * ch, ch)
        self.scale = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(ch, ch, 3, 1, 1))
        self.shift = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(ch, ch, 3, 1, 1))

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w: float) -> torch.Tensor:
        f = self.encode_enc(torch.cat([enc, dec], dim=1))
        return dec + w * (dec * self.scale(f) + self.shift(f))


def _mean_std(feat: torch.Tensor, eps: float = 1e-5):
    flat = feat.flatten(2)
    return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + eps).sqrt()[..., None, None]


def adain(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Give `content` the per-channel mean/std (unbiased variance + 1e-5) of `style`."""
    s_mean, s_std = _mean_std(style)
    c_mean, c_std = _mean_std(content)
    return (content - c_mean) / c_std * s_std + s_mean


class CodeFormer(nn.Module):
    arch_name = "CodeFormer"
    # Resolution -> channels of the fused features, and where (block index) encoder features are taken and
    # decoder features fused in the official block layout.
    _FUSE_CH = {"16": 512, "32": 256, "64": 256, "128": 128, "256": 128, "512": 64}
    _ENC_TAP = {"512": 2, "256": 5, "128": 8, "64": 11, "32": 14, "16": 18}
    _DEC_TAP = {"16": 6, "32": 9, "64": 12, "128": 15, "256": 18, "512": 21}

    def __init__(self, config: CodeFormerConfig = CodeFormerConfig()):
        super().__init__()
        self.config = config
        c = config
        self.encoder = _encoder()
        self.quantize = _Codebook(c.codebook_size, EMB_DIM)
        self.generator = _generator()
        self.position_emb = nn.Parameter(torch.zeros(c.latent_size, c.dim_embd))
        self.feat_emb = nn.Linear(EMB_DIM, c.dim_embd)
        self.ft_layers = nn.Sequential(*[TransformerLayer(c.dim_embd, c.n_head, 2 * c.dim_embd)
                                         for _ in range(c.n_layers)])
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(c.dim_embd), nn.Linear(c.dim_embd, c.codebook_size,
                                                                                 bias=False))
        self.fuse_convs_dict = nn.ModuleDict({f: FuseSFT(self._FUSE_CH[f]) for f in c.connect_list})
        self.latent_side = int(math.isqrt(c.latent_size))

    @property
    def input_size(self) -> int:
        return IMG_SIZE

    def forward(self, x: torch.Tensor, fidelity: float = 0.5, **_ignored) -> torch.Tensor:
        """x: [B,3,512,512] in [-1,1]; fidelity = the official w. Returns [B,3,512,512] (nominally [-1,1])."""
        enc_taps = {self._ENC_TAP[f]: f for f in self.config.connect_list}
        enc_feats = {}
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in enc_taps:
                enc_feats[enc_taps[i]] = x
        lq_feat = x                                                        # [B, 256, 16, 16]
        b = lq_feat.shape[0]
        tokens = self.feat_emb(lq_feat.flatten(2).transpose(1, 2))        # [B, HW, D]
        pos = self.position_emb.unsqueeze(0).to(tokens.dtype)
        for layer in self.ft_layers:
            tokens = layer(tokens, pos)
        logits = self.idx_pred_layer(tokens)                               # [B, HW, codebook]
        # Same selection as the official code (top-1 of the softmax; ties resolve identically).
        idx = torch.topk(F.softmax(logits.float(), dim=2), 1, dim=2)[1].squeeze(2)
        side = self.latent_side
        quant = self.quantize.embedding(idx).view(b, side, side, -1).permute(0, 3, 1, 2)
        x = adain(quant.float(), lq_feat.float()).to(lq_feat.dtype)
        w = float(fidelity)
        dec_taps = {self._DEC_TAP[f]: f for f in self.config.connect_list}
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if i in dec_taps and w > 0:
                f = dec_taps[i]
                x = self.fuse_convs_dict[f](enc_feats[f], x, w)
        return x.float()


def is_codeformer(sd: Mapping) -> bool:
    return all(k in sd for k in ("position_emb", "quantize.embedding.weight", "idx_pred_layer.1.weight",
                                 "ft_layers.0.self_attn.in_proj_weight", "encoder.blocks.0.weight"))


def config_from_state_dict(sd: Mapping) -> CodeFormerConfig:
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("ft_layers."))
    connect = tuple(f for f in ("16", "32", "64", "128", "256", "512") if f"fuse_convs_dict.{f}.scale.0.weight" in sd)
    latent_size, dim = (int(s) for s in sd["position_emb"].shape)
    return CodeFormerConfig(dim_embd=dim, n_head=8, n_layers=n_layers,
                            codebook_size=int(sd["idx_pred_layer.1.weight"].shape[0]), latent_size=latent_size,
                            connect_list=connect)


def describe(config: CodeFormerConfig) -> str:
    return "CodeFormer(" + ", ".join(f"{k}={v}" for k, v in asdict(config).items()) + ")"
