"""Affine warps of CPU float32 tensors with OpenCV's warpAffine: the same sampling as the grid_sample path of
geometry.py (pixel centres at integer coordinates, align_corners=False; zero, reflected or replicated border),
written straight into the output tensor's planes, and only over the part of the source a face touches.

Why: on a CPU, grid_sample needs a materialised float grid (8 bytes per output pixel) and a second pass for the
edge renormalisation; warpAffine computes its positions in fixed point on the fly and reads only the source
region given to it (measured 5-20x faster per face; benchmarks/bench_detect_align_paste.py). Bilinear RGB warps
go through RGBA: OpenCV's 4-channel float path is 2.5x faster and its alpha is the coverage. OpenCV 5 samples
float images at exact positions (equal to the grid_sample path to ~2e-5); OpenCV 4 rounds them to 1/32 pixel
(colours then differ by at most the local gradient times 1/64 pixel, as facexlib's crops do). GPU tensors and
other dtypes keep the grid_sample path.
"""
from __future__ import annotations

import math
import mmap
import threading

import cv2
import numpy as np
import torch

_INTERP = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
_BORDER = {"constant": cv2.BORDER_CONSTANT, "reflect": cv2.BORDER_REFLECT, "edge": cv2.BORDER_REPLICATE}
# Region margin in source pixels around the corners of a warped square: bicubic taps reach 2 pixels out.
_MARGIN = 3


def usable(*tensors: torch.Tensor) -> bool:
    """Whether this module handles these tensors (CPU float32 without autograd; anything else, GPU tensors
    included, goes through grid_sample)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in tensors)


# Outputs from this size on are allocated in transparent huge pages where the OS offers them (Linux): a fresh
# tensor of 198 crops of 512 (600 MB) spends 0.6 s in 4 KiB page faults, 0.2 s in 2 MiB pages (2-core CPU).
# Below it, torch.empty: glibc's malloc serves blocks under its largest mmap threshold (32 MiB) from memory
# already mapped once a block of that size has been freed (a second photo's crops fault no page), while a
# fresh mapping is zeroed by the kernel every time (measured: 6 crops of 512, 1.9 ms -> 0.3 ms per call).
_HUGE_FROM = 32 << 20


def empty(shape, channels_last: bool = False) -> torch.Tensor:
    """torch.empty(shape) in float32 (channels-last strides for [N,C,H,W] if asked), large ones in huge pages."""
    n_bytes = 4 * math.prod(shape)
    perm = (0, 2, 3, 1) if channels_last else tuple(range(len(shape)))
    stored = tuple(shape[p] for p in perm)
    if n_bytes >= _HUGE_FROM and hasattr(mmap, "MADV_HUGEPAGE"):
        buf = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
        flat = torch.frombuffer(buf, dtype=torch.float32)  # keeps buf alive as long as the tensor
    else:
        flat = torch.empty(math.prod(shape), dtype=torch.float32)
    t = flat.view(stored)
    return t.permute(0, 3, 1, 2) if channels_last else t


def supersampled(affine: np.ndarray, ss: int) -> np.ndarray:
    """dst->src affine [2,3] of a grid ss times finer: fine pixel J sits at coarse position (J + 0.5)/ss - 0.5,
    the sub-pixel positions the grid_sample path averages over."""
    if ss == 1:
        return affine
    t = np.array([[1 / ss, 0, 0.5 / ss - 0.5], [0, 1 / ss, 0.5 / ss - 0.5], [0, 0, 1]])
    return affine @ t


def source_region(dst_to_src: np.ndarray, out_w: int, out_h: int, src_w: int, src_h: int):
    """[x0,y0,x1,y1) of the source pixels an out_w x out_h warp can read (its corners' bounding box plus the
    interpolation margin, clipped to the source)."""
    xs = np.array([-0.5, out_w - 0.5, -0.5, out_w - 0.5])
    ys = np.array([-0.5, -0.5, out_h - 0.5, out_h - 0.5])
    px = dst_to_src[0, 0] * xs + dst_to_src[0, 1] * ys + dst_to_src[0, 2]
    py = dst_to_src[1, 0] * xs + dst_to_src[1, 1] * ys + dst_to_src[1, 2]
    x0, x1 = math.floor(px.min()) - _MARGIN, math.ceil(px.max()) + _MARGIN + 1
    y0, y1 = math.floor(py.min()) - _MARGIN, math.ceil(py.max()) + _MARGIN + 1
    return max(0, x0), max(0, y0), min(src_w, x1), min(src_h, y1)


def interleaved(t: torch.Tensor) -> bool:
    """Whether a [C,H,W] tensor is stored channels-last (HWC rows; e.g. a ComfyUI IMAGE permuted to CHW)."""
    return 1 < t.shape[0] <= 4 and t.stride(0) == 1 and t.stride(2) == t.shape[0]  # OpenCV: up to 4 channels


_SCRATCH = threading.local()
_SCRATCH_MAX = 1 << 24  # bytes: a 16 MiB buffer at most is kept between calls (per thread)


def _scratch(shape, slot: str) -> np.ndarray:
    """A float32 buffer of this shape reused between calls of this thread in the same slot (whatever lives in it
    is consumed before the next such call): a fresh 4 MiB warp result per face costs its page faults every time
    (measured ~0.3 ms)."""
    buf = getattr(_SCRATCH, slot, None)
    if buf is None or buf.shape != tuple(shape):
        buf = np.empty(shape, dtype=np.float32)
        if buf.nbytes <= _SCRATCH_MAX:
            setattr(_SCRATCH, slot, buf)
    return buf


def warp_planes(src: torch.Tensor, dst_to_src: np.ndarray, out_w: int, out_h: int, *, ss: int = 1,
                interpolation: str = "bilinear", border: str = "constant", out: torch.Tensor | None = None,
                whole_source: bool = False) -> torch.Tensor:
    """Warp src [C,h,w] (CPU float32, planar or channels-last) to [C,out_h,out_w].

    dst_to_src: [2,3] float64 map from output pixel to source pixel. ss > 1 samples each output pixel at ss x ss
    sub-pixel positions and averages them (exact box mean: cv2.INTER_AREA at an integer factor). Only the source
    region the warp can reach is read, unless whole_source (a reflected border may reach any pixel). Writes into
    `out` when given (any layout; without a copy when it is contiguous or channels-last like src).
    """
    return _warp(src, dst_to_src, out_w, out_h, ss, interpolation, border, out, whole_source, False)[0]


def warp_with_coverage(src: torch.Tensor, dst_to_src: np.ndarray, out_w: int, out_h: int, *, ss: int = 1,
                       interpolation: str = "bilinear", out: torch.Tensor | None = None):
    """warp_planes with a zero border, and coverage() of the same warp as a float32 [out_h,out_w] array (a view of
    the warp's own alpha channel where the bilinear RGBA path serves both; valid until this thread's next call).
    Returns (out, coverage)."""
    return _warp(src, dst_to_src, out_w, out_h, ss, interpolation, "constant", out, False, True)


def _warp(src, dst_to_src, out_w, out_h, ss, interpolation, border, out, whole_source, want_coverage):
    c, h, w = src.shape
    if out is None:
        out = torch.empty((c, out_h, out_w), dtype=torch.float32)
    m = supersampled(np.asarray(dst_to_src, dtype=np.float64), ss)
    x0, y0, x1, y1 = (0, 0, w, h) if whole_source else source_region(m, out_w * ss, out_h * ss, w, h)
    if x1 <= x0 or y1 <= y0:
        if border == "constant":
            return out.zero_(), (np.zeros((out_h, out_w), np.float32) if want_coverage else None)
        x0, y0, x1, y1 = 0, 0, w, h  # the nearest (edge) or mirrored (reflect) pixels may be anywhere
    m = m.copy()
    m[0, 2] -= x0
    m[1, 2] -= y0
    kw = dict(flags=_INTERP[interpolation] | cv2.WARP_INVERSE_MAP, borderMode=_BORDER[border], borderValue=0)

    def warp(part, dst):
        if ss == 1:
            return cv2.warpAffine(part, m, (out_w, out_h), dst=dst, **kw)
        fine = cv2.warpAffine(part, m, (out_w * ss, out_h * ss), **kw)
        return cv2.resize(fine, (out_w, out_h), dst=dst, interpolation=cv2.INTER_AREA)

    if c == 3 and interpolation == "bilinear" and border == "constant" and not whole_source and interleaved(src):
        # OpenCV's bilinear warp of float RGBA is 2.5x faster than of RGB (its 4-lane path; the same values bit for
        # bit), and an alpha of ones inside the image is the coverage (the region read holds every pixel in reach).
        part = cv2.cvtColor(src.permute(1, 2, 0).numpy()[y0:y1, x0:x1], cv2.COLOR_RGB2RGBA)
        warped = warp(part, _scratch((out_h, out_w, 4), "coverage" if want_coverage else "warp"))
        if interleaved(out) and out.permute(1, 2, 0).is_contiguous():
            cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB, dst=out.permute(1, 2, 0).numpy())
        else:  # NumPy copy: no OpenMP region (see paste._composite_numpy)
            np.copyto(out.numpy(), warped[..., :3].transpose(2, 0, 1))
        return out, (warped[..., 3] if want_coverage else None)
    if not interleaved(src) and src.stride(-1) != 1:
        src = src.contiguous()
    if interleaved(src):  # one call for all channels, written in place when out is channels-last too
        hwc = src.permute(1, 2, 0).numpy()[y0:y1, x0:x1]
        if interleaved(out) and out.permute(1, 2, 0).is_contiguous():
            warp(hwc, out.permute(1, 2, 0).numpy())
        else:
            out.copy_(torch.from_numpy(warp(hwc, None)).permute(2, 0, 1))
    else:
        planes = src.numpy()
        for k in range(c):
            if out[k].is_contiguous():
                warp(planes[k, y0:y1, x0:x1], out[k].numpy())
            else:
                out[k].copy_(torch.from_numpy(warp(planes[k, y0:y1, x0:x1], None)))
    cov = coverage(dst_to_src, out_w, out_h, w, h, ss=ss, interpolation=interpolation)[0].numpy() \
        if want_coverage else None
    return out, cov


def partial_box(dst_to_src: np.ndarray, out_w: int, out_h: int, src_w: int, src_h: int, *, ss: int = 1,
                interpolation: str = "bilinear"):
    """[x0,y0,x1,y1) of the output pixels whose coverage() may be below 1: those with a sample near enough to the
    source's edge, or beyond it, for a tap to fall outside. Everywhere else every tap is inside: coverage is
    exactly 1 (bilinear) or 1 up to the rounding of the bicubic weights' sum, so renormalising there is moot. From the geometry alone: the output square clipped by each of the four
    half-planes "within reach of that edge", then the union of their bounding boxes, one pixel wider."""
    m = np.asarray(dst_to_src, dtype=np.float64)
    reach = 1.0 if interpolation == "bicubic" else 0.0  # bicubic taps reach one pixel further than bilinear
    foot = 0.5 * (np.abs(m[:, 0]) + np.abs(m[:, 1]))  # a pixel's samples lie within this of its centre's image
    square = [(-0.5, -0.5), (out_w - 0.5, -0.5), (out_w - 0.5, out_h - 0.5), (-0.5, out_h - 0.5)]
    boxes = []
    for axis, size in ((0, src_w), (1, src_h)):
        a, b, c = m[axis]
        for sign, limit in ((1.0, reach + foot[axis]), (-1.0, reach + foot[axis] - (size - 1))):
            # sign * (source coordinate) < limit: within reach of the low (sign 1) or high (sign -1) edge
            f = [sign * (a * x + b * y + c) - limit for x, y in square]
            poly = []
            for k in range(4):
                (p, fp), (q, fq) = (square[k], f[k]), (square[(k + 1) % 4], f[(k + 1) % 4])
                if fp < 0:
                    poly.append(p)
                if (fp < 0) != (fq < 0):
                    t = fp / (fp - fq)
                    poly.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
            if poly:
                xs, ys = [p[0] for p in poly], [p[1] for p in poly]
                boxes.append((min(xs), min(ys), max(xs), max(ys)))
    if not boxes:
        return 0, 0, 0, 0
    x0 = max(0, math.floor(min(b[0] for b in boxes)) - 1)
    y0 = max(0, math.floor(min(b[1] for b in boxes)) - 1)
    x1 = min(out_w, math.ceil(max(b[2] for b in boxes)) + 2)
    y1 = min(out_h, math.ceil(max(b[3] for b in boxes)) + 2)
    return x0, y0, max(x0, x1), max(y0, y1)


_ONES: list = [torch.ones((1, 1, 1))]
_ONES_CACHE_MAX = 1 << 22  # pixels: a 16 MiB plane at most is kept between calls


def _ones(h: int, w: int) -> torch.Tensor:
    """[1,h,w] of ones, a view of a cached plane (rows contiguous), so a warp of ones allocates nothing."""
    cached = _ONES[0]
    if cached.shape[1] < h or cached.shape[2] < w:
        cached = torch.ones((1, max(h, cached.shape[1]), max(w, cached.shape[2])))
        if cached[0].numel() > _ONES_CACHE_MAX:
            return torch.ones((1, h, w))
        _ONES[0] = cached
    return cached[:, :h, :w]


def area_pool(src: torch.Tensor, factor: int) -> torch.Tensor:
    """F.avg_pool2d(src[None], factor)[0] for [C,h,w] (exact box means; a remainder row/column is dropped), with
    OpenCV's single pass where the size divides (no OpenMP region: no stall when other processes hold the cores)."""
    c, h, w = src.shape
    if factor == 1:
        return src
    if h % factor or w % factor or not (interleaved(src) or src.stride(-1) == 1):
        return torch.nn.functional.avg_pool2d(src[None], factor)[0]
    size = (w // factor, h // factor)
    if interleaved(src):
        return torch.from_numpy(cv2.resize(src.permute(1, 2, 0).numpy(), size, interpolation=cv2.INTER_AREA)
                                .reshape(size[1], size[0], c)).permute(2, 0, 1)
    planes = src.numpy()
    return torch.from_numpy(np.stack([cv2.resize(planes[k], size, interpolation=cv2.INTER_AREA) for k in range(c)]))


def coverage(dst_to_src: np.ndarray, out_w: int, out_h: int, src_w: int, src_h: int, *, ss: int = 1,
             interpolation: str = "bilinear", out: torch.Tensor | None = None) -> torch.Tensor:
    """[1,out_h,out_w]: the interpolation weight that falls inside the source (a warp of a plane of ones with a
    zero border), for renormalising colours warped with a zero border."""
    m = supersampled(np.asarray(dst_to_src, dtype=np.float64), ss)
    x0, y0, x1, y1 = source_region(m, out_w * ss, out_h * ss, src_w, src_h)
    if x1 <= x0 or y1 <= y0:
        return torch.zeros((1, out_h, out_w)) if out is None else out.zero_()
    ones = _ones(y1 - y0, x1 - x0)
    shift = np.asarray(dst_to_src, dtype=np.float64).copy()
    shift[0, 2] -= x0
    shift[1, 2] -= y0
    return warp_planes(ones, shift, out_w, out_h, ss=ss, interpolation=interpolation, whole_source=True, out=out)
