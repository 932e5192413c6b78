"""The FFHQ-512 diffusion prior of DifFace (`iddpm_ffhq512_ema500000.pth`): a guided-diffusion UNet in plain PyTorch.

Key names and computation follow DifFace's `models/unet.py` (zsyOAOA/DifFace, also vendored by
SamsungLabs/unsupervised-face-restoration), so the released file loads unchanged and strictly. Two things differ
from openai/guided-diffusion and matter for loading: `num_res_blocks` is a list (one count per level), and
`attention_resolutions` are absolute feature sizes (the size starts at `image_size` and halves per level), so the
official config puts attention at 32, 16 and 8 px.

Only what the released prior uses is built: 2-D, conv resampling, no class labels, scale-shift (or additive)
time conditioning, the legacy attention head split. fp16 weights are not used (the official file is fp32).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..io.checkpoints import check_keys, load_weights
from ..io.errors import ModelFileInvalid

PRIOR_FILE = "iddpm_ffhq512_ema500000.pth"


@dataclass(frozen=True)
class PriorUNetConfig:
    """Constructor arguments; the defaults are DifFace's configs/sample/iddpm_ffhq512*.yaml."""
    image_size: int = 512
    in_channels: int = 3
    model_channels: int = 32
    out_channels: int = 6                      # eps (3) + learned-range variance interpolation (3)
    num_res_blocks: tuple = (1, 2, 2, 2, 2, 3, 4)
    attention_resolutions: tuple = (32, 16, 8)  # absolute feature sizes
    channel_mult: tuple = (1, 2, 4, 8, 8, 16, 16)
    num_head_channels: int = 64
    num_heads: int = 1                         # used only when num_head_channels == -1
    use_scale_shift_norm: bool = True


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (as the official `normalization`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """[cos, sin] sinusoidal embedding of (integer, unscaled) timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, use_scale_shift_norm: bool):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        # Index 2 is the (inactive) dropout of the official layout; keeping it keeps `out_layers.3` as the key.
        self.out_layers = nn.Sequential(_norm(out_channels), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            h = self.in_layers(x)
            emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
            if self.use_scale_shift_norm:
                scale, shift = torch.chunk(emb_out, 2, dim=1)
                h = self.out_layers[0](h) * (1 + scale) + shift
                h = self.out_layers[3](self.out_layers[1](h))
            else:
                h = self.out_layers(h + emb_out)
            return self.skip_connection(x) + h
        # Inference: the same operations in the same order, in place on the fresh tensors each one makes, so that
        # fewer full-size temporaries are allocated (on the CPU each large one is new memory, page-faulted in).
        # `emb` holds this block's projection already (PriorUNet computes all blocks' in one product).
        h = self.in_layers[2](F.silu(self.in_layers[0](x), inplace=True))
        emb_out = emb[self.emb_index].type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h).mul_(1 + scale).add_(shift)
        else:
            h = self.out_layers[0](h.add_(emb_out))
        h = self.out_layers[3](F.silu(h, inplace=True))
        return h.add_(self.skip_connection(x))           # skip + h: addition commutes exactly


class AttentionBlock(nn.Module):
    """Self-attention over all positions; heads split before q/k/v (the official "legacy" order)."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        bs, width, length = qkv.shape
        ch = width // (3 * self.num_heads)
        q, k, v = qkv.reshape(bs * self.num_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))          # on q and k separately: steadier in half precision
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)
        out = self.proj_out(a)
        out = out.add_(x) if not torch.is_grad_enabled() else x + out
        return out.reshape(b, c, *spatial)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Sequential(nn.Sequential):
    """Passes the time embedding (inference: the per-block projections) to the ResBlocks only."""

    def forward(self, x: torch.Tensor, emb) -> torch.Tensor:  # noqa: D401
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class PriorUNet(nn.Module):
    """forward(x [B,3,H,W] in ~[-1,1], t [B] integer original timesteps) -> [B,6,H,W] (eps, variance values)."""

    def __init__(self, config: PriorUNetConfig = PriorUNetConfig()):
        super().__init__()
        c = config
        if len(c.num_res_blocks) != len(c.channel_mult):
            raise ValueError("num_res_blocks needs one count per level of channel_mult")
        self.config = c
        emb_dim = c.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def heads(ch):
            if c.num_head_channels == -1:
                return c.num_heads
            if ch % c.num_head_channels:
                raise ValueError(f"{ch} channels are not divisible by num_head_channels {c.num_head_channels}")
            return ch // c.num_head_channels

        ch = input_ch = int(c.channel_mult[0] * c.model_channels)
        self.input_blocks = nn.ModuleList([_Sequential(nn.Conv2d(c.in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = c.image_size
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks[level]):
                out = int(mult * c.model_channels)
                layers = [ResBlock(ch, emb_dim, out, c.use_scale_shift_norm)]
                ch = out
                if ds in c.attention_resolutions:
                    layers.append(AttentionBlock(ch, heads(ch)))
                self.input_blocks.append(_Sequential(*layers))
                skip_chans.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(_Sequential(Downsample(ch)))
                skip_chans.append(ch)
                ds //= 2
        self.middle_block = _Sequential(ResBlock(ch, emb_dim, ch, c.use_scale_shift_norm),
                                        AttentionBlock(ch, heads(ch)),
                                        ResBlock(ch, emb_dim, ch, c.use_scale_shift_norm))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(c.channel_mult))[::-1]:
            for i in range(c.num_res_blocks[level] + 1):
                out = int(c.model_channels * mult)
                layers = [ResBlock(ch + skip_chans.pop(), emb_dim, out, c.use_scale_shift_norm)]
                ch = out
                if ds in c.attention_resolutions:
                    layers.append(AttentionBlock(ch, heads(ch)))
                if level and i == c.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                    ds *= 2
                self.output_blocks.append(_Sequential(*layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(input_ch, c.out_channels, 3, padding=1))
        self._resblocks = [m for m in self.modules() if isinstance(m, ResBlock)]   # a plain list: no new keys
        for k, block in enumerate(self._resblocks):
            block.emb_index = k
        self._emb_cache = None

    def _apply(self, fn, recurse=True):
        # .to()/.half()/... : the cached stack is a copy of weights outside the module tree; drop it rather than
        # keep the old device's copy alive (an offloaded prior would still hold GPU memory).
        self._emb_cache = None
        return super()._apply(fn, recurse)

    def _block_embeddings(self, emb: torch.Tensor) -> list:
        """Every ResBlock's time projection, emb_layers(emb), from one matrix product over the blocks' stacked
        Linear weights instead of one small product per block (41 in the released prior): on the CPU a small
        product can cost milliseconds of thread wake-up in a busy machine. Each output element is the same
        128-term dot product. The stacked weights are cached while the blocks' weights are unchanged."""
        lins = [b.emb_layers[1] for b in self._resblocks]
        # Inference tensors (weights loaded under torch.inference_mode, as ComfyUI loads models) have no version
        # counter: their stack is not cached (a cat of small matrices per call).
        key = None if any(m.weight.is_inference() or m.bias.is_inference() for m in lins) else \
            tuple((m.weight.data_ptr(), m.weight._version, m.bias.data_ptr(), m.bias._version) for m in lins)
        if key is None or self._emb_cache is None or self._emb_cache[0] != key:
            self._emb_cache = (key, torch.cat([m.weight for m in lins]), torch.cat([m.bias for m in lins]),
                               [m.out_features for m in lins])
        _, weight, bias, sizes = self._emb_cache
        return list(torch.split(F.linear(F.silu(emb), weight, bias), sizes, dim=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        if not torch.is_grad_enabled():
            emb = self._block_embeddings(emb)
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        if torch.is_grad_enabled():
            return self.out(h)
        return self.out[2](F.silu(self.out[0](h), inplace=True))


# --------------------------------------------------------------------------------------------------------------
# Loading

def strip_module_prefix(sd: Mapping) -> dict:
    """DifFace saved EMA weights of a possibly DDP-wrapped model: drop a `module.` prefix when every key has it."""
    keys = list(sd)
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def config_from_state_dict(sd: Mapping, image_size: int = 512, num_head_channels: int = 64) -> PriorUNetConfig:
    """Constructor arguments from tensor shapes. `image_size` and `num_head_channels` leave no trace in the
    weights: the defaults are the released prior's."""
    try:
        w0 = sd["input_blocks.0.0.weight"]
        model_channels, in_channels = int(w0.shape[0]), int(w0.shape[1])
        out_channels = int(sd["out.2.weight"].shape[0])
    except KeyError as exc:
        raise ValueError(f"no {exc.args[0]} tensor") from exc
    idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    counts, mults, attn_levels = [0], [], set()
    level = 0
    for i in idx[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:          # a Downsample closes a level
            counts.append(0)
            level += 1
            continue
        counts[-1] += 1
        out = int(sd[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0])
        if len(mults) == level:
            mults.append(out // model_channels)
        if f"input_blocks.{i}.1.qkv.weight" in sd:
            attn_levels.add(level)
    emb_out = int(sd["input_blocks.1.0.emb_layers.1.weight"].shape[0])
    first_out = int(sd["input_blocks.1.0.in_layers.2.weight"].shape[0])
    return PriorUNetConfig(
        image_size=image_size, in_channels=in_channels, model_channels=model_channels, out_channels=out_channels,
        num_res_blocks=tuple(counts), attention_resolutions=tuple(image_size >> lv for lv in sorted(attn_levels)),
        channel_mult=tuple(mults), num_head_channels=num_head_channels,
        use_scale_shift_norm=emb_out == 2 * first_out)


def load_prior_unet(path: str, device: torch.device | str = "cpu", config: Optional[PriorUNetConfig] = None,
                    ) -> PriorUNet:
    """Load the prior strictly (an optional `module.` prefix is stripped). Without `config` the architecture is
    read from the shapes, with the released prior's image size and head width."""
    raw = load_weights(path, device="cpu")
    if not isinstance(raw, Mapping):
        raise ModelFileInvalid(f"{os.path.basename(path)} holds a {type(raw).__name__}, not a state dict; expected "
                               f"the DifFace iDDPM FFHQ-512 prior ({PRIOR_FILE}).")
    sd = strip_module_prefix(raw)
    if config is None:
        try:
            config = config_from_state_dict(sd)
        except (ValueError, KeyError, IndexError, ZeroDivisionError) as exc:
            raise ModelFileInvalid(
                f"{os.path.basename(path)} is not a guided-diffusion UNet like the DifFace prior {PRIOR_FILE} "
                f"({exc}); its first keys are {list(sd)[:4]}.") from exc
    net = PriorUNet(config)
    check_keys(sd, net, path, expected=f"guided-diffusion UNet ({PRIOR_FILE} layout)")
    net.load_state_dict(sd, strict=True)
    return net.eval().requires_grad_(False).to(device)
