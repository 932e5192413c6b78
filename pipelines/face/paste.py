"""Paste-back: inverse-warp (restored) face crops into their source images with a feathered mask.

All faces are warped by a few batched grid_sample calls (faces grouped by supersampling factor and
padded to a common region size), each only over its own bounding region of the image, then
composited in order. The blend mask is built in crop space, so it follows the face's rotation and
fades to zero well inside the crop: no box edge can show.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu_warp
from .align import FaceAlignment
from ..io.errors import InvalidImage
from .geometry import (affine_scale, check_interpolation, crop_leaves_image, feather_mask, invert_affine,
                            sample_grid, supersample_factor)
from ..io.images import checked_view

# Elements (faces x region pixels x samples) per grid_sample call; bounds the memory of one call.
_CHUNK_ELEMENTS = 1 << 25


def _output_to_crop_affines(alignment: FaceAlignment, out_hw) -> torch.Tensor:
    """Affines from output-image pixels to crop pixels, allowing a background that was resized
    (e.g. upscaled by another node) after detection."""
    n = len(alignment)
    h0, w0 = alignment.image_sizes[0] if alignment.image_sizes else out_hw
    sy, sx = out_hw[0] / h0, out_hw[1] / w0
    t = torch.tensor([[1 / sx, 0, 0.5 / sx - 0.5], [0, 1 / sy, 0.5 / sy - 0.5]], dtype=torch.float64)
    a = alignment.affine.double()
    lin = a[:, :, :2] @ t[:, :2]
    trans = (a[:, :, :2] @ t[:, 2:])[..., 0] + a[:, :, 2]
    return torch.cat([lin, trans[..., None]], 2).reshape(n, 2, 3)


def _regions(out_to_crop: torch.Tensor, crop_size: int, hw) -> torch.Tensor:
    """Integer bounding region [x0,y0,x1,y1) in the output image of each crop, clipped to the image."""
    h, w = hw
    inv = invert_affine(out_to_crop)
    e = crop_size - 0.5
    corners = torch.tensor([[-0.5, -0.5], [e, -0.5], [-0.5, e], [e, e]], dtype=inv.dtype)
    pts = corners[None] @ inv[:, :, :2].transpose(1, 2) + inv[:, None, :, 2]
    lo = (pts.min(1).values - 1).floor()
    hi = (pts.max(1).values + 2).ceil()
    x0, y0 = lo[:, 0].clamp(0, w), lo[:, 1].clamp(0, h)
    x1, y1 = hi[:, 0].clamp(0, w), hi[:, 1].clamp(0, h)
    return torch.stack([x0, y0, x1, y1], 1).long()


def _crop_validity(alignment: FaceAlignment, size: int, device) -> torch.Tensor:
    """[N,1,size,size]: 1 where a crop pixel's centre lies inside its source image, else 0."""
    n, s_a = len(alignment), alignment.crop_size
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * (s_a / size) - 0.5
    inv = alignment.inverse.float().to(device)
    x = inv[:, 0, 0, None, None] * c[None, None, :] + inv[:, 0, 1, None, None] * c[None, :, None] + inv[:, 0, 2, None, None]
    y = inv[:, 1, 0, None, None] * c[None, None, :] + inv[:, 1, 1, None, None] * c[None, :, None] + inv[:, 1, 2, None, None]
    hw = torch.tensor([list(alignment.image_sizes[int(b)]) for b in alignment.image_index], device=device,
                      dtype=torch.float32).reshape(n, 2)
    inside = (x >= -0.5) & (x <= hw[:, 1, None, None] - 0.5) & (y >= -0.5) & (y <= hw[:, 0, None, None] - 0.5)
    return inside[:, None].float()


def _crop_validity_numpy(alignment: FaceAlignment, i: int, size: int) -> np.ndarray:
    """_crop_validity(alignment.select([i]), size, "cpu")[0, 0] with the same float32 operations, in NumPy."""
    s_a = alignment.crop_size
    c = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * np.float32(s_a / size) - np.float32(0.5)
    inv = alignment.inverse[i].float().numpy()
    x = inv[0, 0] * c[None, :] + inv[0, 1] * c[:, None] + inv[0, 2]
    y = inv[1, 0] * c[None, :] + inv[1, 1] * c[:, None] + inv[1, 2]
    h, w = (np.float32(v) for v in alignment.image_sizes[int(alignment.image_index[i])])
    half = np.float32(0.5)
    return ((x >= -half) & (x <= w - half) & (y >= -half) & (y <= h - half)).astype(np.float32)


def _check_inputs(images, crops, alignment, face_mask, image_mask):
    n = len(alignment)
    if crops.shape[0] != n:
        raise InvalidImage(f"paste-back got {crops.shape[0]} face crops for {n} aligned faces; connect the crops "
                           "that came from the same detect/align node (a restorer must keep their number and order)")
    if len(alignment.image_sizes) != images.shape[0]:
        raise InvalidImage(f"paste-back got {images.shape[0]} images but the faces were detected in "
                           f"{len(alignment.image_sizes)}; connect the same image batch that was detected")
    if face_mask is not None and face_mask.shape[0] != n:
        raise InvalidImage(f"face mask has {face_mask.shape[0]} entries, expected one per face ({n})")
    if image_mask is not None and (image_mask.shape[0] not in (1, images.shape[0])
                                   or tuple(image_mask.shape[-2:]) != tuple(images.shape[-2:])):
        raise InvalidImage(f"image mask of shape {tuple(image_mask.shape)} does not match the images "
                           f"{tuple(images.shape)}")


def paste_faces(images: torch.Tensor, crops: torch.Tensor, alignment: FaceAlignment, *,
                margin: float = 0.04, feather: float = 0.10, face_mask: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, antialias: bool = True, interpolation: str = "bilinear"):
    """Put N crops back into B images.

    images [B,3,H,W] (may be a resized version of the detected images); crops [N,3,s,s] (any s: a
    restorer or upscaler may have changed the crop resolution); face_mask: optional [N,h,w] mask in
    crop space (e.g. a face parsing mask), multiplied into the feather mask; image_mask: optional
    [B or 1,H,W] limiting where faces may be pasted; interpolation "bicubic" where crops are enlarged or
    kept in size (sharper), "bilinear" as facexlib. Returns (images [B,3,H,W], blend mask [B,1,H,W]).
    """
    images = checked_view(images, "paste-back image")
    check_interpolation(interpolation)
    _check_inputs(images, crops, alignment, face_mask, image_mask)
    if cpu_warp.usable(images):  # large outputs in huge pages (a fresh 24 MP image: 0.1 s of page faults)
        out = cpu_warp.empty(tuple(images.shape), channels_last=images.stride(1) == 1)
        np.copyto(out.numpy(), images.numpy())  # NumPy: no OpenMP region (see _composite_numpy)
        total = cpu_warp.empty((images.shape[0], 1) + tuple(images.shape[-2:]))
        total.numpy().fill(0)
    else:
        out = images.clone()
        total = images.new_zeros((images.shape[0], 1) + tuple(images.shape[-2:]))
    n = len(alignment)
    if n == 0:
        return out, total
    crops = checked_view(crops, "paste-back face crops").to(images.device, images.dtype)
    dev, hw, size = images.device, tuple(images.shape[-2:]), alignment.crop_size
    s_h, s_w = crops.shape[-2:]
    if s_h != s_w:
        raise InvalidImage(f"face crops must be square, got {s_h}x{s_w}")
    feather_m = feather_mask(s_h, margin, feather, device=dev)[None, None].to(images.dtype)
    fm = None
    if face_mask is not None:
        fm = face_mask.to(dev, images.dtype).reshape(n, 1, *face_mask.shape[-2:])
        if fm.shape[-1] != s_h or fm.shape[-2] != s_h:
            fm = F.interpolate(fm, size=(s_h, s_h), mode="bilinear", align_corners=False)
        fm = fm.clamp(0, 1)

    o2c = _output_to_crop_affines(alignment, hw)
    regions = _regions(o2c, size, hw)
    extent = (regions[:, 2:] - regions[:, :2]).clamp(min=0)
    # Crop pixels per output pixel. Faces much smaller in the photo than the crop are first shrunk by
    # 2^level with exact area pooling, then sampled with at most 2x2 supersampling.
    ratio = (affine_scale(o2c.float()) * (s_h / size)).tolist()
    max_level = max(0, int(math.log2(max(s_h, 1) / 16)))
    level = [min(max_level, int(math.floor(math.log2(r)))) if antialias and r >= 2 else 0 for r in ratio]
    ss = [supersample_factor(2 ** lv / r) if antialias else 1 for lv, r in zip(level, ratio)]
    leaves = crop_leaves_image(alignment.inverse, size, alignment.image_sizes[0]) if n else None
    if cpu_warp.usable(images, crops) and (fm is None or not fm.requires_grad):
        _paste_cpu(out, total, crops, alignment, o2c, regions, level, ss, leaves, feather_m, fm, image_mask,
                   interpolation)
        return out, total  # each pasted region clamped in place (the rest is the checked input)
    todo = sorted((i for i in range(n) if bool((extent[i] > 0).all())),
                  key=lambda i: (level[i], ss[i], int(extent[i].prod())))
    warped: dict[int, torch.Tensor] = {}
    start = 0
    while start < len(todo):
        lv, sf = level[todo[start]], ss[todo[start]]
        rw, rh = (int(v) for v in extent[todo[start]])
        stop = start + 1
        while stop < len(todo) and level[todo[stop]] == lv and ss[todo[stop]] == sf:
            nw, nh = max(rw, int(extent[todo[stop], 0])), max(rh, int(extent[todo[stop], 1]))
            if (stop - start + 1) * max(nh * nw * sf * sf, s_h * s_h) * 5 > _CHUNK_ELEMENTS:
                break  # bound the memory of one call
            rw, rh, stop = nw, nh, stop + 1
        group = todo[start:stop]
        g = torch.tensor(group)
        gd = g.to(dev)
        mask = feather_m.expand(len(group), -1, -1, -1)
        if fm is not None:
            mask = mask * fm[gd]
        if bool(leaves[g].any()):
            # Colour premultiplied by validity and renormalised after warping: crop pixels that lay outside
            # the source image (border fill) never leak into the photo, even where a face touches its edge.
            valid = _crop_validity(alignment.select(group), s_h, dev).to(images.dtype)
        else:
            valid = torch.ones_like(mask)
        src = torch.cat([crops[gd] * valid, valid, mask], 1)
        if lv > 0:
            src = F.avg_pool2d(src, 2 ** lv)
        grid = sample_grid(o2c[g].to(dev), rh, rw, size, size, sf, offset=regions[g, :2])
        mode = interpolation if sf == 1 and lv == 0 else "bilinear"
        res = F.grid_sample(src, grid.to(src.dtype), mode=mode, padding_mode="zeros", align_corners=False)
        if sf > 1:
            res = F.avg_pool2d(res, sf)
        for k, i in enumerate(group):
            warped[i] = res[k]
        start = stop

    for i in range(n):  # composite in face order (largest first within an image)
        if i in warped:
            _composite(out, total, int(alignment.image_index[i]), regions[i], warped[i], image_mask)
    return out.clamp_(0, 1), total


def _composite(out, total, b, region_box, piece, image_mask) -> None:
    """Blend one warped face (premultiplied colour 3, coverage 1, mask 1 channels) into out[b] and its weight
    into total[b], in place."""
    x0, y0, x1, y1 = (int(v) for v in region_box)
    piece = piece[:, : y1 - y0, : x1 - x0]
    # Zero padding darkens colours only beyond the crop edge, where the mask is already 0.
    # In place on the piece (a scratch tensor), as few passes as possible.
    den = piece[3:4]
    a = piece[4:5].clamp_(0, 1).mul_(den > 1e-3)
    colour = piece[:3].div_(den.clamp(min=1e-3)).clamp_(0, 1)  # clamp: bicubic overshoot
    if image_mask is not None:
        a.mul_(image_mask[b if image_mask.shape[0] > 1 else 0, y0:y1, x0:x1].to(a)[None])
    region = out[b, :, y0:y1, x0:x1]
    region.add_(colour.sub_(region).mul_(a))  # region + a * (colour - region)
    t = total[b, :, y0:y1, x0:x1]
    t.add_(t.neg().add_(1).mul_(a))  # t + a * (1 - t)


def _paste_cpu(out, total, crops, alignment, o2c, regions, level, ss, leaves, feather_m, fm, image_mask,
               interpolation) -> None:
    """The paste loop for CPU float32 images with OpenCV warps (cpu_warp.py), one face at a time: each face costs
    its own crop and region, never the whole image. Same channels, pooling levels, supersampling and compositing
    as the grouped grid_sample path."""
    size, s_h = alignment.crop_size, crops.shape[-1]
    pooled_feather: dict[int, torch.Tensor] = {}
    for i in range(len(alignment)):
        x0, y0, x1, y1 = (int(v) for v in regions[i])
        rw, rh = x1 - x0, y1 - y0
        if rw <= 0 or rh <= 0:
            continue
        lv, sf = level[i], ss[i]
        pool = (lambda x: cpu_warp.area_pool(x, 2 ** lv)) if lv else (lambda x: x)
        if fm is not None:
            mask = feather_m[0] * fm[i]
        else:
            mask = feather_m[0]
        if bool(leaves[i]):
            # Colour premultiplied by validity (see the grid_sample path), then pooled and warped together
            # (NumPy, as _composite_numpy).
            valid = _crop_validity_numpy(alignment, i, s_h)
            src = np.empty((5, s_h, s_h), dtype=np.float32)
            np.multiply(crops[i].numpy(), valid, out=src[:3])
            src[3], src[4] = valid, mask.numpy()
            src = pool(torch.from_numpy(src))
        else:
            src = None
            colour = pool(crops[i])
            if fm is None:
                if lv not in pooled_feather:
                    pooled_feather[lv] = pool(mask).contiguous()
                mask = pooled_feather[lv]
            else:
                mask = pool(mask)
        side = (src if src is not None else colour).shape[-1]
        # Output pixel (region offset) -> crop pixel at alignment size -> pixel of the pooled crop (the
        # normalised coordinates of grid_sample: x' = (x + 0.5) * side / size - 0.5).
        k = side / size
        to_side = torch.tensor([[k, 0, 0.5 * k - 0.5], [0, k, 0.5 * k - 0.5], [0, 0, 1]], dtype=torch.float64)
        shift = torch.tensor([[1, 0, x0], [0, 1, y0], [0, 0, 1]], dtype=torch.float64)
        a = o2c[i].double()
        m = (to_side @ torch.cat([a, torch.tensor([[0, 0, 1]], dtype=torch.float64)]) @ shift)[:2].numpy()
        mode = interpolation if sf == 1 and lv == 0 else "bilinear"
        piece = torch.empty((5, rh, rw), dtype=torch.float32)
        if src is not None:
            cpu_warp.warp_planes(src, m, rw, rh, ss=sf, interpolation=mode, out=piece)
        else:
            _, cov = cpu_warp.warp_with_coverage(colour, m, rw, rh, ss=sf, interpolation=mode, out=piece[:3])
            np.copyto(piece[3].numpy(), cov)
            cpu_warp.warp_planes(mask, m, rw, rh, ss=sf, interpolation=mode, out=piece[4:5])
        _composite_numpy(out, total, int(alignment.image_index[i]), regions[i], piece, image_mask)


def _composite_numpy(out, total, b, region_box, piece, image_mask) -> None:
    """_composite's arithmetic, operation for operation (the same float32 roundings), in NumPy on views of the CPU
    tensors: single-threaded per face, so a busy machine does not stall it in OpenMP barriers (measured 10x on a
    2-core machine under load)."""
    x0, y0, x1, y1 = (int(v) for v in region_box)
    p = piece[:, : y1 - y0, : x1 - x0].numpy()
    den, a, colour = p[3:4], p[4:5], p[:3]
    inside = den > 1e-3
    np.clip(a, 0, 1, out=a)
    a *= inside
    colour /= np.maximum(den, np.float32(1e-3))
    np.clip(colour, 0, 1, out=colour)
    if image_mask is not None:
        a *= image_mask[b if image_mask.shape[0] > 1 else 0, y0:y1, x0:x1].to(torch.float32).numpy()[None]
    region = out[b, :, y0:y1, x0:x1].numpy()
    colour -= region
    colour *= a
    region += colour
    np.clip(region, 0, 1, out=region)  # float rounding of the blend
    t = total[b, :, y0:y1, x0:x1].numpy()
    rest = np.float32(1) - t
    rest *= a
    t += rest
