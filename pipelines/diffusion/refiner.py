"""One-step latent diffusion super-resolution / refinement, shared by the TSD-SR and OSEDiff backends.

    x (bicubic-resized to the output size, [-1,1]) -> z = VAE.encode(x).sample() * scaling_factor
    -> pred = denoiser(z, fixed t) -> z0 = update(z, pred) -> VAE.decode(z0 / scaling_factor).clamp(-1, 1)

The backend supplies the denoiser call and the closed-form update (TSD-SR: flow matching at t=1000, z0 = z - v;
OSEDiff: DDPM epsilon at t=999, z0 = (z - sqrt(1-a) eps) / sqrt(a)). Neither applies the VAE's shift_factor,
and neither does this module. Everything runs in overlapping tiles (pipelines/diffusion/tiling.py) so any image size fits:
the encoder in pixel tiles, the denoiser in latent tiles (only when the latent is larger than one tile, the
official rule: h*w > tile^2), the decoder in latent tiles. The posterior noise is drawn once for the whole
latent from the seed, so tiling does not change it. The image is padded (replicate) to the model's size
multiple and cropped back, so the output is pixel-aligned with the input (the official scripts resize
instead, which shifts the geometry slightly). On out-of-memory the run is retried with half the batch, then
half the tiles, before an error says what to change.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..io.errors import FaceMendError, InvalidImage
from ..io.memory import empty_cache, is_oom
from .tiling import BLENDS, tile_count, tiled_apply


class OutOfMemory(FaceMendError, MemoryError):
    """Still out of memory with the smallest tiles and batch."""


@dataclass
class TileSettings:
    latent_tile: int = 64        # denoiser tile in latent pixels (x8 image pixels)
    latent_overlap: int = 8
    encoder_tile: int = 1024     # VAE encoder tile in image pixels
    decoder_tile: int = 128      # VAE decoder tile in latent pixels
    vae_overlap: int = 64        # image pixels (decoder: /8 in latent pixels)
    blend: str = "gaussian"      # denoiser tiles; the VAE tiles always blend linearly
    max_batch: int = 4           # images*tiles per network call

    def smaller(self) -> Optional["TileSettings"]:
        """The next settings to try after an out-of-memory error, or None at the floor."""
        if self.max_batch > 1:
            return replace(self, max_batch=self.max_batch // 2)
        if self.latent_tile > 32 or self.decoder_tile > 32 or self.encoder_tile > 256:
            lt = max(32, self.latent_tile // 2)
            return replace(self, latent_tile=lt, latent_overlap=min(self.latent_overlap, lt // 2),
                           decoder_tile=max(32, self.decoder_tile // 2), encoder_tile=max(256, self.encoder_tile // 2),
                           vae_overlap=32)
        return None


class Conditioning(torch.nn.Module):
    """Tensors a denoiser needs besides its weights (prompt / pooled embeddings), held as buffers so that they
    move with the model: a closure that captured the tensors themselves would keep them on the load device
    after the model moved ("Expected all tensors to be on the same device"). Closures capture this module and
    read its attributes at call time."""

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)


default_is_oom = is_oom  # (the name callers import)


class OneStepSR:
    """A loaded one-step backend: VAE (with its encoder LoRA merged), denoiser, fixed timestep, update rule.

    denoise(z_tiles) -> prediction; update(z, prediction) -> z0. Call it on [N,3,H,W] images in [0,1].
    """

    def __init__(self, name: str, vae, denoise: Callable[[torch.Tensor], torch.Tensor],
                 update: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], modules: list,
                 size_multiple: int = 8, tiles: TileSettings | None = None, description: str = ""):
        self.name = name
        self.vae = vae
        self.denoise = denoise
        self.update = update
        self.modules = modules  # every torch module of the backend (for .to() and memory estimates)
        self.size_multiple = size_multiple  # image pixels: VAE factor x transformer patch size
        self.tiles = tiles or TileSettings()
        self.description = description
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def to(self, device) -> "OneStepSR":
        for m in self.modules:
            m.to(device)
        return self

    def model_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules
                   for t in list(m.parameters()) + list(m.buffers()))

    # --- stages -------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, tiles: TileSettings, generator: torch.Generator, hook=None) -> torch.Tensor:
        vae = self.vae

        def moments(t):
            h = vae.encoder(t)
            if getattr(vae, "quant_conv", None) is not None:
                h = vae.quant_conv(h)
            return h

        m = tiled_apply(moments, x, tiles.encoder_tile, tiles.vae_overlap, scale=1 / self.vae_factor,
                        blend="linear", align=self.vae_factor, max_batch=tiles.max_batch, hook=hook, even=True)
        mean, logvar = m.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
        z = mean.float() + std * noise.to(mean.device)
        return (z * self.scaling_factor).to(x.dtype)

    def refine_latent(self, z: torch.Tensor, tiles: TileSettings, hook=None) -> torch.Tensor:
        h, w = z.shape[-2:]
        if _one_piece(h, w, tiles):
            pred = _batched(self.denoise, z, tiles.max_batch, hook)
        else:
            align = max(1, self.size_multiple // self.vae_factor)
            pred = tiled_apply(self.denoise, z, tiles.latent_tile, tiles.latent_overlap, blend=tiles.blend,
                               align=align, max_batch=tiles.max_batch, hook=hook)
        return self.update(z, pred)

    def decode(self, z0: torch.Tensor, tiles: TileSettings, hook=None) -> torch.Tensor:
        vae = self.vae

        def dec(t):
            return vae.decode(t / self.scaling_factor, return_dict=False)[0]

        return tiled_apply(dec, z0, tiles.decoder_tile, tiles.vae_overlap // self.vae_factor,
                           scale=self.vae_factor, blend="linear", max_batch=tiles.max_batch, hook=hook, even=True,
                           preview=lambda y: (y.float().clamp(-1, 1) + 1) / 2)

    # --- planning -----------------------------------------------------------------------------------------
    def output_size(self, h: int, w: int, scale: int) -> tuple[int, int]:
        return h * scale, w * scale

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        m = self.size_multiple
        return -(-h // m) * m, -(-w // m) * m

    def count_tiles(self, h: int, w: int, scale: int = 1, tiles: TileSettings | None = None, n: int = 1) -> int:
        """Progress units of one call on n images of h x w (encoder + denoiser + decoder tiles, per group of
        at most max_batch images)."""
        t = tiles or self.tiles
        groups = -(-n // t.max_batch) if t.max_batch else 1
        ph, pw = self.padded_size(*self.output_size(h, w, scale))
        f = self.vae_factor
        lh, lw = ph // f, pw // f
        enc = tile_count(ph, pw, t.encoder_tile, t.vae_overlap, f)
        den = 1 if _one_piece(lh, lw, t) else tile_count(lh, lw, t.latent_tile, t.latent_overlap)
        dec = tile_count(lh, lw, t.decoder_tile, t.vae_overlap // f)
        return (enc + den + dec) * groups

    # --- the whole step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, images: torch.Tensor, scale: int = 1, seed: int = 0, tiles: TileSettings | None = None,
            hook=None) -> torch.Tensor:
        """One attempt with fixed tile settings: [N,3,H,W] in [0,1] -> [N,3,H*scale,W*scale] in [0,1]."""
        t = tiles or self.tiles
        if t.blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {t.blend!r}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise InvalidImage(f"expected images [N,3,H,W], got {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise InvalidImage("the image contains NaN or infinite values")
        n, _, h, w = images.shape
        oh, ow = self.output_size(h, w, scale)
        x = images.to(self.device, torch.float32)
        if (oh, ow) != (h, w):
            x = F.interpolate(x, size=(oh, ow), mode="bicubic", align_corners=False)
        ph, pw = self.padded_size(oh, ow)
        if (ph, pw) != (oh, ow):
            x = F.pad(x, (0, pw - ow, 0, ph - oh), mode="replicate")
        x = (x * 2 - 1).clamp(-1, 1).to(self.dtype)
        gen_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        generator = torch.Generator(device=gen_device).manual_seed(int(seed))
        z = self.encode(x, t, generator, hook)
        z0 = self.refine_latent(z, t, hook)
        out = self.decode(z0.to(self.dtype), t, hook).float().clamp(-1, 1)
        return ((out[:, :, :oh, :ow] + 1) / 2).clamp(0, 1)

    def __call__(self, images: torch.Tensor, scale: int = 1, seed: int = 0, tiles: TileSettings | None = None,
                 hook=None, is_oom: Callable[[BaseException], bool] = default_is_oom,
                 on_retry: Callable[[TileSettings, BaseException], None] | None = None) -> torch.Tensor:
        """run() that retries with smaller batches/tiles on out-of-memory, then raises OutOfMemory."""
        if int(scale) not in (1, 2, 4):
            raise ValueError(f"scale must be 1, 2 or 4, got {scale}")
        h, w = images.shape[-2:]

        def give_up(t: TileSettings) -> str:
            return (f"{self.name}: out of memory on {self.device} for {images.shape[0]} image(s) of {w}x{h} at "
                    f"x{scale}, even with batch 1, latent tiles of {t.latent_tile} and VAE decoder tiles of "
                    f"{t.decoder_tile}. Free memory (close other models or apps), use fp16/bf16 precision, a lower "
                    "scale, or run on a GPU with more memory.")

        return run_shrinking(lambda t: self.run(images, int(scale), seed, t, hook), tiles or self.tiles,
                             TileSettings.smaller, give_up, self.device, is_oom, on_retry)


def run_shrinking(run: Callable[[TileSettings], torch.Tensor], t: TileSettings,
                  smaller: Callable[[TileSettings], Optional[TileSettings]], give_up: Callable[[TileSettings], str],
                  device, is_oom: Callable[[BaseException], bool] = default_is_oom,
                  on_retry: Callable[[TileSettings, BaseException], None] | None = None) -> torch.Tensor:
    """run(t), and on out-of-memory again with smaller(t) until it fits; OutOfMemory(give_up(t)) when smaller(t) is
    None. The cache is emptied after the failed attempt's exception (and the tensors it holds) is released."""
    while True:
        try:
            return run(t)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_oom(exc):
                raise
            less = smaller(t)
            if less is None:
                raise OutOfMemory(f"{give_up(t)} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
            if on_retry is not None:
                on_retry(less, exc)
        t = less  # out of the except block: the failed attempt's tensors are released by now
        empty_cache(device)


def _one_piece(h: int, w: int, tiles: TileSettings) -> bool:
    """The official rule (no tiling up to one tile's area), and no side over two tiles: a 16x512 latent would
    exceed SD3's position-embedding grid (192 patches) in one piece."""
    return h * w <= tiles.latent_tile ** 2 and max(h, w) <= 2 * tiles.latent_tile


def _batched(fn, x: torch.Tensor, max_batch: int, hook=None) -> torch.Tensor:
    step = max_batch or x.shape[0]
    outs = []
    for i in range(0, x.shape[0], step):
        outs.append(fn(x[i:i + step]))
        if hook is not None:
            hook(1)
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
