"""Embedded MTCNN detector (pipelines/face/mtcnn.py): weights from the `mtcnn` PyPI package (never imported:
it imports TensorFlow), exact layout conversion, TensorFlow-exact resize/crop operators, the package's NMS,
real detections on shared photos, recorded outputs of the original package, batching and bad input.

Equivalence with the live original (TensorFlow) is benchmarks/compare_mtcnn_reference.py; the values in
REFERENCE_T1 were produced by it (mtcnn 1.0.0, tensorflow-cpu 2.21, `detect_faces(img, box_format="xyxy",
output_type="numpy")`, default thresholds) so that this suite checks them without TensorFlow.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from conftest import load_image, need_shared, reorder_tol, rounding_bound

from facemend.pipelines.face import mtcnn as M, mtcnn_nets as MN
from facemend.pipelines.face.mtcnn import MTCNNDetector
from facemend.pipelines.face.detection import box_iou
from facemend.pipelines.io.errors import InvalidImage, ModelFileInvalid, ModelFileNotFound

SIX_FACES = ("faces", "clean", "t1_six_faces.jpg")

# REFERENCE_T1 (end of file): the original package on t1_six_faces.jpg (threshold_onet 0.8): x1, y1, x2, y2,
# score, then landmarks (x, y) left eye, right eye, nose, mouth left, mouth right; rounded to 1e-3 px.


def _need_mtcnn():
    if importlib.util.find_spec("mtcnn") is None:
        pytest.skip("needs the PyPI package 'mtcnn' (its weight files; it is not imported)")


@pytest.fixture(scope="module")
def det() -> MTCNNDetector:
    _need_mtcnn()
    return MTCNNDetector.load()


@pytest.fixture(scope="module")
def six_faces_image() -> torch.Tensor:
    return load_image(need_shared(*SIX_FACES))


@pytest.fixture(scope="module")
def six_faces_dets(det, six_faces_image) -> torch.Tensor:
    """At the package's default O-Net threshold 0.8 (for the recorded reference)."""
    return det.detect(six_faces_image, score_threshold=0.8)[0]


@pytest.fixture(scope="module")
def six_faces_default(det, six_faces_image) -> torch.Tensor:
    return det.detect(six_faces_image)[0]  # default score_threshold 0.9


@pytest.fixture(scope="module")
def six_faces_small(six_faces_image) -> torch.Tensor:
    """t1 at 640x443 (still six clear faces): for the tests that run several detections."""
    return torch.nn.functional.interpolate(six_faces_image, size=(443, 640), mode="bilinear", antialias=True,
                                           align_corners=False)


# ----------------------------------------------------------------------------------------------------------
# weights: location, layout, errors

def test_weight_files_found_without_importing_the_package():
    _need_mtcnn()
    files = M.mtcnn_weight_files()
    assert sorted(files) == ["onet", "pnet", "rnet"]
    assert all(p.is_file() and p.suffix == ".lz4" for p in files.values())
    import sys
    assert "mtcnn" not in sys.modules and "tensorflow" not in sys.modules


def _fake_spec(monkeypatch, root):
    real = importlib.util.find_spec

    class Spec:
        submodule_search_locations = [str(root)]

    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: Spec() if name == "mtcnn" else real(name, *a, **k))


def test_missing_package_names_pip_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "mtcnn" else real(name, *a, **k))
    with pytest.raises(ModelFileNotFound, match="pip install mtcnn"):
        MTCNNDetector.load()


def test_missing_weight_file_is_model_file_not_found(monkeypatch, tmp_path):
    (tmp_path / "assets" / "weights").mkdir(parents=True)
    _fake_spec(monkeypatch, tmp_path)
    with pytest.raises(ModelFileNotFound, match=r"pnet\.lz4.*pip install"):
        MTCNNDetector.load()


def test_corrupt_or_wrong_weight_file_is_model_file_invalid(monkeypatch, tmp_path):
    joblib = pytest.importorskip("joblib")
    wdir = tmp_path / "assets" / "weights"
    wdir.mkdir(parents=True)
    for name in ("pnet", "rnet", "onet"):
        (wdir / f"{name}.lz4").write_bytes(b"not a joblib file at all")
    _fake_spec(monkeypatch, tmp_path)
    with pytest.raises(ModelFileInvalid, match="pnet.lz4"):
        MTCNNDetector.load()
    joblib.dump([np.zeros((3, 3), np.float32)], wdir / "pnet.lz4")  # readable, wrong layout
    with pytest.raises(ModelFileInvalid, match="PNET layout"):
        MTCNNDetector.load()


def test_missing_lz4_is_model_file_not_found(monkeypatch):
    _need_mtcnn()
    joblib = pytest.importorskip("joblib")
    real = importlib.util.find_spec

    def no_lz4(path):
        raise ValueError("LZ4 is not installed. Install it with pip: https://python-lz4.readthedocs.io/")

    monkeypatch.setattr(joblib, "load", no_lz4)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "lz4" else real(name, *a, **k))
    with pytest.raises(ModelFileNotFound, match="lz4.*pip install mtcnn"):
        MTCNNDetector.load()


def _keras_conv_valid(x_nhwc: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    kh, kw = kernel.shape[:2]
    n, h, w, _ = x_nhwc.shape
    out = np.zeros((n, h - kh + 1, w - kw + 1, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,cd->nhwd", x_nhwc[:, i:i + out.shape[1], j:j + out.shape[2]], kernel[i, j])
    return out + bias


def test_layout_conversion_matches_keras_semantics(det):
    """Conv kernels [kh,kw,in,out] and the Permute((2,1,3)) + Flatten before R-/O-Net's dense layers, checked
    against a direct numpy implementation of the Keras layers with the raw weight arrays."""
    w = M.load_mtcnn_weights()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 9, 3)).astype(np.float32)
    ref = _keras_conv_valid(x.astype(np.float64), w["pnet"][0], w["pnet"][1])
    ours = det.pnet.conv1(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    # float32 sums of 27 products + bias against float64: at most 28*u times the sum of the terms' sizes.
    size = _keras_conv_valid(np.abs(x.astype(np.float64)), np.abs(w["pnet"][0]), np.abs(w["pnet"][1]))
    assert (np.abs(ours - ref) <= rounding_bound(28, evaluations=1) * size).all()
    # R-Net: conv3 output [N,3,3,64] (NHWC) -> Permute((2,1,3)) -> Flatten -> Dense(fc4)
    feat = rng.standard_normal((4, 3, 3, 64)).astype(np.float32)
    flat = feat.transpose(0, 2, 1, 3).reshape(4, -1).astype(np.float64)
    ref = flat @ w["rnet"][9] + w["rnet"][10]
    ours = det.rnet.fc4(MN._keras_flatten(torch.from_numpy(feat).permute(0, 3, 1, 2))).detach().numpy()
    size = np.abs(flat) @ np.abs(w["rnet"][9]) + np.abs(w["rnet"][10])  # 576 products and the bias
    assert (np.abs(ours - ref) <= rounding_bound(577, evaluations=1) * size).all()
    # PReLU alphas per channel, shared over H and W
    assert torch.equal(det.pnet.prelu1.weight.cpu(), torch.from_numpy(w["pnet"][2].reshape(-1)))


# ----------------------------------------------------------------------------------------------------------
# TensorFlow operators, against direct implementations of their definitions

def _tf_resize_area_reference(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """tf.image.resize(method=AREA) for [H,W] by its definition (float32 positions, clamped border taps)."""
    def axis(n_in, n_out):
        s = np.float32(n_in) / np.float32(n_out)
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            a, b = np.float32(i) * s, np.float32(i + 1) * s
            for j in range(int(np.floor(a)), int(np.ceil(b))):
                m[i, min(j, n_in - 1)] += max(0.0, min(j + 1, b) - max(j, a))
        return m / s
    return axis(x.shape[0], oh) @ x @ axis(x.shape[1], ow).T


@pytest.mark.parametrize("size", [(5, 7), (12, 12), (17, 3), (40, 50), (60, 31)])
def test_area_resize_matches_tf_definition(size):
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (23, 31))
    ref = _tf_resize_area_reference(x, *size)
    t = torch.from_numpy(x).float()[None, None]
    # float32 input (one rounding) and an area average of at most ceil(23/5)+1 x ceil(31/3)+1 cells (values <= 1).
    cells = (23 // size[0] + 2) * (31 // size[1] + 2)
    np.testing.assert_allclose(M.area_resize(t, size)[0, 0].numpy(), ref, rtol=0,
                               atol=rounding_bound(2 * cells + 2, evaluations=1))


def _tf_crop_and_resize_reference(img: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """tf.image.crop_and_resize for one [C,H,W] image and one pixel box x1,y1,x2,y2 (extrapolation 0)."""
    c, h, w = img.shape
    y1, x1, y2, x2 = np.float32([box[1] / h, box[0] / w, box[3] / h, box[2] / w])
    out = np.zeros((c, size, size), np.float32)
    hs = (y2 - y1) * np.float32(h - 1) / np.float32(size - 1)
    ws = (x2 - x1) * np.float32(w - 1) / np.float32(size - 1)
    for i in range(size):
        iy = y1 * np.float32(h - 1) + np.float32(i) * hs
        if iy < 0 or iy > h - 1:
            continue
        t, b = int(np.floor(iy)), int(np.ceil(iy))
        for j in range(size):
            ix = x1 * np.float32(w - 1) + np.float32(j) * ws
            if ix < 0 or ix > w - 1:
                continue
            lft, r = int(np.floor(ix)), int(np.ceil(ix))
            top = img[:, t, lft] + (img[:, t, r] - img[:, t, lft]) * np.float32(ix - lft)
            bot = img[:, b, lft] + (img[:, b, r] - img[:, b, lft]) * np.float32(ix - lft)
            out[:, i, j] = top + (bot - top) * np.float32(iy - t)
    return out


def test_crop_and_resize_matches_tf_definition():
    rng = np.random.default_rng(2)
    imgs = rng.uniform(-1, 1, (2, 3, 30, 41)).astype(np.float32)
    boxes = np.array([[3.2, 4.7, 20.1, 21.6], [-5.0, -3.0, 12.0, 14.0], [30.5, 20.0, 50.0, 39.5],
                      [0.0, 0.0, 41.0, 30.0], [10.3, 2.2, 10.9, 2.8]])
    ids = np.array([0, 1, 1, 0, 1])
    ours = M._crop_and_resize(torch.from_numpy(imgs), torch.from_numpy(boxes), torch.from_numpy(ids), 24).numpy()
    for k in range(len(boxes)):
        # Both sides in float32: sample positions from ~6 operations on coordinates up to 50 px, values in [-1, 1]
        # moving by up to 2 per pixel, then the bilinear blend (7 operations).
        tol = rounding_bound(6, 50 * 2) + rounding_bound(7)
        np.testing.assert_allclose(ours[k], _tf_crop_and_resize_reference(imgs[ids[k]], boxes[k], 24), rtol=0,
                                   atol=tol)
    assert np.all(ours[1, :, 0, 0] == 0)  # outside the image: the normalised image's 0 (mid-gray)


def test_pyramid_scales_follow_the_package():
    # build_scale_pyramid(1280, 886, 20, 0.709): round(-(log(886/12)/log(0.709) + 1)) = 12 levels from 0.6
    s = M.pyramid_scales(886, 1280)
    assert len(s) == 12 and s[0] == pytest.approx(0.6) and s[1] == pytest.approx(0.6 * 0.709)
    assert M.pyramid_scales(19, 500) == [] and M.pyramid_scales(0, 0) == []


def test_nms_is_the_packages_non_greedy_variant():
    """Box B (2nd) overlaps A (1st); C (3rd) overlaps only B. Greedy NMS keeps A and C; the package drops C too
    because a higher-scored box overlaps it, even though that box was itself dropped."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep = M._grouped_nms(boxes, scores, torch.zeros(3, dtype=torch.long), 0.4, "union")
    assert keep.tolist() == [0]
    # groups are independent, order is by group then score
    keep = M._grouped_nms(boxes, scores, torch.tensor([1, 0, 1]), 0.4, "union")
    assert keep.tolist() == [1, 0, 2]
    for dense in (True, False):
        assert M._grouped_nms(boxes, scores, torch.zeros(3, dtype=torch.long), 0.4, "union", dense=dense).tolist() == [0]
    # the dense reference: the chunked path (large groups) gives the same answer as the padded path
    rng = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=rng, dtype=torch.float64) * 100
    wh = torch.rand(300, 2, generator=rng, dtype=torch.float64) * 30 + 5
    b = torch.cat([xy, xy + wh], 1)
    sc = torch.rand(300, generator=rng)
    groups = torch.randint(0, 3, (300,), generator=rng)
    for method in ("union", "min"):
        ref = M._grouped_nms(b, sc, groups, 0.5, method, dense=True)
        assert 0 < ref.numel() < 300
        old = M._NMS_BLOCK
        try:
            M._NMS_BLOCK = 1000
            assert torch.equal(M._grouped_nms(b, sc, groups, 0.5, method, dense=True), ref)
        finally:
            M._NMS_BLOCK = old
        assert torch.equal(M._grouped_nms(b, sc, groups, 0.5, method), ref)


def _random_box_set(gen: torch.Generator, trial: int, dtype: torch.dtype):
    """Boxes that stress the pruned NMS: continuous or on an integer grid (touching edges x1_j == x2_i, equal
    coordinates), duplicated boxes, zero-/negative-size boxes, a few NaN/inf coordinates, scores with exact
    ties, 1 to ~200 groups."""
    n = int(torch.randint(1, 400, (1,), generator=gen))
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([100.0, 60.0], dtype=torch.float64)
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 30 - 3          # ~10% without positive size
    if trial % 3 == 0:
        xy, wh = xy.round(), wh.round()
    if trial % 7 == 0:
        wh = wh * 4                                                             # large, heavily overlapping
    b = torch.cat([xy, xy + wh], 1)
    k = n // 8
    if k:
        b[torch.randint(0, n, (k,), generator=gen)] = b[torch.randint(0, n, (k,), generator=gen)]
    if trial % 5 == 0 and n > 4:
        b[0, 0], b[1, 3], b[2, 2], b[3, 1] = float("nan"), float("inf"), float("inf"), float("-inf")
    scores = torch.rand(n, generator=gen)
    if trial % 2:
        scores = (scores * 4).round() / 4                                       # many exact ties
    n_groups = (1, 2, 7, 60, 200)[trial % 5]
    groups = torch.randint(0, n_groups, (n,), generator=gen)
    return b.to(dtype), scores, groups


@pytest.mark.parametrize("y_filter", [True, False], ids=["cpu-y-filter", "gpu-no-y-filter"])
@pytest.mark.parametrize("method", ["union", "min"])
def test_pruned_nms_keeps_exactly_the_dense_set(method, y_filter, monkeypatch):
    """The NMS used by the detector computes the IoU only for boxes whose x ranges overlap; on random box sets
    (see _random_box_set) it keeps exactly the indices, in the same order, that the dense IoU matrices keep,
    for thresholds from 0 (any overlap suppresses) to 1 (nothing does), float64 and float32 (MPS) boxes, and
    with pair blocks small enough that most sets take several; with the CPU's y pre-filter and without it (the
    GPU path). One torch thread: thousands of tiny ops, which
    on a loaded 2-core machine otherwise wait milliseconds each for the second OpenMP thread."""
    monkeypatch.setattr(M, "_NMS_Y_FILTER", y_filter)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_pruned_and_dense_nms(method, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _compare_pruned_and_dense_nms(method, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    kept = total = 0
    for trial in range(60):
        dtype = torch.float32 if trial % 4 == 3 else torch.float64
        b, sc, g = _random_box_set(gen, trial, dtype)
        monkeypatch.setattr(M, "_NMS_PAIRS", (1 << 20, 50, 500)[trial % 3])
        for thr in (0.0, 0.5, 0.7, 1.0):
            ours = M._grouped_nms(b, sc, g, thr, method)
            ref = M._grouped_nms(b, sc, g, thr, method, dense=True)
            assert torch.equal(ours, ref), (trial, thr)
            kept, total = kept + ref.numel(), total + b.shape[0]
    assert 0.3 < kept / total < 0.9  # the sets suppress plenty (about 15%; threshold 1 none), and keep plenty
    # negative thresholds (never used by the detector) suppress even non-overlapping boxes: dense path
    b, sc, g = _random_box_set(gen, 1, torch.float64)
    assert torch.equal(M._grouped_nms(b, sc, g, -0.1, method), M._grouped_nms(b, sc, g, -0.1, method, dense=True))


# ----------------------------------------------------------------------------------------------------------
# real photos

def test_six_faces(six_faces_default, six_faces_dets, six_faces_image):
    d = six_faces_default
    # the package's NMS makes the result above a threshold independent of lower-scored boxes
    assert torch.equal(d, six_faces_dets[six_faces_dets[:, 4] > 0.9])
    assert d.shape == (6, 15) and d.dtype == torch.float32
    assert torch.all(d[:, 4] > 0.9) and torch.all(d[:-1, 4] >= d[1:, 4])  # highest score first
    pts = d[:, 5:].reshape(-1, 5, 2)
    x1, y1, x2, y2 = (d[:, i:i + 1] for i in range(4))
    assert torch.all((pts[..., 0] >= x1) & (pts[..., 0] <= x2) & (pts[..., 1] >= y1) & (pts[..., 1] <= y2))
    eyes_y = pts[:, :2, 1].max(1).values
    mouth_y = pts[:, 3:, 1].min(1).values
    assert torch.all(eyes_y < mouth_y)
    assert torch.all(pts[:, 0, 0] < pts[:, 1, 0])  # left eye (image left) has the smaller x
    assert torch.all(pts[:, 3, 0] < pts[:, 4, 0])  # same for the mouth corners
    h, w = six_faces_image.shape[-2:]
    assert torch.all(d[:, 0] >= 0) and torch.all(d[:, 2] <= w - 1) and torch.all(d[:, 3] <= h - 1)


def test_matches_recorded_output_of_the_original_package(six_faces_dets):
    """ours vs mtcnn 1.0.0 (TensorFlow) on t1_six_faces.jpg at the package's default O-Net threshold 0.8:
    same 7 faces (6 real + 1 at 0.82), boxes and landmarks within 0.01 px, scores within 1e-4."""
    ref = torch.tensor(REFERENCE_T1, dtype=torch.float64)
    ours = six_faces_dets.double()
    assert ours.shape == ref.shape
    order = box_iou(ref[:, :4], ours[:, :4]).argmax(1)
    ours = ours[order]
    assert (ours[:, :4] - ref[:, :4]).abs().max() < 0.01
    assert (ours[:, 5:] - ref[:, 5:]).abs().max() < 0.01
    assert (ours[:, 4] - ref[:, 4]).abs().max() < 1e-5


def test_whole_lq_real_photos_each_have_a_face(det):
    folder = need_shared("faces", "whole_lq_real")
    counts = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        d = det.detect(load_image(path))[0]
        counts[path.name] = d.shape[0]
    print("MTCNN faces per photo (score > 0.9):", counts)
    assert counts and all(n >= 1 for n in counts.values()), counts


def test_batch_equals_single_runs(det, six_faces_small):
    flipped = six_faces_small.flip(-1)
    batch = det.detect(torch.cat([six_faces_small, flipped]))
    singles = [det.detect(six_faces_small)[0], det.detect(flipped)[0]]
    assert batch[0].shape[0] == 6
    # Boxes, scores and landmarks move with the networks' float32 rounding (measured against float64 here).
    d64 = MTCNNDetector.load(dtype=torch.float64)
    tol = max(reorder_tol(lambda dt: (det if dt == torch.float32 else d64).detect(im.to(dt))[0])
              for im in (six_faces_small, flipped))
    for b, s in zip(batch, singles):
        assert b.shape == s.shape
        torch.testing.assert_close(b, s, atol=tol, rtol=0)
    # the mirrored image gives the mirrored faces (same count, boxes mirrored within a few pixels)
    w = six_faces_small.shape[-1]
    mirrored = torch.stack([w - 1 - batch[1][:, 2], batch[1][:, 1], w - 1 - batch[1][:, 0], batch[1][:, 3]], 1)
    assert box_iou(batch[0][:, :4], mirrored).max(1).values.min() > 0.8


def test_max_side_maps_back_to_original_pixels(det, six_faces_image, six_faces_default):
    full = six_faces_default
    small = det.detect(six_faces_image, max_side=640)[0]
    assert small.shape[0] == 6
    assert box_iou(full[:, :4], small[:, :4]).max(1).values.min() > 0.75
    eyes = torch.cdist(full[:, 5:7], small[:, 5:7]).min(1).values
    assert eyes.max() < 6


def test_no_face_images_give_zero_detections(det):
    gray = torch.full((1, 3, 240, 320), 0.5)
    noise = torch.rand(1, 3, 240, 320, generator=torch.Generator().manual_seed(0))
    for d in det.detect(torch.cat([gray, noise])):
        assert d.shape == (0, 15)


@pytest.mark.parametrize("hw", [(1, 1), (8, 8), (12, 12), (19, 400), (24, 24)])
def test_tiny_inputs_give_zero_detections(det, hw):
    d = det.detect(torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1)))
    assert len(d) == 2 and all(x.shape == (0, 15) for x in d)


def test_bad_and_unusual_inputs(det):
    assert det.detect(torch.zeros(0, 3, 64, 64)) == []
    nan = torch.full((1, 3, 64, 64), float("nan"))
    assert det.detect(nan)[0].shape == (0, 15)
    assert det.detect(torch.rand(1, 1, 64, 64))[0].shape[1] == 15      # grayscale
    assert det.detect(torch.rand(1, 4, 64, 64))[0].shape[1] == 15      # RGBA: alpha ignored
    with pytest.raises(InvalidImage):
        det.detect(torch.rand(1, 2, 64, 64))
    with pytest.raises(InvalidImage):
        det.detect(torch.rand(3, 64, 64))
    # a large min_face_size makes pyramid levels smaller than P-Net's window: skipped, no error
    assert det.detect(torch.rand(1, 3, 100, 100), min_face_size=80)[0].shape == (0, 15)


def test_input_tensor_is_left_untouched(det, six_faces_small):
    """detect normalises its own copy in place: the caller's tensor (float32 on the detector's device, which
    `.to` passes through uncopied) keeps its values, with and without max_side, for RGB and expanded gray."""
    img = six_faces_small.clone()
    gray = img[:, :1].clone()
    for kw in ({}, {"max_side": 320}):
        assert det.detect(img, **kw)[0].shape[0] >= 1
        det.detect(gray, **kw)
        assert torch.equal(img, six_faces_small) and torch.equal(gray, six_faces_small[:, :1])


def test_large_min_face_size_still_finds_faces(det, six_faces_small):
    """The package returns nothing for min_face_size >= 40 (TensorFlow raises on its smallest pyramid levels);
    here those levels are skipped and the big faces are found."""
    assert det.detect(six_faces_small, min_face_size=40)[0].shape[0] == 6


def test_detector_moves_and_runs_in_other_dtype(det):
    img = load_image(need_shared("faces", "whole_lq_real", "04.jpg"))
    d64 = MTCNNDetector.load(dtype=torch.float64)
    assert d64.pnet.conv1.weight.dtype == torch.float64
    out = d64.detect(img)[0]
    assert out.dtype == torch.float32 and out.shape == (1, 15)
    torch.testing.assert_close(out, det.detect(img)[0], atol=0.05, rtol=0)
    assert d64.to("cpu") is d64 and d64.name == "mtcnn"


REFERENCE_T1 = [
    [910.967, 62.276, 1012.279, 198.731, 0.999952,
     917.041, 119.827, 951.049, 111.747, 923.917, 150.747, 932.256, 175.482, 960.968, 167.513],
    [742.503, 342.584, 841.196, 474.672, 0.999603,
     760.645, 396.983, 802.451, 400.872, 773.373, 431.962, 761.490, 438.195, 807.023, 441.284],
    [54.229, 265.650, 163.989, 394.636, 0.992782,
     85.182, 329.904, 128.002, 309.061, 120.181, 338.059, 112.594, 370.811, 145.283, 353.024],
    [1133.991, 272.436, 1227.325, 397.178, 0.991725,
     1150.122, 323.588, 1192.874, 321.775, 1165.245, 348.360, 1154.277, 365.806, 1196.280, 364.920],
    [269.308, 151.506, 365.323, 268.616, 0.986687,
     288.580, 210.746, 319.894, 192.297, 307.002, 224.110, 309.998, 247.948, 337.000, 231.668],
    [465.940, 264.860, 568.773, 405.330, 0.984855,
     492.896, 319.185, 540.320, 331.726, 507.856, 364.042, 483.392, 366.354, 530.191, 378.215],
    [1198.956, 534.596, 1212.691, 551.356, 0.816300,
     1204.716, 538.200, 1210.321, 539.401, 1207.304, 542.804, 1202.521, 545.117, 1207.256, 546.115],
]
