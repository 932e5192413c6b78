"""Paste-back: inverse-warp (restored) face crops into their source images with a feathered mask.

All faces are warped by a few batched grid_sample calls (faces grouped by supersampling factor and
padded to a common region size), each only over its own bounding region of the image, then
composited in order. The blend mask is built in crop space, so it follows the face's rotation and
fades to zero well inside the crop: no box edge can show.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .align import FaceAlignment
from .errors import InvalidImage
from .face_geometry import affine_scale, feather_mask, invert_affine, supersample_factor
from .image_io import check_images

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
                image_mask: torch.Tensor | None = None, antialias: bool = True):
    """Put N crops back into B images.

    images [B,3,H,W] (may be a resized version of the detected images); crops [N,3,s,s] (any s: a
    restorer or upscaler may have changed the crop resolution); face_mask: optional [N,h,w] mask in
    crop space (e.g. a face parsing mask), multiplied into the feather mask; image_mask: optional
    [B or 1,H,W] limiting where faces may be pasted. Returns (images [B,3,H,W], blend mask [B,1,H,W]).
    """
    images = check_images(images, "paste-back image")
    _check_inputs(images, crops, alignment, face_mask, image_mask)
    out = images.clone()
    total = images.new_zeros((images.shape[0], 1) + tuple(images.shape[-2:]))
    n = len(alignment)
    if n == 0:
        return out, total
    crops = check_images(crops, "paste-back face crops").to(images.device, images.dtype)
    dev, hw, size = images.device, tuple(images.shape[-2:]), alignment.crop_size
    s_h, s_w = crops.shape[-2:]
    if s_h != s_w:
        raise InvalidImage(f"face crops must be square, got {s_h}x{s_w}")
    mask = feather_mask(s_h, margin, feather, device=dev).expand(n, 1, s_h, s_w)
    if face_mask is not None:
        fm = face_mask.to(dev, images.dtype).reshape(n, 1, *face_mask.shape[-2:])
        if fm.shape[-1] != s_h or fm.shape[-2] != s_h:
            fm = F.interpolate(fm, size=(s_h, s_h), mode="bilinear", align_corners=False)
        mask = mask * fm.clamp(0, 1)
    valid = _crop_validity(alignment, s_h, dev).to(images.dtype)
    # Colour premultiplied by validity and renormalised after warping: crop pixels that lay outside the
    # source image (border fill) never leak into the photo, even where a face touches the image edge.
    src = torch.cat([crops * valid, valid, mask], 1)

    o2c = _output_to_crop_affines(alignment, hw)
    regions = _regions(o2c, size, hw)
    ss_all = [supersample_factor(1.0 / float(s)) if antialias else 1 for s in affine_scale(o2c.float())]
    warped: dict[int, torch.Tensor] = {}
    for ss in sorted(set(ss_all)):
        faces = [i for i in range(n) if ss_all[i] == ss and bool((regions[i, 2:] > regions[i, :2]).all())]
        start = 0
        while start < len(faces):
            rh = int((regions[faces[start], 3] - regions[faces[start], 1]))
            rw = int((regions[faces[start], 2] - regions[faces[start], 0]))
            stop = start + 1
            while stop < len(faces):  # grow the chunk while the padded grid stays within budget
                nh = max(rh, int(regions[faces[stop], 3] - regions[faces[stop], 1]))
                nw = max(rw, int(regions[faces[stop], 2] - regions[faces[stop], 0]))
                if (stop - start + 1) * nh * nw * ss * ss * 4 > _CHUNK_ELEMENTS:
                    break
                rh, rw, stop = nh, nw, stop + 1
            group = faces[start:stop]
            g = torch.tensor(group)
            m = o2c[g].float().to(dev)
            off = regions[g, :2].float().to(dev)
            ys = (torch.arange(rh * ss, device=dev, dtype=torch.float32) + 0.5) / ss - 0.5
            xs = (torch.arange(rw * ss, device=dev, dtype=torch.float32) + 0.5) / ss - 0.5
            x = xs[None, None, :] + off[:, 0, None, None]
            y = ys[None, :, None] + off[:, 1, None, None]
            u = m[:, 0, 0, None, None] * x + m[:, 0, 1, None, None] * y + m[:, 0, 2, None, None]
            v = m[:, 1, 0, None, None] * x + m[:, 1, 1, None, None] * y + m[:, 1, 2, None, None]
            grid = torch.stack([(2 * u + 1) / size - 1, (2 * v + 1) / size - 1], -1).to(src.dtype)
            res = F.grid_sample(src[g.to(dev)], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            if ss > 1:
                res = F.avg_pool2d(res, ss)
            for k, i in enumerate(group):
                warped[i] = res[k]
            start = stop

    for i in range(n):  # composite in face order (largest first within an image)
        if i not in warped:
            continue
        b = int(alignment.image_index[i])
        x0, y0, x1, y1 = (int(v) for v in regions[i])
        piece = warped[i][:, : y1 - y0, : x1 - x0]
        # Zero padding darkens colours only beyond the crop edge, where the mask is already 0.
        den = piece[3:4]
        a = torch.where(den > 1e-3, piece[4:5].clamp(0, 1), torch.zeros_like(den))
        colour = piece[:3] / den.clamp(min=1e-3)
        if image_mask is not None:
            a = a * image_mask[b if image_mask.shape[0] > 1 else 0, y0:y1, x0:x1].to(a)[None]
        region = out[b, :, y0:y1, x0:x1]
        out[b, :, y0:y1, x0:x1] = region + a * (colour - region)
        t = total[b, :, y0:y1, x0:x1]
        total[b, :, y0:y1, x0:x1] = t + a * (1 - t)
    return out.clamp(0, 1), total
