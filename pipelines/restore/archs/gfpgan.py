"""GFPGAN "clean" architecture (GFPGANv1Clean: U-Net encoder + StyleGAN2 decoder with SFT), pure PyTorch.

This is the network of the official GFPGAN v1.2 / v1.3 / v1.4 checkpoints (TencentARC/GFPGAN, Apache-2.0,
`gfpgan/archs/gfpganv1_clean_arch.py` + `stylegan2_clean_arch.py`), re-written for inference:

- Parameter and buffer names and shapes are exactly the official ones, so the released files load with
  `strict=True` (the unused parts of the official module - the style MLP, the intermediate toRGB heads - are
  kept as parameters so the files load, but are not run).
- The official modulated convolution builds one weight per sample and runs a grouped convolution. For a batch
  (B > 1) the modulation is applied to the activations instead (scale the input channels, one ordinary
  convolution with the shared weight, scale the output channels by the demodulation factor) - the same function
  without per-sample weights; the demodulation factors come from the squared weights with one small float32
  matmul. For a single face the weight itself is modulated (float32), which saves two elementwise passes.
- In-place activations/updates on freshly computed tensors (inference module: no per-layer copies); with autograd
  on (fine-tuning, pipelines/adapt) the same arithmetic runs out of place.
- Half precision: styles and demodulation factors are always float32; for fp16/bf16 activations the styles and
  weights are normalised first (the scale cancels in the demodulation) so no intermediate can overflow, and
  the RGB skip branch is accumulated in float32.
- Noise: the official `forward` defaults to `randomize_noise=True` and GFPGANer.enhance does not change that,
  so every official call draws fresh N(0,1) noise per StyleConv layer with `out.new_empty(b,1,h,w).normal_()`.
  Here noise comes from an explicit `torch.Generator`: mode "random" draws the per-layer maps in the official
  order with shape (1,1,h,w) from a CPU generator, which is exactly what the official network draws for one face
  after `torch.manual_seed(seed)` on CPU; the maps are shared by every face of a batch, so a face's result does
  not depend on the batch it is in. A caller restoring many chunks draws them once (`random_noise_maps`, one
  transfer to the device) and passes them as `noise_maps`, instead of a CPU draw and ~15 copies per chunk. Mode "stored" uses the checkpoint's `noises.noise{i}` buffers
  (`randomize_noise=False` in the official code); "none" injects nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

NOISE_MODES = ("random", "stored", "none")
_HALF = (torch.float16, torch.bfloat16)


# In-place updates of fresh activations save memory at inference; with autograd on (fine-tuning, pipelines/adapt)
# they would overwrite values the backward pass needs, so the same arithmetic runs out of place there.
def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2) if torch.is_grad_enabled() else F.leaky_relu_(x, 0.2)


def _add(x: torch.Tensor, y) -> torch.Tensor:
    return x + y if torch.is_grad_enabled() else x.add_(y)


def _mul(x: torch.Tensor, y) -> torch.Tensor:
    return x * y if torch.is_grad_enabled() else x.mul_(y)


@dataclass(frozen=True)
class GFPGANConfig:
    out_size: int = 512
    num_style_feat: int = 512
    channel_multiplier: int = 2
    num_mlp: int = 8
    input_is_latent: bool = True
    different_w: bool = True
    narrow: float = 1
    sft_half: bool = True


def _stylegan_channels(channel_multiplier: float, narrow: float) -> dict:
    """Channel count per resolution of the StyleGAN2 decoder (the U-Net uses half of these)."""
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
             256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {res: int(c * narrow) for res, c in table.items()}


# --------------------------------------------------------------------------------------------------------------
# StyleGAN2 decoder pieces


class _PixelNormStyle(nn.Module):
    """Normalise style vectors to unit RMS (first layer of the style MLP)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution. State: `weight` (1, out, in, k, k) and `modulation` (Linear style -> in)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int,
                 demodulate: bool = True, upsample: bool = False, eps: float = 1e-8):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.demodulate, self.upsample, self.eps = demodulate, upsample, eps
        self.modulation = nn.Linear(num_style_feat, in_channels, bias=True)
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size)
                                   / math.sqrt(in_channels * kernel_size ** 2))

    def styles(self, latent: torch.Tensor) -> torch.Tensor:
        """Per-sample input-channel scales (float32) for latent [B, num_style_feat]."""
        return F.linear(latent.float(), self.modulation.weight.float(), self.modulation.bias.float())

    def forward(self, x: torch.Tensor, latent: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        s = self.styles(latent)                                # [B, in], float32
        if x.shape[0] == 1:
            return self._forward_single(x, s, gain)
        return self._forward_batched(x, s, gain)

    def _forward_single(self, x: torch.Tensor, s: torch.Tensor, gain: float) -> torch.Tensor:
        """One sample: modulate/demodulate the weight itself (float32; demodulated rows have unit norm)."""
        w = self.weight[0].float() * s[0][None, :, None, None]
        if self.demodulate:
            w = w * torch.rsqrt(w.pow(2).sum(dim=(1, 2, 3), keepdim=True) + self.eps)
        if gain != 1.0:
            w = w * gain
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return F.conv2d(x, w.to(x.dtype), padding=self.kernel_size // 2)

    def _forward_batched(self, x: torch.Tensor, s: torch.Tensor, gain: float) -> torch.Tensor:
        """B samples: scale the input channels, one shared-weight convolution, scale the output channels."""
        w = self.weight[0]                                     # [out, in, k, k]
        if x.dtype in _HALF:
            # conv(x*s, w)*d is invariant to rescaling s and w (d absorbs it): keep every factor <= 1 in magnitude.
            s = s / s.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
            wf = w.float()
            w = wf / wf.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        x = x * s.to(x.dtype)[:, :, None, None]
        if self.upsample:
            # Per-channel scaling commutes with bilinear resampling, so it is applied on the smaller tensor.
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        out = F.conv2d(x, w.to(x.dtype), padding=self.kernel_size // 2)
        if self.demodulate:
            w_sq = w.float().pow(2).sum(dim=(2, 3))                               # [out, in]
            out_scale = torch.rsqrt(s.pow(2) @ w_sq.t() + self.eps) * gain       # [B, out], float32
            out = _mul(out, out_scale.to(out.dtype)[:, :, None, None])
        elif gain != 1.0:
            out = _mul(out, gain)
        return out


class StyleConv(nn.Module):
    """Modulated conv (x sqrt 2) + scaled noise + bias + leaky ReLU(0.2). Keys: modulated_conv.*, weight, bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int,
                 upsample: bool = False):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_channels, out_channels, kernel_size, num_style_feat,
                                              demodulate=True, upsample=upsample)
        self.weight = nn.Parameter(torch.zeros(1))            # noise strength
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor, latent: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        out = self.modulated_conv(x, latent, gain=math.sqrt(2.0))   # a fresh tensor: updated in place below
        if noise is not None:
            out = _add(out, self.weight.to(out.dtype) * noise.to(out.dtype))
        out = _add(out, self.bias.to(out.dtype))
        return _lrelu(out)


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB without demodulation, plus the (upsampled) previous RGB. Keys: modulated_conv.*, bias."""

    def __init__(self, in_channels: int, num_style_feat: int, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(in_channels, 3, 1, num_style_feat, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, latent: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
        # The RGB branch is tiny (3 channels): run it in float32 whatever the trunk's dtype.
        s = self.modulated_conv.styles(latent)
        w = self.modulated_conv.weight[0].float()
        if x.shape[0] == 1:
            out = F.conv2d(x.float(), w * s[0][None, :, None, None])
        else:
            out = F.conv2d(x.float() * s[:, :, None, None], w)
        out = _add(out, self.bias.float())
        if skip is not None:
            if self.upsample:
                skip = F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
            out = _add(out, skip)
        return out


class ConstantInput(nn.Module):
    def __init__(self, num_channel: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, num_channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1, -1)


class StyleGAN2DecoderSFT(nn.Module):
    """StyleGAN2 generator whose features are modulated by spatial (SFT) conditions from the U-Net."""

    def __init__(self, out_size: int, num_style_feat: int, num_mlp: int, channel_multiplier: float,
                 narrow: float, sft_half: bool):
        super().__init__()
        self.num_style_feat = num_style_feat
        self.sft_half = sft_half
        mlp = [_PixelNormStyle()]
        for _ in range(num_mlp):
            mlp += [nn.Linear(num_style_feat, num_style_feat, bias=True), nn.LeakyReLU(0.2)]
        self.style_mlp = nn.Sequential(*mlp)                  # keys style_mlp.1, .3, ... (used only for z inputs)

        ch = _stylegan_channels(channel_multiplier, narrow)
        self.log_size = int(math.log(out_size, 2))
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.num_latent = self.log_size * 2 - 2

        self.constant_input = ConstantInput(ch[4], 4)
        self.style_conv1 = StyleConv(ch[4], ch[4], 3, num_style_feat)
        self.to_rgb1 = ToRGB(ch[4], num_style_feat, upsample=False)
        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer in range(self.num_layers):
            res = 2 ** ((layer + 5) // 2)
            self.noises.register_buffer(f"noise{layer}", torch.randn(1, 1, res, res))
        c_in = ch[4]
        for lvl in range(3, self.log_size + 1):
            c_out = ch[2 ** lvl]
            self.style_convs.append(StyleConv(c_in, c_out, 3, num_style_feat, upsample=True))
            self.style_convs.append(StyleConv(c_out, c_out, 3, num_style_feat))
            self.to_rgbs.append(ToRGB(c_out, num_style_feat, upsample=True))
            c_in = c_out

    def noise_shapes(self) -> list:
        return [(1, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2)) for i in range(self.num_layers)]

    def make_noise(self, mode: str, generator: Optional[torch.Generator], device, dtype) -> list:
        if mode == "none":
            return [None] * self.num_layers
        if mode == "stored":
            return [getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]
        if mode == "random":
            # Same draws, same order, same shapes as the official network for a single face (CPU RNG stream).
            maps = [torch.randn(shape, generator=generator, dtype=torch.float32) for shape in self.noise_shapes()]
            return [m.to(device=device, dtype=dtype) for m in maps]
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {mode!r}")

    @staticmethod
    def _sft(out: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, half_only: bool) -> torch.Tensor:
        if not half_only:
            return out * scale + shift
        half = out.shape[1] // 2
        if torch.is_grad_enabled():
            return torch.cat([out[:, :half], out[:, half:] * scale + shift], dim=1)
        # `out` is a fresh activation: modulate its second half in place (no concatenation copy).
        out[:, half:].mul_(scale).add_(shift)
        return out

    def forward(self, latent: torch.Tensor, conditions: list, noise: list, input_is_latent: bool = True,
                dtype: torch.dtype = torch.float32):
        """latent: [B, num_latent, C] (or [B, C], repeated); conditions: [scale0, shift0, scale1, shift1, ...]."""
        if not input_is_latent:
            latent = self.style_mlp(latent) if latent.ndim == 2 else self.style_mlp(
                latent.flatten(0, 1)).view_as(latent)
        if latent.ndim == 2:
            latent = latent.unsqueeze(1).expand(-1, self.num_latent, -1)
        out = self.constant_input(latent.shape[0]).to(dtype)
        out = self.style_conv1(out, latent[:, 0], noise[0])
        skip = self.to_rgb1(out, latent[:, 1], None)
        idx = 1
        for lvl, to_rgb in enumerate(self.to_rgbs):
            conv_up, conv = self.style_convs[2 * lvl], self.style_convs[2 * lvl + 1]
            out = conv_up(out, latent[:, idx], noise[idx])
            if idx < len(conditions):
                out = self._sft(out, conditions[idx - 1], conditions[idx], self.sft_half)
            out = conv(out, latent[:, idx + 1], noise[idx + 1])
            skip = to_rgb(out, latent[:, idx + 2], skip)
            idx += 2
        return skip


# --------------------------------------------------------------------------------------------------------------
# U-Net encoder / condition branch


class ResBlock(nn.Module):
    """conv3x3 - lrelu - bilinear resample - conv3x3 - lrelu, plus a resampled 1x1 (bias-free) skip."""

    def __init__(self, in_channels: int, out_channels: int, mode: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.factor = 0.5 if mode == "down" else 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _lrelu(self.conv1(x))
        y = F.interpolate(y, scale_factor=self.factor, mode="bilinear", align_corners=False)
        y = _lrelu(self.conv2(y))
        x = F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)
        return _add(y, self.skip(x))


class GFPGANv1Clean(nn.Module):
    """GFPGAN v1.2/1.3/1.4 network. forward(x in [-1,1], noise=..., generator=...) -> image in ~[-1,1]."""

    arch_name = "GFPGANv1Clean"

    def __init__(self, config: GFPGANConfig = GFPGANConfig()):
        super().__init__()
        self.config = config
        c = config
        self.out_size = c.out_size
        self.log_size = int(math.log(c.out_size, 2))
        if 2 ** self.log_size != c.out_size:
            raise ValueError(f"out_size must be a power of two, got {c.out_size}")
        # The U-Net uses half of the decoder's channels (the official `unet_narrow = narrow * 0.5`).
        ch = _stylegan_channels(c.channel_multiplier, c.narrow * 0.5)

        self.conv_body_first = nn.Conv2d(3, ch[c.out_size], 1)
        self.conv_body_down = nn.ModuleList()
        c_in = ch[c.out_size]
        for lvl in range(self.log_size, 2, -1):
            self.conv_body_down.append(ResBlock(c_in, ch[2 ** (lvl - 1)], "down"))
            c_in = ch[2 ** (lvl - 1)]
        self.final_conv = nn.Conv2d(c_in, ch[4], 3, 1, 1)
        self.conv_body_up = nn.ModuleList()
        c_in = ch[4]
        for lvl in range(3, self.log_size + 1):
            self.conv_body_up.append(ResBlock(c_in, ch[2 ** lvl], "up"))
            c_in = ch[2 ** lvl]
        # Intermediate RGB heads: only used for training losses (return_rgb); kept so checkpoints load strictly.
        self.toRGB = nn.ModuleList(nn.Conv2d(ch[2 ** lvl], 3, 1) for lvl in range(3, self.log_size + 1))
        n_w = (self.log_size * 2 - 2) if c.different_w else 1
        self.final_linear = nn.Linear(ch[4] * 4 * 4, n_w * c.num_style_feat)
        self.stylegan_decoder = StyleGAN2DecoderSFT(c.out_size, c.num_style_feat, c.num_mlp, c.channel_multiplier,
                                                    c.narrow, c.sft_half)
        self.condition_scale = nn.ModuleList()
        self.condition_shift = nn.ModuleList()
        for lvl in range(3, self.log_size + 1):
            co = ch[2 ** lvl]
            sft_co = co if c.sft_half else 2 * co
            for branch in (self.condition_scale, self.condition_shift):
                branch.append(nn.Sequential(nn.Conv2d(co, co, 3, 1, 1), nn.LeakyReLU(0.2),
                                            nn.Conv2d(co, sft_co, 3, 1, 1)))

    @property
    def input_size(self) -> int:
        return self.out_size

    def random_noise_maps(self, generator: Optional[torch.Generator], device, dtype) -> list:
        """The per-layer maps of noise mode "random" (see make_noise), drawn once for reuse over many calls."""
        return self.stylegan_decoder.make_noise("random", generator, device, dtype)

    def forward(self, x: torch.Tensor, noise: str = "random", generator: Optional[torch.Generator] = None,
                noise_maps: Optional[list] = None, **_ignored) -> torch.Tensor:
        """x: [B,3,S,S] in [-1,1] (S = out_size). Returns [B,3,S,S] float32 (unclamped, nominally [-1,1]).

        noise_maps: with noise "random", maps from `random_noise_maps` (on x's device and dtype) used instead of
        drawing them from `generator`.
        Extra keyword arguments (e.g. CodeFormer's fidelity) are accepted and ignored, like the official
        `weight=` argument that GFPGANer passes.
        """
        feat = _lrelu(self.conv_body_first(x))
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.append(feat)
        feat = _lrelu(self.final_conv(feat))
        lin = self.final_linear
        style = F.linear(feat.flatten(1).float(), lin.weight.float(), lin.bias.float())   # style codes in float32
        if self.config.different_w:
            style = style.view(style.shape[0], -1, self.config.num_style_feat)
        conditions = []
        for i, block in enumerate(self.conv_body_up):
            feat = block(_add(feat, skips[-1 - i]))            # feat is fresh; the skip is not used again
            conditions.append(self.condition_scale[i](feat))
            conditions.append(self.condition_shift[i](feat))
        if noise != "random" or noise_maps is None:
            if generator is None and noise == "random":
                generator = torch.Generator().manual_seed(0)
            noise_maps = self.stylegan_decoder.make_noise(noise, generator, x.device, x.dtype)
        return self.stylegan_decoder(style, conditions, noise_maps, input_is_latent=self.config.input_is_latent,
                                     dtype=x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Recognising a state dict


def is_gfpgan_clean(sd: Mapping) -> bool:
    return "conv_body_first.weight" in sd and "stylegan_decoder.style_conv1.modulated_conv.weight" in sd


def is_gfpgan_original(sd: Mapping) -> bool:
    """GFPGANv1 (paper model, fused CUDA ops) and GFPGANBilinear use ConvLayer/EqualConv2d key names."""
    return "conv_body_first.0.weight" in sd and any(k.startswith("stylegan_decoder.") for k in sd)


def _shape(sd: Mapping, key: str, dim: int, default):
    t = sd.get(key)
    return int(t.shape[dim]) if t is not None and t.ndim > dim else default


def config_from_state_dict(sd: Mapping) -> GFPGANConfig:
    """Infer GFPGANv1Clean's constructor arguments from tensor shapes. Missing tensors fall back to the v1.4
    values, so that the key check afterwards can name exactly what is missing."""
    n_down = sum(1 for k in sd if k.startswith("conv_body_down.") and k.endswith(".conv1.weight"))
    if n_down == 0:
        n_down = sum(1 for k in sd if k.startswith("stylegan_decoder.to_rgbs.") and k.endswith("modulated_conv.weight"))
    if n_down == 0:
        raise ValueError("no conv_body_down.* or stylegan_decoder.to_rgbs.* tensors")
    out_size = 2 ** (n_down + 2)
    num_style_feat = _shape(sd, "stylegan_decoder.style_conv1.modulated_conv.modulation.weight", 1, 512)
    narrow = _shape(sd, "stylegan_decoder.style_conv1.modulated_conv.weight", 2, 512) / 512
    narrow = int(narrow) if float(narrow).is_integer() else narrow
    if out_size >= 64:
        # Decoder channels at out_size = 16384 / out_size * channel_multiplier * narrow.
        top = _shape(sd, f"stylegan_decoder.to_rgbs.{n_down - 1}.modulated_conv.weight", 2, None)
        cm = 2 if top is None else max(1, int(round(top / (16384 / out_size * narrow))))
    else:
        cm = 2  # at 32 and below every channel count is 512 * narrow: the multiplier changes no shape
    n_latent = _shape(sd, "final_linear.weight", 0, num_style_feat * (2 * n_down + 2)) // num_style_feat
    sft_in = _shape(sd, "condition_scale.0.0.weight", 0, 0)
    sft_out = _shape(sd, "condition_scale.0.2.weight", 0, 0)
    num_mlp = sum(1 for k in sd if k.startswith("stylegan_decoder.style_mlp.") and k.endswith(".weight")) or 8
    return GFPGANConfig(out_size=out_size, num_style_feat=num_style_feat, channel_multiplier=cm, num_mlp=num_mlp,
                        input_is_latent=True, different_w=n_latent > 1, narrow=narrow, sft_half=sft_out == sft_in)


def describe(config: GFPGANConfig) -> str:
    return "GFPGANv1Clean(" + ", ".join(f"{k}={v}" for k, v in asdict(config).items()) + ")"
