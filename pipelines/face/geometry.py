"""Face geometry on tensors: the FFHQ 5-point template, batched similarity fitting, and affine warps
between images and face crops with grid_sample (forward for alignment, inverse for paste-back).

Pixel convention: integer coordinates are pixel centres (as in OpenCV's warpAffine), so an affine
computed here can be compared with facexlib's. grid_sample uses align_corners=False, where a pixel
coordinate x maps to the normalised coordinate (2x+1)/W - 1.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu_warp

# facexlib / GFPGAN's FFHQ template for 512x512 crops: left eye, right eye, nose, left and right mouth corner.
FFHQ_TEMPLATE_512 = (
    (192.98138, 239.94708),
    (318.90277, 240.1936),
    (256.63416, 314.01935),
    (201.26117, 371.41043),
    (313.08905, 371.15118),
)
# facexlib pads aligned crops with this colour (it passes (135,133,132) to OpenCV on BGR images).
BORDER_GRAY_RGB = (132 / 255, 133 / 255, 135 / 255)
BORDER_MODES = ("constant", "reflect", "edge")
# Supersampling factor cap: beyond 8x8 samples per pixel the remaining aliasing is invisible.
MAX_SUPERSAMPLE = 8


def face_template(crop_size: int, device=None) -> torch.Tensor:
    """[5,2] template points for a square crop of crop_size (scaled from 512, as facexlib does)."""
    return torch.tensor(FFHQ_TEMPLATE_512, dtype=torch.float32, device=device) * (crop_size / 512.0)


def fit_similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping src
    points onto dst. src [N,P,2], dst [P,2] or [N,P,2] -> [N,2,3]. Closed form (Umeyama in 2-D)."""
    src = src.double()
    dst = dst.double().expand_as(src)
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    xs, xd = src - mu_s, dst - mu_d
    norm = (xs ** 2).sum((1, 2)).clamp(min=1e-12)
    a = (xs * xd).sum((1, 2)) / norm
    b = (xs[..., 0] * xd[..., 1] - xs[..., 1] * xd[..., 0]).sum(1) / norm
    m = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], 1)  # [N,2,2]
    t = mu_d[:, 0] - (m @ mu_s[:, 0, :, None])[..., 0]
    return torch.cat([m, t[..., None]], 2).float()


def invert_affine(affine: torch.Tensor) -> torch.Tensor:
    """Inverse of [N,2,3] affine maps (closed form; no LAPACK call)."""
    a = affine.double()
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    lin = torch.stack([torch.stack([a[:, 1, 1], -a[:, 0, 1]], -1),
                       torch.stack([-a[:, 1, 0], a[:, 0, 0]], -1)], 1) / det[:, None, None]
    trans = -(lin @ a[:, :, 2:])
    return torch.cat([lin, trans], 2).to(affine.dtype)


def affine_scale(affine: torch.Tensor) -> torch.Tensor:
    """Linear scale factor of each [N,2,3] similarity (output pixels per input pixel)."""
    a = affine.double()
    return (a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]).abs().sqrt().float()


def apply_affine(affine: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Map points [N,P,2] with affines [N,2,3]."""
    return points @ affine[:, :, :2].transpose(1, 2) + affine[:, None, :, 2]


def sample_grid(out_to_src: torch.Tensor, out_h: int, out_w: int, src_h: int, src_w: int, ss: int = 1,
                offset: torch.Tensor | None = None) -> torch.Tensor:
    """grid_sample grid [k, out_h*ss, out_w*ss, 2] for pixel affines out->src [k,2,3] (align_corners=False).

    Output pixel (i, j) is sampled at ss x ss sub-pixel positions. `offset` [k,2] (x, y) shifts each
    face's output window (paste-back regions). The normalisation (2x+1)/W-1 is folded into the affine,
    so building the grid costs one broadcast add per coordinate.
    """
    dev = out_to_src.device
    m = out_to_src.float()
    norm = torch.tensor([2.0 / src_w, 2.0 / src_h], device=dev)
    lin = m[:, :, :2] * norm[None, :, None]
    trans = (m[:, :, 2] + 0.5) * norm - 1
    if offset is not None:
        trans = trans + (lin @ offset.float().to(dev)[:, :, None])[..., 0]
    sub = (torch.arange(ss, device=dev, dtype=torch.float32) + 0.5) / ss - 0.5
    u = (torch.arange(out_w, device=dev, dtype=torch.float32)[:, None] + sub).reshape(-1)
    v = (torch.arange(out_h, device=dev, dtype=torch.float32)[:, None] + sub).reshape(-1)
    gx = (lin[:, 0, 0, None, None] * u + trans[:, 0, None, None]) + lin[:, 0, 1, None, None] * v[:, None]
    gy = (lin[:, 1, 0, None, None] * u + trans[:, 1, None, None]) + lin[:, 1, 1, None, None] * v[:, None]
    return torch.stack([gx, gy], -1)


def supersample_factor(scale: float) -> int:
    """Samples per output pixel (per axis) needed when one output pixel covers 1/scale input pixels."""
    if not math.isfinite(scale) or scale <= 0:
        return 1
    return int(min(MAX_SUPERSAMPLE, max(1, math.ceil(1.0 / scale - 1e-3))))


def crop_leaves_image(inverse: torch.Tensor, crop_size: int, hw) -> torch.Tensor:
    """[N] bool: whether any part of the crop (given crop->image affines) lies outside the image."""
    # NumPy on a few numbers: a torch reduction over a dim opens an OpenMP region, which stalls for a whole
    # scheduler slice (~5 ms each, measured) when another process holds the second core.
    e = crop_size - 0.5
    corners = np.array([[-0.5, -0.5], [e, -0.5], [-0.5, e], [e, e]], dtype=np.float32)
    inv = inverse.detach().float().cpu().numpy()
    pts = corners[None] @ inv[:, :, :2].transpose(0, 2, 1) + inv[:, None, :, 2]
    h, w = hw
    lo, hi = pts.min(1), pts.max(1)
    return torch.from_numpy((lo[:, 0] < -0.5) | (lo[:, 1] < -0.5) | (hi[:, 0] > w - 0.5) | (hi[:, 1] > h - 0.5))


INTERPOLATIONS = ("bilinear", "bicubic")


def check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")


def warp_to_crops(images: torch.Tensor, image_index: torch.Tensor, affine: torch.Tensor, crop_size: int,
                  border: str = "constant", border_value=BORDER_GRAY_RGB, antialias: bool = True,
                  interpolation: str = "bilinear") -> torch.Tensor:
    """Cut N aligned crops out of a batch of images.

    images [B,C,H,W]; image_index [N] (which image each face comes from); affine [N,2,3] image->crop.
    Returns [N,C,S,S]. One grid_sample per source image with that image's faces stacked along the
    height, so a huge photo is never duplicated per face. When a face is larger in the image than the
    crop, each crop pixel averages ss x ss bilinear samples (area-like antialiasing). interpolation
    "bicubic" samples bicubically where the crop is not supersampled (sharper, about 1 dB on upsampled faces);
    "bilinear" (default) matches facexlib's cv2.warpAffine crops.
    """
    check_interpolation(interpolation)
    if border not in BORDER_MODES:
        raise ValueError(f"border must be one of {BORDER_MODES}, got {border!r}")
    n, (b_count, c, h, w) = affine.shape[0], images.shape
    out = images.new_empty((n, c, crop_size, crop_size))
    if n == 0:
        return out
    dev = images.device
    inv = invert_affine(affine.float())
    scales = affine_scale(affine.float())
    outside = crop_leaves_image(inv, crop_size, (h, w))
    image_index = image_index.cpu()
    pad = {"constant": "zeros", "reflect": "reflection", "edge": "border"}[border]
    fill = torch.tensor((list(border_value) * c)[:c], device=dev, dtype=images.dtype)[None, :, None, None]
    if cpu_warp.usable(images):
        # Channels-last images (ComfyUI's, read_image's) give channels-last crops: one warp for all channels.
        out = cpu_warp.empty(tuple(out.shape), channels_last=images.shape[1] > 1 and images.stride(1) == 1)
        return _warp_to_crops_cpu(images, image_index, inv, scales, outside, crop_size, border, fill, antialias,
                                  interpolation, out)
    for b in range(b_count):
        idx = (image_index == b).nonzero().flatten()
        if idx.numel() == 0:
            continue
        ss = supersample_factor(float(scales[idx].min())) if antialias else 1
        k, side = idx.numel(), crop_size * ss
        grid = sample_grid(inv[idx].to(dev), crop_size, crop_size, h, w, ss)
        src = images[b:b + 1]
        mode = interpolation if ss == 1 else "bilinear"
        sampled = F.grid_sample(src, grid.reshape(1, k * side, side, 2).to(src.dtype), mode=mode,
                                padding_mode=pad, align_corners=False)
        if mode == "bicubic":
            sampled = sampled.clamp(0, 1)  # bicubic overshoots at edges
        sampled = sampled.reshape(c, k, side, side).transpose(0, 1)
        if ss > 1:
            sampled = F.avg_pool2d(sampled, ss)
        leave = outside[idx].nonzero().flatten()
        if border == "constant" and leave.numel():
            # Normalised sampling for crops reaching past the image edge: the weight that fell inside the
            # image (a grid_sample of a stride-0 image of ones: no memory) renormalises the colour, so a crop
            # pixel straddling the edge holds image colours only and pasting it back adds no border colour;
            # pixels with no image under them get the fill colour.
            ones = torch.ones((1, 1, 1, 1), device=dev, dtype=src.dtype).expand(leave.numel(), 1, h, w)
            inside = F.grid_sample(ones, grid[leave.to(dev)].to(src.dtype), mode=mode, padding_mode="zeros",
                                   align_corners=False)
            if ss > 1:
                inside = F.avg_pool2d(inside, ss)
            part = sampled[leave.to(dev)]
            sampled[leave.to(dev)] = torch.where(inside > 1e-3, part / inside.clamp(min=1e-3), fill)
        out[idx.to(dev)] = sampled
    return out


def _warp_to_crops_cpu(images, image_index, inv, scales, outside, crop_size, border, fill, antialias,
                       interpolation, out):
    """warp_to_crops for CPU float32 images with OpenCV (cpu_warp.py): the same sampling, supersampling factor
    (per image, from its smallest face) and edge renormalisation, each face warped straight into its output."""
    h, w = images.shape[-2:]
    inv64 = inv.double().numpy()
    fill = fill[0]
    for b in range(images.shape[0]):
        idx = (image_index == b).nonzero().flatten().tolist()
        if not idx:
            continue
        ss = supersample_factor(float(scales[idx].min())) if antialias else 1
        mode = interpolation if ss == 1 else "bilinear"
        for i in idx:
            crop = out[i]
            leaves = bool(outside[i])
            if border == "constant" and leaves:
                _, inside = cpu_warp.warp_with_coverage(images[b], inv64[i], crop_size, crop_size, ss=ss,
                                                        interpolation=mode, out=crop)
            else:
                cpu_warp.warp_planes(images[b], inv64[i], crop_size, crop_size, ss=ss, interpolation=mode,
                                     border=border, out=crop, whole_source=border == "reflect" and leaves)
            if mode == "bicubic":
                np.clip(crop.numpy(), 0, 1, out=crop.numpy())  # bicubic overshoots at edges
            if border == "constant" and leaves:
                x0, y0, x1, y1 = cpu_warp.partial_box(inv64[i], crop_size, crop_size, w, h, ss=ss, interpolation=mode)
                _renormalise_cpu(crop[:, y0:y1, x0:x1], inside[y0:y1, x0:x1], fill.numpy())
    return out


def _renormalise_cpu(crop: torch.Tensor, inside: np.ndarray, fill: np.ndarray) -> None:
    """As in the grid_sample path: colours divided by the weight that fell inside the image, the fill colour
    where none did. Only over the box of pixels whose weight is not exactly 1 (a division by 1 changes nothing),
    in the crop's own memory order (NumPy: single-threaded, see paste._composite_numpy)."""
    if inside.size == 0:
        return
    partial = inside != 1.0
    rows, cols = np.flatnonzero(partial.any(1)), np.flatnonzero(partial.any(0))
    if rows.size == 0:
        return
    win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    weight = inside[win]
    if cpu_warp.interleaved(crop):  # [H,W,C] view: the weight broadcasts over the last, contiguous axis
        c, weight, fill = crop.permute(1, 2, 0).numpy()[win], weight[..., None], fill.reshape(-1)
    else:
        c, weight, fill = crop.numpy()[(slice(None),) + win], weight[None], fill.reshape(-1, 1, 1)
    np.divide(c, np.maximum(weight, np.float32(1e-3)), out=c)
    np.copyto(c, np.broadcast_to(fill, c.shape), where=weight <= 1e-3)


def feather_mask(size: int, margin: float = 0.04, feather: float = 0.10, device=None) -> torch.Tensor:
    """Soft [size,size] blend mask for a crop: 0 within `margin` of the crop edge, rising smoothly over
    `feather` (fractions of the crop size) to 1. Separable, so the corners come out rounded."""
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    d = torch.minimum(c, 1 - c)
    t = ((d - margin) / max(feather, 1e-6)).clamp(0, 1)
    ramp = t * t * (3 - 2 * t)  # smoothstep: no kink where the ramp meets 0 and 1
    return ramp[:, None] * ramp[None, :]
