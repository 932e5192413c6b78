"""GPEN (Yang et al., CVPR 2021, "GAN Prior Embedded Network"): a convolutional encoder whose features replace
the noise inputs of a StyleGAN2 generator (rosinality layout) and whose 4x4 code gives the style. Pure PyTorch
inference, written for this pack.

Weights: `GPEN-BFR-512.pth`, `GPEN-BFR-256.pth` (yangxy/GPEN; the authors' terms: academic and non-commercial use
only), `GPEN-BFR-1024` / `-2048` (ModelScope). Each is a bare state dict of the official `FullGenerator`
(face_model/gpen_model.py). This module loads them with their exact key names and shapes and computes what the
official `FullGenerator.forward(x)[0]` computes on the CPU path (`fused_leaky_relu` = leaky ReLU(0.2) of x + bias
times sqrt 2, `upfirdn2d_native`):

- encoder `ecd0` (1x1 conv) and `ecd1..` (blur + stride-2 3x3 conv), each an equalised conv (weight scaled by
  1/sqrt(fan_in)) + fused leaky ReLU; every output is kept;
- `final_linear` maps the flattened 4x4 features to a 512 code, which the style MLP (`generator.style`: pixel
  norm + 8 equalised linears, lr_mul 0.01) turns into the one style vector of every layer;
- the generator starts from a learned 4x4 constant; each styled conv (modulated / demodulated, upsampling ones via
  a stride-2 transposed conv + [1,3,3,1] blur) concatenates the encoder feature of its resolution times a learned
  scalar (`noise.weight`) to its output before the fused leaky ReLU, so its activations have twice its channels;
  the RGB heads add up across resolutions (skip upsampled with upfirdn2d up=2, kernel [1,3,3,1] x 4).

GPEN has no random input: the output depends on the face only. The channel widths (channel_multiplier, narrow of
the official constructor) are read from the tensor shapes, so every released size loads. Batching: the
modulation is applied to the activations (scale the input channels, one shared-weight convolution, scale the
output channels by the demodulation factor), the same function as the official per-sample weights. For fp16/bf16
the styles and weights are normalised first (the factor cancels in the demodulation) and the RGB path runs in
float32, as in archs/gfpgan.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

_HALF = (torch.float16, torch.bfloat16)
SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class GPENConfig:
    size: int = 512
    channels: tuple = ()          # ((resolution, channels), ...) from 4 to size
    style_dim: int = 512
    n_mlp: int = 8
    lr_mlp: float = 0.01

    def ch(self, res: int) -> int:
        return dict(self.channels)[res]


def official_channels(size: int, channel_multiplier: float = 2, narrow: float = 1) -> tuple:
    """The official constructor's channel table (for building networks of a given configuration)."""
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
             256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier,
             2048: 8 * channel_multiplier}
    return tuple((r, int(c * narrow)) for r, c in table.items() if r <= size)


def _leaky(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The official fused_leaky_relu: leaky_relu(x + bias, 0.2) * sqrt(2) (bias per channel, dim 1)."""
    b = bias.to(x.dtype).view((1, -1) + (1,) * (x.ndim - 2))
    return F.leaky_relu(x + b, 0.2) * SQRT2


class FusedLeakyReLU(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _leaky(x, self.bias)


def _kernel() -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = k[None, :] * k[:, None]
    return k / k.sum()


def _fir(x: torch.Tensor, kernel: torch.Tensor, pad: tuple) -> torch.Tensor:
    """upfirdn2d(up=1, down=1): pad, then the depthwise FIR filter (flipped, as upfirdn2d_native convolves)."""
    c = x.shape[1]
    k = kernel.flip(0, 1).to(x.dtype)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    return F.conv2d(x, k.expand(c, 1, *k.shape), groups=c)


class Blur(nn.Module):
    """The FIR filter; the checkpoint's `kernel` buffer already holds the gain (x 4 after upsampling)."""

    def __init__(self, pad: tuple, gain: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", _kernel() * gain)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fir(x, self.kernel, self.pad)


class UpsampleFIR(nn.Module):
    """upfirdn2d(up=2, pad=(2, 1)) with the [1,3,3,1] kernel x 4: zero insertion, then the FIR filter."""

    def __init__(self):
        super().__init__()
        self.register_buffer("kernel", _kernel() * 4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        z = x.new_zeros(b, c, h, 2, w, 2)
        z[:, :, :, 0, :, 0] = x
        return _fir(z.view(b, c, 2 * h, 2 * w), self.kernel, (2, 1))


class EqualLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, lr_mul: float = 1.0, activate: bool = False, bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((d_out,), float(bias_init)))
        self.scale, self.lr_mul, self.activate = lr_mul / math.sqrt(d_in), lr_mul, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        w, b = self.weight.float() * self.scale, self.bias.float() * self.lr_mul
        if self.activate:
            return _leaky(F.linear(x, w), b)
        return F.linear(x, w, b)


class EqualConv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, k, k))
        self.scale, self.stride, self.padding = 1 / math.sqrt(c_in * k * k), stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, (self.weight * self.scale).to(x.dtype), stride=self.stride, padding=self.padding)


class ConvLayer(nn.Sequential):
    """Encoder layer: [blur] + equalised conv (no bias) + fused leaky ReLU, with the official indices."""

    def __init__(self, c_in: int, c_out: int, k: int, downsample: bool = False):
        layers = []
        if downsample:
            layers.append(Blur(pad=(2, 2)))                   # p = (4 - 2) + (3 - 1) -> (2, 2)
            layers.append(EqualConv2d(c_in, c_out, k, stride=2, padding=0))
        else:
            layers.append(EqualConv2d(c_in, c_out, k, stride=1, padding=k // 2))
        layers.append(FusedLeakyReLU(c_out))
        super().__init__(*layers)


class ModulatedConv2d(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False):
        super().__init__()
        self.c_in, self.c_out, self.k = c_in, c_out, k
        self.demodulate, self.upsample = demodulate, upsample
        self.scale = 1 / math.sqrt(c_in * k * k)
        self.weight = nn.Parameter(torch.randn(1, c_out, c_in, k, k))
        self.modulation = EqualLinear(style_dim, c_in, bias_init=1.0)
        if upsample:
            self.blur = Blur(pad=(1, 1), gain=4.0)            # p = (4 - 2) - (3 - 1) = 0 -> (1, 1), kernel x 4

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        s = self.modulation(style)                            # [B, in], float32
        w = self.weight[0].float() * self.scale               # [out, in, k, k]
        demod = None
        if self.demodulate:
            demod = torch.rsqrt(s.pow(2) @ w.pow(2).sum(dim=(2, 3)).t() + 1e-8)   # [B, out]
        if x.dtype in _HALF:
            # conv(x*s, w)*d is invariant to rescaling s and w when demodulating: keep every factor <= 1.
            s_max = s.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
            w_max = w.flatten(1).abs().amax(dim=1).clamp_min(1e-12)
            if demod is not None:
                demod = demod * s_max * w_max[None, :]
                s, w = s / s_max, w / w_max.view(-1, 1, 1, 1)
        x = x * s.to(x.dtype)[:, :, None, None]
        if self.upsample:
            out = F.conv_transpose2d(x, w.transpose(0, 1).to(x.dtype), stride=2, padding=0)
        else:
            out = F.conv2d(x, w.to(x.dtype), padding=self.k // 2)
        if demod is not None:
            out = out * demod.to(out.dtype)[:, :, None, None]
        if self.upsample:
            out = self.blur(out)
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))


class StyledConv(nn.Module):
    """Modulated conv, concatenated with weight x (encoder feature), fused leaky ReLU over both halves."""

    def __init__(self, c_in: int, c_out: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(c_in, c_out, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(2 * c_out)

    def forward(self, x: torch.Tensor, style: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        out = self.conv(x, style)
        out = torch.cat((out, self.noise.weight.to(out.dtype) * feat.to(out.dtype)), dim=1)
        return self.activate(out)


class ToRGB(nn.Module):
    def __init__(self, c_in: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = UpsampleFIR()
        self.conv = ModulatedConv2d(c_in, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        # Three output channels: run the RGB path in float32 whatever the trunk's dtype.
        out = self.conv(x.float(), style) + self.bias.float()
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class _PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x ** 2, dim=1, keepdim=True) + 1e-8)


class _ConstantInput(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, ch, 4, 4))


class Generator(nn.Module):
    def __init__(self, c: GPENConfig):
        super().__init__()
        self.style = nn.Sequential(_PixelNorm(), *[EqualLinear(c.style_dim, c.style_dim, lr_mul=c.lr_mlp,
                                                               activate=True) for _ in range(c.n_mlp)])
        self.input = _ConstantInput(c.ch(4))
        self.conv1 = StyledConv(c.ch(4), c.ch(4), c.style_dim)
        self.to_rgb1 = ToRGB(2 * c.ch(4), c.style_dim, upsample=False)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        c_in = c.ch(4)
        for i in range(3, int(math.log2(c.size)) + 1):
            c_out = c.ch(2 ** i)
            self.convs.append(StyledConv(2 * c_in, c_out, c.style_dim, upsample=True))
            self.convs.append(StyledConv(2 * c_out, c_out, c.style_dim))
            self.to_rgbs.append(ToRGB(2 * c_out, c.style_dim))
            c_in = c_out

    def forward(self, code: torch.Tensor, feats: list, dtype: torch.dtype) -> torch.Tensor:
        """code [B, style_dim]; feats: encoder features from 4x4 up to the output size."""
        w = self.style(code.float())                          # one style for every layer (no mixing/truncation)
        x = self.input.input.to(dtype).expand(code.shape[0], -1, -1, -1)
        x = self.conv1(x, w, feats[0])
        skip = self.to_rgb1(x, w, None)
        for j, to_rgb in enumerate(self.to_rgbs):
            feat = feats[j + 1]
            x = self.convs[2 * j](x, w, feat)
            x = self.convs[2 * j + 1](x, w, feat)
            skip = to_rgb(x, w, skip)
        return skip


class GPEN(nn.Module):
    """The official FullGenerator (same key names): encoder `ecd*`, `final_linear`, `generator`."""

    arch_name = "GPEN"

    def __init__(self, config: GPENConfig):
        super().__init__()
        self.config = c = config
        self.log_size = int(math.log2(c.size))
        self.generator = Generator(c)
        self.ecd0 = nn.Sequential(ConvLayer(3, c.ch(c.size), 1))
        c_in = c.ch(c.size)
        for i in range(self.log_size, 2, -1):
            c_out = c.ch(2 ** (i - 1))
            setattr(self, f"ecd{self.log_size - i + 1}", nn.Sequential(ConvLayer(c_in, c_out, 3, downsample=True)))
            c_in = c_out
        self.final_linear = nn.Sequential(EqualLinear(c.ch(4) * 16, c.style_dim, activate=True))

    @property
    def input_size(self) -> int:
        return self.config.size

    def forward(self, x: torch.Tensor, **_ignored) -> torch.Tensor:
        """x: [B,3,S,S] in [-1,1] -> [B,3,S,S] (nominally [-1,1]), float32."""
        feats = []
        for i in range(self.log_size - 1):
            x = getattr(self, f"ecd{i}")(x)
            feats.append(x)
        code = self.final_linear(x.flatten(1))
        return self.generator(code, feats[::-1], x.dtype)


# ------------------------------------------------------------------------------------------------ recognition


def is_gpen(sd: Mapping) -> bool:
    return all(k in sd for k in ("ecd0.0.0.weight", "generator.input.input", "generator.conv1.conv.weight",
                                 "generator.style.1.weight"))


def config_from_state_dict(sd: Mapping) -> GPENConfig:
    n_ecd = 1 + max(int(k.split(".")[0][3:]) for k in sd if k.startswith("ecd"))
    size = 2 ** (n_ecd + 1)
    channels = [(4, int(sd["generator.input.input"].shape[1]))]
    for i in range(3, n_ecd + 2):
        channels.append((2 ** i, int(sd[f"generator.convs.{2 * (i - 3)}.conv.weight"].shape[1])))
    n_mlp = sum(1 for k in sd if k.startswith("generator.style.") and k.endswith(".weight"))
    return GPENConfig(size=size, channels=tuple(channels), style_dim=int(sd["generator.style.1.weight"].shape[0]),
                      n_mlp=n_mlp)
