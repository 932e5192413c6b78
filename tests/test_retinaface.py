"""RetinaFace detector (pipelines/face/retinaface.py): equivalence with facexlib, the real Face-Detector-1MB
checkpoint on a real photo, batching, and defined errors for missing / corrupt / wrong model files."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from conftest import load_image, need_shared, reorder_tol

from facemend.pipelines.face.retinaface import (ANCHOR_CONFIGS, RetinaFaceDetector, RetinaFaceNet,
                                                  infer_anchor_config)
from facemend.pipelines.face.detection import box_iou
from facemend.pipelines.io.errors import ModelFileInvalid, ModelFileNotFound

REAL_1MB = ("models", "facedetection", "retinaface_mobilenet0.25_1mb.pth")
SIX_FACES = ("faces", "clean", "t1_six_faces.jpg")


# ----------------------------------------------------------------------------------------------------------
# helpers

def _bgr_uint8(path, width=None) -> np.ndarray:
    cv2 = pytest.importorskip("cv2")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if width is not None:
        h, w = img.shape[:2]
        img = cv2.resize(img, (width, round(h * width / w)), interpolation=cv2.INTER_AREA)
    return img


def _photo_or_synthetic(width: int) -> np.ndarray:
    """The six-faces photo (BGR uint8) resized to `width`, or, without ../shared, a seeded smooth synthetic
    image of the same size: the equivalence test compares two implementations, any pixels will do."""
    from conftest import FACES

    path = FACES / "clean" / "t1_six_faces.jpg"
    if path.exists():
        return _bgr_uint8(path, width)
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    h = round(886 * width / 1280)
    small = rng.integers(0, 256, size=(h // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return cv2.resize(small, (width, h), interpolation=cv2.INTER_CUBIC)


def _to_rgb_tensor(bgr: np.ndarray) -> torch.Tensor:
    """Exactly the pixels facexlib sees, as the pack's RGB [1,3,H,W] float in [0,1]."""
    rgb = np.ascontiguousarray(bgr[:, :, ::-1]).astype(np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _randomise_like_a_detector(model: torch.nn.Module, bgr_minus_mean: torch.Tensor) -> None:
    """Random weights that give a usable spread of scores: BN statistics calibrated on the image (so
    activations stay O(1) through ResNet-50), small box/landmark heads, a class head biased towards 'face'."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the statistics of that batch
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        model(bgr_minus_mean)
    model.eval()
    with torch.no_grad():
        for head in model.BboxHead:
            head.conv1x1.weight.mul_(0.5)
        for head in model.LandmarkHead:
            head.conv1x1.weight.mul_(0.5)
        for head in model.ClassHead:
            head.conv1x1.weight.mul_(2.0)
            head.conv1x1.bias.copy_(torch.tensor([-1.0, 1.0]).repeat(head.conv1x1.bias.numel() // 2))


def _threshold_in_a_gap(probs: torch.Tensor, lo: int = 15, hi: int = 60) -> float:
    """A score threshold between two ranked scores, where the (logit) gap is largest among ranks lo..hi,
    so that float differences between implementations cannot move a candidate across it."""
    s = torch.sort(probs.flatten().double(), descending=True).values[: hi + 1].tolist()
    best = max(range(lo, hi), key=lambda i: _logit(s[i]) - _logit(s[i + 1]))
    return float((s[best] + s[best + 1]) / 2)


# ----------------------------------------------------------------------------------------------------------
# equivalence with facexlib's own RetinaFace

@pytest.mark.parametrize("network,prefix", [("resnet50", "module."), ("mobile0.25", "")])
def test_matches_facexlib_detect_faces(tmp_path, network, prefix):
    pytest.importorskip("facexlib")
    from facexlib.detection.retinaface import RetinaFace

    # Small odd sizes (not multiples of 32) exercise the ceil() feature-map sizes; ResNet-50 is kept tiny for speed.
    bgr = _photo_or_synthetic(width=200 if network == "resnet50" else 320)
    mean = torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
    x = torch.from_numpy(bgr.astype(np.float32).transpose(2, 0, 1))[None] - mean

    torch.manual_seed(3)  # a seed where NMS suppresses some candidates for both nets (IoU margins >= 0.01)
    fx = RetinaFace(network_name=network, half=False, phase="test", device="cpu")
    _randomise_like_a_detector(fx, x)
    # facexlib's released files: Pytorch_Retinaface's state_dict; the ResNet-50 one was trained on 4 GPUs
    # with DataParallel ('module.' prefix, which facexlib's init_detection_model strips), the MobileNet one not.
    path = tmp_path / f"detection_{'Resnet50' if network == 'resnet50' else 'mobilenet0.25'}_Final.pth"
    torch.save({prefix + k: v for k, v in fx.state_dict().items()}, path)

    # The file is what facexlib.detection.init_detection_model accepts: reload it its way (strict).
    sd = torch.load(path, map_location="cpu", weights_only=True)
    fx.load_state_dict({k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}, strict=True)
    fx.eval()
    with torch.no_grad():
        probs = fx(x)[1][0, :, 1]
    thr = _threshold_in_a_gap(probs)
    with torch.no_grad():
        want = torch.from_numpy(fx.detect_faces(bgr, conf_threshold=thr, nms_threshold=0.4))

    det = RetinaFaceDetector.from_file(str(path))
    assert det.anchors == "facexlib" and det.backbone == ("resnet50" if network == "resnet50" else "mobilenet0.25")
    got = det.detect(_to_rgb_tensor(bgr), score_threshold=thr, nms_threshold=0.4)[0]

    assert want.shape[0] >= 3, "the random init should give several detections"
    assert int((probs > thr).sum()) > want.shape[0], "NMS should have suppressed some candidates"
    assert got.shape == want.shape
    # Same order (score descending); boxes, landmarks and scores equal up to the network's float32 rounding
    # (ours in float64 against ours in float32, on this machine).
    d64 = RetinaFaceDetector.from_file(str(path), dtype=torch.float64)
    img = _to_rgb_tensor(bgr)
    tol = reorder_tol(lambda dt: (det if dt == torch.float32 else d64).detect(
        img.to(dt), score_threshold=thr, nms_threshold=0.4)[0])
    torch.testing.assert_close(got, want.to(got.dtype), atol=tol, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# the real Face-Detector-1MB checkpoint on a real photo

@pytest.fixture(scope="module")
def real_1mb():
    return RetinaFaceDetector.from_file(str(need_shared(*REAL_1MB)))


@pytest.fixture(scope="module")
def six_faces():
    return load_image(need_shared(*SIX_FACES))


@pytest.fixture(scope="module")
def six_faces_small(six_faces):
    return six_faces[..., ::2, ::2].contiguous()  # 640x443


@pytest.fixture(scope="module")
def full_dets(real_1mb, six_faces):
    return real_1mb.detect(six_faces)


def _check_plausible_faces(dets: torch.Tensor) -> None:
    boxes, pts = dets[:, :4], dets[:, 5:].reshape(-1, 5, 2)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    margin = torch.stack([w, h], 1)[:, None, :] * 0.1
    assert (pts >= boxes[:, None, :2] - margin).all() and (pts <= boxes[:, None, 2:] + margin).all(), \
        "landmarks must lie inside their boxes"
    eyes_y, mouth_y = pts[:, 0:2, 1].mean(1), pts[:, 3:5, 1].mean(1)
    assert (eyes_y < mouth_y).all(), "eyes above the mouth"
    assert (pts[:, 0, 0] < pts[:, 1, 0]).all(), "left eye (as seen in the image) first"
    assert (pts[:, 3, 0] < pts[:, 4, 0]).all(), "left mouth corner (as seen in the image) first"


def test_real_1mb_checkpoint_finds_the_six_faces(real_1mb, full_dets):
    assert real_1mb.anchors == "1mb" and real_1mb.backbone == "mobilenet0.25"
    assert real_1mb.name == "retinaface:retinaface_mobilenet0.25_1mb"
    dets = full_dets
    assert len(dets) == 1
    d = dets[0]
    assert d.shape == (6, 15) and d.dtype == torch.float32
    assert (d[:, 4] > 0.99).all()
    assert (d[1:, 4] <= d[:-1, 4]).all(), "highest score first"
    _check_plausible_faces(d)
    # Six separate people: no two boxes overlap much, faces are 60..130 px in this 1280x886 photo.
    iou = box_iou(d[:, :4], d[:, :4]).fill_diagonal_(0)
    assert iou.max() < 0.1
    w = d[:, 2] - d[:, 0]
    assert ((w > 60) & (w < 130)).all()


@pytest.mark.parametrize("half_size", [False, True])
def test_real_1mb_checkpoint_with_facexlib_config_is_detectably_wrong(full_dets, six_faces, six_faces_small,
                                                                      half_size):
    wrong = RetinaFaceDetector.from_file(str(need_shared(*REAL_1MB)), anchors="facexlib")
    assert wrong.anchors == "facexlib"
    good = full_dets[0]
    bad = wrong.detect(six_faces_small)[0] * 2 if half_size else wrong.detect(six_faces)[0]
    assert bad.shape[0] != 6
    # None of the true faces is found with a matching box: the facexlib anchors double and shift them.
    assert box_iou(good[:, :4], bad[:, :4]).max(1).values.max() < 0.5


def test_activation_variant_matters_for_the_1mb_checkpoint(real_1mb, full_dets, six_faces):
    """Face-Detector-1MB uses ReLU where facexlib's copy has LeakyReLU(0.1): same keys, other results."""
    leaky = RetinaFaceNet("mobilenet0.25", leaky=True)
    leaky.load_state_dict(real_1mb.net.state_dict())
    good = full_dets[0]
    bad = RetinaFaceDetector(leaky, anchors="1mb").detect(six_faces)[0]
    assert bad.shape[0] != 6 or box_iou(good[:, :4], bad[:, :4]).max(1).values.min() < 0.8


def test_max_side_downscales_and_maps_back(real_1mb, six_faces, full_dets):
    full = full_dets[0]
    small = real_1mb.detect(six_faces, max_side=640)[0]
    assert small.shape == (6, 15)
    iou = box_iou(full[:, :4], small[:, :4])
    assert (iou.max(1).values > 0.7).all(), "boxes are returned in the original image's pixel coordinates"
    match = iou.argmax(1)
    eye_dist = torch.linalg.norm(full[:, 5:7] - full[:, 7:9], dim=1)
    err = torch.linalg.norm((full[:, 5:] - small[match, 5:]).reshape(6, 5, 2), dim=2).max(1).values
    assert (err < 0.35 * eye_dist).all()
    # Images already below max_side are left alone.
    small_img = six_faces[..., :300, :400]
    torch.testing.assert_close(real_1mb.detect(small_img, max_side=400)[0], real_1mb.detect(small_img)[0])


def test_batch_of_two_equals_single(real_1mb, six_faces):
    img = six_faces[..., ::3, ::3].contiguous()  # 427x296
    one = real_1mb.detect(img)
    two = real_1mb.detect(torch.cat([img, img], 0))
    assert len(one) == 1 and len(two) == 2
    assert one[0].shape[0] >= 5
    d64 = RetinaFaceDetector.from_file(str(need_shared(*REAL_1MB)), dtype=torch.float64)
    tol = reorder_tol(lambda dt: (real_1mb if dt == torch.float32 else d64).detect(img.to(dt))[0])
    for d in two:
        assert d.shape == one[0].shape
        torch.testing.assert_close(d, one[0], atol=tol, rtol=0)
    # prior boxes are cached per input size on the detector's device
    assert any(k[:2] == (img.shape[-2], img.shape[-1]) for k in real_1mb._priors)


def test_pre_nms_cap_bounds_the_candidates(real_1mb, six_faces_small):
    """At a near-zero threshold every anchor is a candidate; the cap keeps NMS small and the faces found."""
    capped = real_1mb.detect(six_faces_small, score_threshold=0.0, pre_nms_top_k=300)[0]
    assert 6 <= capped.shape[0] <= 300
    assert (capped[:6, 4] > 0.99).all()


def test_no_face_gives_empty_result(real_1mb):
    blank = torch.full((2, 3, 97, 131), 0.5)
    dets = real_1mb.detect(blank)
    assert [tuple(d.shape) for d in dets] == [(0, 15), (0, 15)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision(six_faces, dtype):
    if dtype == torch.float16 and not torch.cuda.is_available():
        pytest.skip("float16 convolutions are meant for the GPU (very slow on CPU)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    img = six_faces[..., ::4, ::4].contiguous().to(device)  # 320x222
    ref = RetinaFaceDetector.from_file(str(need_shared(*REAL_1MB)), device=device).detect(img)[0]
    low = RetinaFaceDetector.from_file(str(need_shared(*REAL_1MB)), device=device, dtype=dtype)
    got = low.detect(img.to(dtype))[0]
    assert got.dtype == torch.float32 and got.shape[0] == ref.shape[0]
    assert (box_iou(ref[:, :4], got[:, :4]).max(1).values > 0.9).all()


# ----------------------------------------------------------------------------------------------------------
# choosing the configuration

def test_config_inference_from_name_and_weights(tmp_path):
    mob = RetinaFaceNet("mobilenet0.25").state_dict()
    res = RetinaFaceNet("resnet50").state_dict()
    assert infer_anchor_config("detection_mobilenet0.25_Final.pth", mob) == "facexlib"
    assert infer_anchor_config("mobilenet0.25_Final.pth", mob) == "facexlib"
    assert infer_anchor_config("retinaface_mobilenet0.25_1mb.pth", mob) == "1mb"
    assert infer_anchor_config("detection_Resnet50_Final.pth", res) == "facexlib"
    assert infer_anchor_config("whatever_1mb.pth", res) == "facexlib", "only facexlib has a ResNet-50"
    assert set(ANCHOR_CONFIGS) == {"facexlib", "1mb"}


def test_real_1mb_weights_recognised_under_its_original_name(tmp_path):
    """biubug6 calls the file mobilenet0.25_Final.pth, like Pytorch_Retinaface's: the weights decide."""
    sd = torch.load(need_shared(*REAL_1MB), map_location="cpu", weights_only=True)
    path = tmp_path / "mobilenet0.25_Final.pth"
    torch.save(sd, path)
    assert RetinaFaceDetector.from_file(str(path)).anchors == "1mb"
    assert RetinaFaceDetector.from_file(str(path), anchors="facexlib").anchors == "facexlib"
    with pytest.raises(ValueError):
        RetinaFaceDetector.from_file(str(path), anchors="yolo")


def test_checkpoint_variants_load(tmp_path):
    """'module.' prefixes, a {'state_dict': ...} wrapper, missing BN counters and .safetensors all load."""
    net = RetinaFaceNet("mobilenet0.25")
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "a.pth")
    det = RetinaFaceDetector.from_file(str(tmp_path / "a.pth"))
    assert det.backbone == "mobilenet0.25" and det.anchors == "facexlib"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "detection_mobilenet0.25_Final.safetensors"))
    det = RetinaFaceDetector.from_file(str(tmp_path / "detection_mobilenet0.25_Final.safetensors"))
    for k, v in sd.items():
        torch.testing.assert_close(det.net.state_dict()[k], v)


# ----------------------------------------------------------------------------------------------------------
# defined errors

def test_missing_file_names_it(tmp_path):
    path = tmp_path / "facedetection" / "detection_Resnet50_Final.pth"
    with pytest.raises(ModelFileNotFound) as info:
        RetinaFaceDetector.from_file(str(path))
    assert isinstance(info.value, FileNotFoundError)
    assert str(path) in str(info.value)


def test_truncated_file_is_invalid(tmp_path):
    full = tmp_path / "full.pth"
    torch.save(RetinaFaceNet("mobilenet0.25").state_dict(), full)
    data = full.read_bytes()
    cut = tmp_path / "detection_mobilenet0.25_Final.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileInvalid) as info:
        RetinaFaceDetector.from_file(str(cut))
    assert str(cut) in str(info.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ModelFileInvalid, match="junk.pth"):
        RetinaFaceDetector.from_file(str(junk))


def test_gfpgan_like_state_dict_is_refused(tmp_path):
    sd = {"params_ema": {"conv_body_first.weight": torch.randn(32, 3, 1, 1),
                         "conv_body_down.0.conv1.weight": torch.randn(32, 32, 3, 3),
                         "toRGB.0.weight": torch.randn(3, 32, 1, 1)}}
    path = tmp_path / "GFPGANv1.4.pth"
    torch.save(sd, path)
    with pytest.raises(ModelFileInvalid) as info:
        RetinaFaceDetector.from_file(str(path))
    msg = str(info.value)
    assert "GFPGANv1.4.pth" in msg and "RetinaFace" in msg and "conv_body_first.weight" in msg


def test_facexlib_parsing_net_is_refused(tmp_path):
    pytest.importorskip("facexlib")
    from facexlib.parsing.parsenet import ParseNet

    path = tmp_path / "parsing_parsenet.pth"
    torch.save(ParseNet(in_size=512, out_size=512, parsing_ch=19).state_dict(), path)
    with pytest.raises(ModelFileInvalid, match="parsing_parsenet.pth is not a RetinaFace"):
        RetinaFaceDetector.from_file(str(path))


def test_same_keys_other_shapes_is_refused(tmp_path):
    sd = RetinaFaceNet("mobilenet0.25").state_dict()
    sd["ClassHead.0.conv1x1.weight"] = torch.zeros(6, 64, 1, 1)  # 3 anchors per cell instead of 2
    path = tmp_path / "mobilenet0.25_other.pth"
    torch.save(sd, path)
    with pytest.raises(ModelFileInvalid, match="other shapes"):
        RetinaFaceDetector.from_file(str(path))


def test_bad_input_shape(real_1mb):
    from facemend.pipelines.io.errors import InvalidImage

    with pytest.raises(InvalidImage):
        real_1mb.detect(torch.zeros(1, 4, 32, 32))
    assert real_1mb.detect(torch.zeros(0, 3, 32, 32)) == []


@pytest.mark.parametrize("backbone,leaky", [("mobilenet0.25", True), ("mobilenet0.25", False), ("resnet50", True)])
def test_inference_copy_computes_the_same_network(backbone, leaky):
    """The detector runs a copy with BatchNorms folded, the BGR swap and x255 in its first conv and channels-last
    memory: the same outputs as the loaded network on the original input (BGR 0..255 minus the mean), within the
    loaded network's own float32 rounding (measured against float64), including the zero-padded image border."""
    from facemend.pipelines.face.retinaface import BGR_MEAN, RetinaFaceNet, inference_copy

    torch.manual_seed(1)
    rgb = torch.rand(1, 3, 70, 90)
    bgr_minus_mean = rgb.flip(1) * 255 - torch.tensor(BGR_MEAN).view(1, 3, 1, 1)
    net = RetinaFaceNet(backbone, leaky=leaky)
    _randomise_like_a_detector(net, bgr_minus_mean)
    fast = inference_copy(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()), "the loaded network is left as it was"
    x = rgb - torch.tensor(BGR_MEAN[::-1]).view(1, 3, 1, 1) / 255
    with torch.no_grad():
        want, got = net(bgr_minus_mean), fast(x.contiguous(memory_format=torch.channels_last))
    for k, (w, g) in enumerate(zip(want, got)):
        tol = reorder_tol(lambda dt: (net if dt == torch.float32 else copy.deepcopy(net).double())(
            bgr_minus_mean.to(dt))[k])
        torch.testing.assert_close(g, w, atol=tol, rtol=0)
