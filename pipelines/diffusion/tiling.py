"""Overlapping tiles with normalised blend weights, for any per-tile function (VAE encoder/decoder, denoiser).

The output is sum_t(w_t * f(tile_t)) / sum_t(w_t) over the output grid, so a function that acts locally
(pointwise, or a receptive field inside the overlap) gives exactly the untiled result, and a function with a
global receptive field (attention, GroupNorm) gets tiles that fade into each other instead of hard seams.

The tile grid is TSD-SR's / OSEDiff's: starts 0, stride, 2*stride, ... while the tile ends inside the image,
then one last tile flush with the far border (stride = tile - overlap). Blend "gaussian" is their weight
(var 0.01 over the tile, midpoint (w-1)/2 across and h/2 down, as in both official scripts); "linear"
cross-fades over the overlap (starting from 0, so no step where a tile begins) and is 1 elsewhere.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

BLENDS = ("gaussian", "linear", "none")


def show_preview(hook, image: Callable[[], torch.Tensor]) -> None:
    """Hand the hook a live preview (image() -> [N,3,H,W] in 0..1) when it wants one now (a hosted node, at most
    once a second, see host/device.Progress); otherwise image() is never called, so nothing is computed or copied."""
    wants = getattr(hook, "wants_preview", None)
    if wants is not None and wants():
        hook.preview(image())


def tile_starts(length: int, tile: int, overlap: int, align: int = 1, even: bool = False) -> list[int]:
    """Start offsets covering [0, length) with tiles of min(tile, length); starts are multiples of `align`
    except possibly the last one (flush with the border), which must then be aligned by the caller's sizes.
    even=False: the official grid (fixed stride, last tile flush); even=True: the same number of tiles spread
    evenly, so every overlap is at least `overlap` and the last one is not much larger than the others."""
    if tile >= length:
        return [0]
    if overlap >= tile:
        raise ValueError(f"tile overlap {overlap} must be smaller than the tile size {tile}")
    if even:
        n = len(tile_starts(length, tile, overlap, align))
        return [(i * (length - tile) // (n - 1)) // align * align for i in range(n - 1)] + [length - tile]
    stride = max((tile - overlap) // align * align, align)
    starts = list(range(0, length - tile, stride))
    last = length - tile
    if not starts or starts[-1] != last:
        starts.append(last)
    return starts


def gaussian_weights_1d(n: int, centre_offset: float) -> torch.Tensor:
    var = 0.01
    mid = (n - 1) / 2 + centre_offset
    x = torch.arange(n, dtype=torch.float64)
    return torch.exp(-((x - mid) ** 2) / (n * n) / (2 * var)) / math.sqrt(2 * math.pi * var)


def linear_weights_1d(n: int, ramp: int, ramp_in: bool = True, ramp_out: bool = True) -> torch.Tensor:
    """1 inside; a cross-fade over `ramp` pixels on the sides that face another tile: 0, 1/r, .. (r-1)/r coming
    in and 1, (r-1)/r, .. 1/r going out, so two regularly spaced tiles sum to 1 and a tile's first pixel adds
    nothing (no step where it starts). Sides on the image border keep weight 1."""
    w = torch.ones(n, dtype=torch.float64)
    r = min(ramp, n)
    if r <= 0:
        return w
    steps = torch.arange(r, dtype=torch.float64) / r
    if ramp_in:
        w[:r] = torch.minimum(w[:r], steps)
    if ramp_out:
        w[n - r:] = torch.minimum(w[n - r:], 1 - steps)
    return w


def blend_weights(h: int, w: int, blend: str, ramp_h: int = 0, ramp_w: int = 0,
                  edges: tuple = (True, True, True, True)) -> torch.Tensor:
    """[h, w] float64 weights of one output tile; `edges` = (top, bottom, left, right) face another tile."""
    if blend == "gaussian":
        # The official scripts centre the rows on h/2 and the columns on (w-1)/2; kept for identical output.
        return torch.outer(gaussian_weights_1d(h, 0.5), gaussian_weights_1d(w, 0.0))
    if blend == "linear":
        top, bottom, left, right = edges
        return torch.outer(linear_weights_1d(h, ramp_h, top, bottom), linear_weights_1d(w, ramp_w, left, right))
    if blend == "none":
        return torch.ones(h, w, dtype=torch.float64)
    raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")


def tile_count(h: int, w: int, tile: int, overlap: int, align: int = 1) -> int:
    return len(tile_starts(h, tile, overlap, align)) * len(tile_starts(w, tile, overlap, align))  # same when even


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
                scale: float = 1.0, blend: str = "gaussian", align: int = 1, max_batch: int = 0,
                hook: Optional[Callable[[int], None]] = None, even: bool = False,
                preview: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Apply `fn` ([n,C,th,tw] -> [n,C',th*scale,tw*scale]) over overlapping tiles of x [N,C,H,W].

    Tiles of all N images go through `fn` together, at most `max_batch` items per call (0: all tiles of one
    row of the grid at once). `align` keeps tile starts on multiples (8 for a VAE, the patch size for a
    transformer) so input and output grids line up exactly. `hook(1)` runs after each tile (progress and
    interruption). With one tile the function sees the whole input unchanged. `preview` (the output so far ->
    an image in 0..1) makes a live preview of the blended canvas for a hook that wants one (show_preview).
    """
    n, _, h, w = x.shape
    if max_batch and n > max_batch:  # more images than one call may take: one group of images at a time
        return torch.cat([tiled_apply(fn, x[i:i + max_batch], tile, overlap, scale, blend, align, max_batch, hook,
                                      even, preview) for i in range(0, n, max_batch)], dim=0)
    ys, xs = tile_starts(h, tile, overlap, align, even), tile_starts(w, tile, overlap, align, even)
    th, tw = min(tile, h), min(tile, w)
    if len(ys) == 1 and len(xs) == 1:
        out = fn(x)
        if preview is not None:
            show_preview(hook, lambda: preview(out))
        if hook is not None:
            hook(1)
        return out
    oh, ow = round(h * scale), round(w * scale)
    oth, otw = round(th * scale), round(tw * scale)
    ov = round(overlap * scale)
    cache: dict = {}

    def weights_at(y: int, x0: int) -> torch.Tensor:
        edges = (y > 0, y + th < h, x0 > 0, x0 + tw < w) if blend == "linear" else None
        if edges not in cache:
            cache[edges] = blend_weights(oth, otw, blend, ov, ov, edges or (True,) * 4).to(x.device, torch.float32)
        return cache[edges]

    out = None
    wsum = torch.zeros(1, 1, oh, ow, device=x.device, dtype=torch.float32)
    coords = [(y, x0) for y in ys for x0 in xs]
    per_call = max(1, (max_batch // n) if max_batch else len(xs))
    for i in range(0, len(coords), per_call):
        chunk = coords[i:i + per_call]
        batch = torch.cat([x[:, :, y:y + th, x0:x0 + tw] for y, x0 in chunk], dim=0)
        res = fn(batch)
        if out is None:
            out = torch.zeros(n, res.shape[1], oh, ow, device=x.device, dtype=torch.float32)
        for j, (y, x0) in enumerate(chunk):
            oy, ox = round(y * scale), round(x0 * scale)
            wt = weights_at(y, x0)
            out[:, :, oy:oy + oth, ox:ox + otw] += res[j * n:(j + 1) * n].float() * wt
            wsum[:, :, oy:oy + oth, ox:ox + otw] += wt
            if preview is not None:  # the tiles blended so far (the rest stays at 0 until its tiles arrive)
                show_preview(hook, lambda: preview(out / wsum.clamp_min(1e-6)))
            if hook is not None:
                hook(1)
        del res, batch
    return (out / wsum).to(x.dtype)
