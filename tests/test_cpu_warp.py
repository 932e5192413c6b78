"""CPU fast paths of align and paste (OpenCV warps on float32 tensors, pipelines/face/cpu_warp.py) against the
grid_sample path the GPU runs (taken here by float64 tensors, which cpu_warp leaves to grid_sample).

Tolerance: the grid_sample path computes sample positions in float32 (relative error ~6e-8 on coordinates up
to a few hundred pixels: ~3e-5 px), OpenCV in float64/fixed point; a position error dp moves a bilinear colour
by at most |gradient| * dp <= dp (values in [0,1], neighbouring pixels differ by at most 1), and the float32
colour sums of either path round at ~1e-7 per term: 2e-4 bounds both with room. OpenCV before 5 rounds sample
positions to 1/32 pixel for float images too: then the bound is half a step times the largest neighbour
difference (1/64, and 1 pixel of reach for bicubic taps: 0.02).
"""
import math

import pytest
import torch

from conftest import rounding_bound
from facemend.pipelines.face import cpu_warp
from facemend.pipelines.face.align import align_faces
from facemend.pipelines.face.geometry import apply_affine, face_template, warp_to_crops
from facemend.pipelines.face.paste import paste_faces
from facemend.pipelines.io.errors import InvalidImage
from facemend.pipelines.io.images import checked_view

import cv2

TOL = 2e-4 if int(cv2.__version__.split(".")[0]) >= 5 else 0.02


def _similarity(angle_deg, scale, tx, ty):
    a = math.radians(angle_deg)
    return torch.tensor([[scale * math.cos(a), -scale * math.sin(a), tx],
                         [scale * math.sin(a), scale * math.cos(a), ty]], dtype=torch.float32)


def _detailed_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h // 2, w // 2, generator=g)
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def _face_det(angle, scale, tx, ty):
    pts = apply_affine(_similarity(angle, scale, tx, ty)[None], face_template(512)[None])[0]
    return torch.cat([torch.tensor([0.0, 0, 10, 10, 0.99]), pts.reshape(10)])


# Image -> crop maps: enlarged, shrunk (supersampled), reaching past each edge, wholly outside.
AFFINES = [(20, 1.7, -120, 30), (-10, 0.3, 10, 5), (5, 0.12, -5, -3), (0, 2.0, 100, 100), (30, 0.7, -250, 0)]


@pytest.mark.parametrize("border", ["constant", "reflect", "edge"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_warps_equal_the_grid_sample_path(border, interpolation, channels_last):
    img = _detailed_image(150, 200)
    affine = torch.stack([_similarity(*p) for p in AFFINES])
    for idx in ([0, 1, 2, 3, 4], [0], [3]):  # one image's faces share a supersampling factor; alone, bicubic runs
        x = img.contiguous(memory_format=torch.channels_last) if channels_last else img
        fast = warp_to_crops(x, torch.zeros(len(idx), dtype=torch.long), affine[idx], 64, border=border,
                             interpolation=interpolation)
        ref = warp_to_crops(img.double(), torch.zeros(len(idx), dtype=torch.long), affine[idx], 64, border=border,
                            interpolation=interpolation)
        assert fast.dtype == torch.float32 and fast.shape == ref.shape
        assert (fast - ref.float()).abs().max() < TOL
        assert fast.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_cpu_warps_cover_several_images_and_native_crops():
    imgs = torch.cat([_detailed_image(120, 160, 1), _detailed_image(120, 160, 2)])
    dets = [torch.stack([_face_det(12, 0.2, 20, 10), _face_det(-8, 0.1, 100, 70)]),
            torch.stack([_face_det(0, 0.15, -10, 40)])]
    for geometry in ("ffhq", "native"):
        fast, alignment = align_faces(imgs, dets, 96, geometry=geometry)
        ref, _ = align_faces(imgs.double(), dets, 96, geometry=geometry)
        assert len(alignment) == 3 and (fast - ref.float()).abs().max() < TOL


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_cpu_paste_equals_the_grid_sample_path(interpolation):
    """Faces of all sizes (tiny ones pooled several levels, one past the image edge), a face mask, an image mask,
    crops of another size than the alignment's, a background resized after detection."""
    img = _detailed_image(200, 300, 3)
    dets = [torch.stack([_face_det(10, 0.04, 30, 20), _face_det(-25, 0.3, 150, 40), _face_det(5, 0.6, -60, 60),
                         _face_det(0, 0.08, 250, 150)])]
    crops, alignment = align_faces(img, dets, 128)
    restored = (crops * 0.6 + 0.3).clamp(0, 1)
    face_mask = torch.rand(4, 64, 64, generator=torch.Generator().manual_seed(5))
    image_mask = torch.rand(1, 200, 300, generator=torch.Generator().manual_seed(6))
    for kw in ({}, {"face_mask": face_mask}, {"image_mask": image_mask}):
        for crops_in in (restored, torch.nn.functional.interpolate(restored, size=(256, 256), mode="bilinear")):
            out, blend = paste_faces(img, crops_in, alignment, interpolation=interpolation, **kw)
            ref, ref_blend = paste_faces(img.double(), crops_in.double(), alignment, interpolation=interpolation,
                                         **{k: v.double() for k, v in kw.items()})
            assert (out - ref.float()).abs().max() < TOL and (blend - ref_blend.float()).abs().max() < TOL
            assert blend.max() > (0.99 if not kw else 0.5)  # faces were pasted
    big = torch.nn.functional.interpolate(img, scale_factor=2, mode="bilinear")
    out, _ = paste_faces(big, restored, alignment)
    ref, _ = paste_faces(big.double(), restored.double(), alignment)
    assert (out - ref.float()).abs().max() < TOL


def test_cpu_paste_of_many_small_faces_costs_their_regions_not_the_image(monkeypatch):
    """Every warp of the paste writes at most its face's region (a few pixels for a small face), so 300 small
    faces in a large photo never cost 300 x the photo."""
    img = _detailed_image(1000, 1500, 4)
    rows = [_face_det(0, 0.03, 20 + 45 * (k % 30), 20 + 60 * (k // 30)) for k in range(300)]
    crops, alignment = align_faces(img, [torch.stack(rows)], 64)
    written = []
    original = cpu_warp.warp_planes

    def spy(src, m, out_w, out_h, **kw):
        written.append(out_w * out_h)
        return original(src, m, out_w, out_h, **kw)

    monkeypatch.setattr(cpu_warp, "warp_planes", spy)
    out, blend = paste_faces(img, crops, alignment)
    # Three warps a face (colour, coverage, mask), each of its region (a face spans ~16 px), never of the photo.
    assert 300 <= len(written) <= 3 * 300 and max(written) <= 25 * 25
    monkeypatch.undo()
    ref, _ = paste_faces(img.double(), crops.double(), alignment)
    assert blend.max() > 0.99 and (out - ref.float()).abs().max() < TOL


def test_checked_view_reads_once_and_copies_only_when_needed():
    x = torch.rand(2, 3, 8, 8)
    assert checked_view(x) is x  # valid: no copy (paste and align only read it)
    over = x * 1.5
    assert checked_view(over).max() == 1 and over.max() > 1  # clamped into a new tensor, the input untouched
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 2, 3, 4] = bad
        # planar, channels-last (reduced over its memory as a flat view) and a strided slice (neither)
        for z in (y, y.contiguous(memory_format=torch.channels_last), torch.cat([y, y], 3)[..., ::2]):
            with pytest.raises(InvalidImage, match=r"batch items \[1\]"):
                checked_view(z, "crops")
    cl = (x * 1.5).contiguous(memory_format=torch.channels_last)
    assert checked_view(cl).max() == 1 and checked_view(cl.contiguous()).max() == 1


def test_large_outputs_in_huge_pages_behave_as_tensors():
    import gc

    t = cpu_warp.empty((3, 3, 1024, 1024), channels_last=True)  # 36 MiB: the huge-page allocation
    assert t.shape == (3, 3, 1024, 1024) and t.is_contiguous(memory_format=torch.channels_last)
    t.fill_(0.25)
    view = t[1, 2]
    del t
    gc.collect()
    assert float(view.sum()) == 0.25 * 1024 * 1024  # the memory lives as long as a view of it
    small = cpu_warp.empty((2, 3))
    assert small.shape == (2, 3) and small.dtype == torch.float32


def test_numpy_crop_validity_equals_the_torch_one():
    """The CPU paste's validity plane (NumPy: no OpenMP region) is the grid_sample path's, bit for bit, for crops
    of another size than the alignment's and faces of two images of different sizes."""
    from facemend.pipelines.face import paste

    imgs = [_detailed_image(120, 160, 1), _detailed_image(90, 200, 2)]
    dets = [torch.stack([_face_det(12, 0.4, -20, 10), _face_det(-8, 0.3, 100, 70)]),
            torch.stack([_face_det(30, 0.5, 150, -30)])]
    _, a0 = align_faces(imgs[0], dets[:1], 96)
    _, a1 = align_faces(imgs[1], dets[1:], 96)
    for alignment in (a0, a1):
        for size in (96, 64, 160):
            ref = paste._crop_validity(alignment, size, "cpu")
            for i in range(len(alignment)):
                got = torch.from_numpy(paste._crop_validity_numpy(alignment, i, size))
                assert torch.equal(got, ref[i, 0])
                assert 0 < float(got.mean()) < 1  # every one of these faces reaches past its image's edge


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_partial_box_holds_every_pixel_with_coverage_below_one(interpolation):
    """Outside cpu_warp.partial_box every tap of every sample is inside the source (coverage exactly 1 for
    bilinear, 1 up to the weights' rounding for bicubic, so the edge renormalisation may skip it), and the box is tight: within the pixels that do have coverage below 1,
    grown by its stated margins (a pixel's footprint, the taps' reach, one pixel each side)."""
    w, h = 200, 150
    for angle, scale, tx, ty in AFFINES + [(3, 1.1, -20, 40), (-40, 0.5, 60, -30), (80, 0.9, 0, 0)]:
        inv = torch.linalg.inv(torch.cat([_similarity(angle, scale, tx, ty).double(),
                                          torch.tensor([[0.0, 0, 1]], dtype=torch.float64)]))[:2].numpy()
        for ss in (1, 2, 3):
            x0, y0, x1, y1 = cpu_warp.partial_box(inv, 64, 64, w, h, ss=ss, interpolation=interpolation)
            cov = cpu_warp.coverage(inv, 64, 64, w, h, ss=ss, interpolation=interpolation)[0]
            outside = torch.ones_like(cov, dtype=torch.bool)
            outside[y0:y1, x0:x1] = False
            # Bicubic weights sum to 1 only up to their rounding (16 taps, ss*ss samples averaged).
            slack = 0.0 if interpolation == "bilinear" else rounding_bound(16 * ss * ss)
            assert ((cov[outside] - 1).abs() <= slack).all()
            ys, xs = (cov < 1 - slack).nonzero(as_tuple=True)
            if xs.numel():
                grow = 3 + 2 * scale  # output pixels: rounding and safety (3), bicubic reach of one source pixel
                assert x0 >= xs.min() - grow and y0 >= ys.min() - grow
                assert x1 <= xs.max() + 1 + grow and y1 <= ys.max() + 1 + grow


def test_warp_with_coverage_equals_the_warp_and_its_coverage():
    """The bilinear RGB fast path (RGBA warp, alpha = coverage) gives warp_planes' colours and coverage()'s weights,
    for faces inside, across an edge and wholly outside, with and without supersampling, into either layout."""
    img = _detailed_image(150, 200).contiguous(memory_format=torch.channels_last)[0]
    for p in AFFINES:
        inv = torch.linalg.inv(torch.cat([_similarity(*p).double(),
                                          torch.tensor([[0.0, 0, 1]], dtype=torch.float64)]))[:2].numpy()
        for ss in (1, 2):
            want = cpu_warp.warp_planes(img.contiguous(), inv, 64, 64, ss=ss)  # planar: the per-plane path
            want_cov = cpu_warp.coverage(inv, 64, 64, 200, 150, ss=ss)[0]
            for out in (torch.empty(3, 64, 64), torch.empty(64, 64, 3).permute(2, 0, 1)):
                got, cov = cpu_warp.warp_with_coverage(img, inv, 64, 64, ss=ss, out=out)
                assert got is out
                # INTER_AREA sums 4 channels in another order than 1: a rounding of the ss*ss-term mean apart
                assert (got - want).abs().max() <= rounding_bound(2 * ss * ss)
                assert (torch.from_numpy(cov) - want_cov).abs().max() <= rounding_bound(2 * ss * ss)
