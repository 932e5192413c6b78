"""Alignment geometry: similarity fit, warps (against OpenCV's warpAffine), round trips, borders."""
import math

import numpy as np
import pytest
import torch

from facemend.pipelines.face.align import align_faces
from facemend.pipelines.face.geometry import (apply_affine, face_template, feather_mask, fit_similarity,
                                              invert_affine, warp_to_crops)
from facemend.pipelines.face.paste import paste_faces

from conftest import load_image, need_shared, rounding_bound

# A warp's sample position comes from about 6 float operations on coordinates as large as the image side, so
# it is off by up to 6*u*side pixels; a value moves by at most that times its gradient (< 1 per pixel here).


def position_tol(side: int) -> float:
    return rounding_bound(6, side, evaluations=1)



def _similarity(angle_deg, scale, tx, ty):
    a = math.radians(angle_deg)
    return torch.tensor([[scale * math.cos(a), -scale * math.sin(a), tx],
                         [scale * math.sin(a), scale * math.cos(a), ty]], dtype=torch.float32)


def _smooth_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h // 8 + 1, w // 8 + 1, generator=g)
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def test_fit_similarity_recovers_known_transform_batched():
    tmpl = face_template(512)
    truth = torch.stack([_similarity(17, 0.4, 100, 50), _similarity(-40, 2.5, -30, 700), _similarity(0, 1, 0, 0)])
    src = apply_affine(invert_affine(truth), tmpl[None].expand(3, -1, -1))
    fitted = fit_similarity(src, tmpl)
    assert torch.allclose(fitted, truth, atol=1e-3)
    assert torch.allclose(apply_affine(fitted, src), tmpl[None].expand(3, -1, -1), atol=1e-3)


def test_template_scales_with_crop_size():
    assert torch.allclose(face_template(256), face_template(512) / 2)


def test_warp_matches_opencv_warpaffine():
    cv2 = pytest.importorskip("cv2")
    img = _smooth_image(300, 400)
    m = _similarity(23, 1.7, -120, 30)  # upscaling: no antialiasing involved
    ours = warp_to_crops(img, torch.tensor([0]), m[None], 256, border="constant", border_value=(0.2, 0.4, 0.6))
    arr = img[0].permute(1, 2, 0).numpy()
    ref = cv2.warpAffine(arr, m.numpy().astype(np.float64), (256, 256), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=(0.2, 0.4, 0.6))
    cover = cv2.warpAffine(np.ones((300, 400), np.float32), m.numpy().astype(np.float64), (256, 256),
                           flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # Where a crop pixel straddles the image edge we renormalise instead of mixing in the border colour.
    full = (cover > 0.999) | (cover < 0.001)
    diff = np.abs(ours[0].permute(1, 2, 0).numpy() - ref)[full]
    # OpenCV quantises sample positions to 1/32 pixel; the images agree up to that.
    assert full.mean() > 0.9 and (cover < 0.001).mean() > 0.05
    assert diff.mean() < 2e-3 and diff.max() < 0.03


def test_identity_warp_is_exact_and_faces_of_one_image_share_a_call():
    img = _smooth_image(64, 96)
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    shifted = torch.tensor([[1.0, 0, -10], [0, 1.0, -5]])
    crops = warp_to_crops(img, torch.tensor([0, 0]), torch.stack([eye, shifted]), 48)
    assert torch.allclose(crops[0], img[0, :, :48, :48], rtol=0, atol=position_tol(96))
    assert torch.allclose(crops[1], img[0, :, 5:53, 10:58], rtol=0, atol=position_tol(96))


def test_downscaling_warp_is_antialiased():
    # A fine checkerboard shrunk 4x must turn mid-gray, not into aliasing patterns.
    yy, xx = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    board = ((yy + xx) % 2).float().expand(1, 3, -1, -1).contiguous()
    m = _similarity(10, 0.25, 20, 10)
    crop = warp_to_crops(board, torch.tensor([0]), m[None], 100, border="edge")
    inner = crop[0, :, 30:70, 30:70]
    assert (inner - 0.5).abs().max() < 0.08
    aliased = warp_to_crops(board, torch.tensor([0]), m[None], 100, border="edge", antialias=False)
    assert (aliased[0, :, 30:70, 30:70] - 0.5).abs().max() > 0.3


@pytest.mark.parametrize("border", ["constant", "reflect", "edge"])
def test_borders_fill_outside_the_image(border):
    img = torch.full((1, 3, 32, 32), 0.9)
    crop = warp_to_crops(img, torch.tensor([0]), torch.tensor([[[1.0, 0, 40], [0, 1.0, 0]]]), 64, border=border)
    left, right = crop[0, :, 10:20, 5:30], crop[0, :, 10:20, 45:60]
    # Blends of equal values: a*v + (1 - a)*v, 3 operations.
    tol = rounding_bound(3, evaluations=1)
    assert torch.allclose(right, torch.full_like(right, 0.9), rtol=0, atol=tol)
    if border == "constant":
        assert torch.allclose(left[0], torch.full_like(left[0], 132 / 255), rtol=0, atol=tol)
    else:
        assert torch.allclose(left, torch.full_like(left, 0.9), rtol=0, atol=tol)


def test_synthetic_face_is_recovered_by_alignment():
    """Put an aligned face into a larger canvas with a known similarity; aligning with the moved template
    points must give the face back."""
    face = _smooth_image(512, 512, seed=3)
    to_canvas = _similarity(25, 1.3, 300, 100)
    canvas = warp_to_crops(face, torch.tensor([0]), to_canvas[None], 1024, border="edge")
    pts = apply_affine(to_canvas[None], face_template(512)[None])
    det = torch.cat([torch.tensor([[0.0, 0, 10, 10, 0.99]]), pts.reshape(1, 10)], 1)
    crops, alignment = align_faces(canvas, [det], 512)
    assert torch.allclose(alignment.affine[0], invert_affine(to_canvas[None])[0], atol=1e-3)
    inner = feather_mask(512, 0.05, 0.01) > 0.99
    assert (crops - face).abs()[:, :, inner].mean() < 6e-3  # two bilinear resamplings


def test_paste_of_untouched_crops_reproduces_synthetic_image():
    img = _smooth_image(400, 600, seed=5)
    tmpl = face_template(512)
    dets = []
    for angle, scale, tx, ty in [(10, 0.3, 80, 60), (-30, 0.5, 300, 120), (0, 1.2, 450, 300)]:
        pts = apply_affine(_similarity(angle, scale, tx, ty)[None], tmpl[None])[0]  # crop -> image
        dets.append(torch.cat([torch.tensor([0.0, 0, 10, 10, 0.99]), pts.reshape(10)]))
    crops, alignment = align_faces(img, [torch.stack(dets)], 512)
    out, blend = paste_faces(img, crops, alignment)
    assert blend.max() > 0.99
    assert (out - img).abs().mean() < 1.5e-3
    assert (out - img).abs().max() < 0.04  # resampling blur only; border fill would show as ~0.2


def _max_jump(x):
    """Largest difference between neighbouring pixels."""
    return max(float((x[..., :, 1:] - x[..., :, :-1]).abs().max()), float((x[..., 1:, :] - x[..., :-1, :]).abs().max()))


def test_paste_has_no_seam_on_real_photo_with_modified_faces():
    """Faces replaced by visibly different crops and pasted back. The output is
    original + blend * (pasted - original), so a seam is a jump in the blend mask: a box or hard mask edge
    jumps from 0 to 1 between neighbouring pixels; the feathered mask must rise by little per pixel, and
    nowhere but inside the faces' crops."""
    from facemend.pipelines.face.align import detect_and_align
    from facemend.pipelines.face.retinaface import RetinaFaceDetector

    path = need_shared("faces", "clean", "t1_six_faces.jpg")
    weights = need_shared("models", "facedetection", "retinaface_mobilenet0.25_1mb.pth")
    img = load_image(path)
    det = RetinaFaceDetector.from_file(str(weights))
    crops, alignment, _ = detect_and_align(img, det, score_threshold=0.8)
    assert len(alignment) == 6
    modified = (crops * 0.7 + 0.15).clamp(0, 1)
    out, blend = paste_faces(img, modified, alignment)
    same, _ = paste_faces(img, crops, alignment)
    changed = (out - same).abs().amax(1) > 0.02
    assert changed.float().mean() > 0.01  # the faces really were replaced
    assert _max_jump(blend) < 0.1
    # Where the blend mask is 0 the photo is untouched, bit for bit.
    assert torch.equal(out[:, :, blend[0, 0] == 0], img[:, :, blend[0, 0] == 0])
    # The same crops pasted with a hard (unfeathered) mask do show the step: the check can fail.
    _, hard = paste_faces(img, modified, alignment, margin=0.0, feather=1e-6)
    assert _max_jump(hard) > 0.5


def _face_det(angle, scale, tx, ty):
    """A detection row [15] whose landmarks are the 512 template moved by a known similarity."""
    pts = apply_affine(_similarity(angle, scale, tx, ty)[None], face_template(512)[None])[0]
    return torch.cat([torch.tensor([0.0, 0, 10, 10, 0.99]), pts.reshape(10)])


def test_native_crops_are_exact_pixel_copies_sized_for_the_largest_face():
    from facemend.pipelines.face.align import native_crop_size

    img = torch.rand(1, 3, 300, 400, generator=torch.Generator().manual_seed(1))
    dets = [torch.stack([_face_det(12, 0.2, 80, 60), _face_det(-5, 0.35, 200, 80)])]
    size = native_crop_size(dets)
    assert size == 184  # 0.35 * 512 = 179.2 image pixels, rounded up to a multiple of 8
    crops, alignment = align_faces(img, dets, size, geometry="native")
    for k in range(2):
        a = alignment.affine[k]
        assert torch.equal(a[:, :2], torch.eye(2)) and torch.equal(a[:, 2], a[:, 2].round())
        x0, y0 = int(-a[0, 2]), int(-a[1, 2])
        assert 0 <= x0 and x0 + size <= 400 and 0 <= y0 and y0 + size <= 300
        assert torch.equal(crops[k], img[0, :, y0:y0 + size, x0:x0 + size])
        # Centred where the FFHQ crop of that face is centred.
        ffhq = align_faces(img, [dets[0][k:k + 1]], size)[1]
        centre = apply_affine(ffhq.inverse, torch.full((1, 1, 2), (size - 1) / 2))[0, 0]
        assert (centre - torch.tensor([x0 + (size - 1) / 2, y0 + (size - 1) / 2])).abs().max() <= 0.5


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_native_crops_upscaled_paste_onto_the_upscaled_photo_without_resampling(interpolation):
    """Crops enlarged x2 paste onto the x2 photo on its own pixel grid: bicubic-enlarged crops pasted onto
    the bicubic-enlarged photo change it by rounding only (an FFHQ crop would resample twice)."""
    img = _smooth_image(160, 200, seed=2) * 0.5 + 0.5 * torch.rand(1, 3, 160, 200, generator=torch.Generator().manual_seed(3))
    dets = [torch.stack([_face_det(8, 0.15, 40, 30), _face_det(0, 0.12, 120, 50)])]
    crops, alignment = align_faces(img, dets, 80, geometry="native")
    up = lambda x: torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
    big = up(img).clamp(0, 1)
    out, blend = paste_faces(big, up(crops).clamp(0, 1), alignment, interpolation=interpolation)
    assert blend.max() > 0.99
    inner = blend[0, 0] > 0.99
    # On the exact grid both modes sample at pixel centres; only the bicubic edge effects of the enlarged
    # crops (outside the blend's full-weight area) differ.
    assert (out - big)[..., inner].abs().max() <= position_tol(big.shape[-1])


def test_bicubic_warps_lose_less_detail_on_enlarged_faces():
    """Align -> paste of untouched crops on a detailed photo where the face is enlarged into the crop:
    bicubic sampling keeps closer to the original than bilinear (facexlib's)."""
    img = torch.rand(1, 3, 200, 200, generator=torch.Generator().manual_seed(4))
    img = torch.nn.functional.avg_pool2d(img, 3, 1, 1)  # some detail, not pure noise
    dets = [torch.stack([_face_det(7, 0.3, 30, 20)])]
    errors = {}
    for mode in ("bilinear", "bicubic"):
        crops, alignment = align_faces(img, dets, 256, interpolation=mode)
        out, blend = paste_faces(img, crops, alignment, interpolation=mode)
        inner = blend[0, 0] > 0.99
        errors[mode] = float((out - img)[..., inner].abs().mean())
    assert errors["bicubic"] < 0.8 * errors["bilinear"], errors


def test_geometry_and_interpolation_names_are_checked():
    img = torch.rand(1, 3, 64, 64)
    dets = [torch.stack([_face_det(0, 0.1, 10, 10)])]
    with pytest.raises(ValueError, match="geometry"):
        align_faces(img, dets, 64, geometry="upright")
    with pytest.raises(ValueError, match="interpolation"):
        align_faces(img, dets, 64, interpolation="lanczos")
