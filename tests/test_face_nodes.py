"""Detector loader, Detect + Align, Paste Back and Color Fix: what the V3 nodes add where users see it (node_class,
skipped without ComfyUI): the model name and choices checked when a prompt is queued, fingerprints that follow the
model file, previews of the crops, Paste Back's before/after and the colour-fixed images. What they compute on real
photos and bad inputs: test_nodes.py."""
import json

import numpy as np
import pytest
import torch

from facemend.host import device as dev
from facemend.host import model_paths
from facemend.ops import color as color_op
from facemend.ops import face as op

from conftest import load_image, need_shared, node_class

pytestmark = pytest.mark.usefixtures("one_thread")
EMBEDDED = "mtcnn (embedded)"


def _to_image(x):
    return x.permute(0, 2, 3, 1).contiguous()


def _png(folder, ref) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(folder / ref["subfolder"] / ref["filename"]).convert("RGB")).astype(np.float32) / 255


# ComfyUI writes previews as 8-bit PNGs by truncation: a shown pixel is under one level from the tensor's.
LEVEL = 1 / 255


@pytest.fixture(scope="module")
def mtcnn():
    return op.load_face_detector(EMBEDDED)


@pytest.fixture(scope="module")
def six_faces():
    return _to_image(load_image(need_shared("faces", "clean", "t1_six_faces.jpg")))


@pytest.fixture
def detector_dir(tmp_path):
    (tmp_path / "facedetection").mkdir()
    model_paths.set_models_dirs([str(tmp_path)])
    yield tmp_path / "facedetection"
    model_paths.set_models_dirs([])


# ------------------------------------------------------------------------------------------ the V3 nodes

def test_detector_loader_refuses_a_missing_model_before_the_run(detector_dir, monkeypatch):
    """validate_inputs runs when a prompt is queued, before anything executes: a missing file is named with the
    folders searched and where to get it, instead of failing mid-run. Naming `model` there skips ComfyUI's list
    check, so the check itself refuses what is not a choice (a YuNet .onnx, a name outside the folders)."""
    cls = node_class("FaceMend_DetectorLoader")
    torch.save({}, detector_dir / "retinaface_mobilenet0.25_1mb.pth")
    (detector_dir / "yunet_s_640_640.onnx").write_bytes(b"onnx")
    assert cls.GET_NODE_INFO_V1()["input"]["required"]["model"][1]["options"] == [
        EMBEDDED, "retinaface_mobilenet0.25_1mb.pth"]
    assert cls.validate_inputs(model="retinaface_mobilenet0.25_1mb.pth") is True
    assert cls.validate_inputs(model=EMBEDDED) is True
    assert cls.validate_inputs() is True  # linked: nothing to check
    msg = cls.validate_inputs(model="detection_Resnet50_Final.pth")
    assert "'detection_Resnet50_Final.pth' was not found" in msg and str(detector_dir) in msg
    assert "github.com/xinntao/facexlib" in msg
    assert "was not found" in cls.validate_inputs(model="yunet_s_640_640.onnx")
    assert "outside" in cls.validate_inputs(model="../../etc/passwd.pth")
    # The embedded detector's weights come with the `mtcnn` package: without it, the run is refused up front.
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mtcnn" else find_spec(name, *a))
    assert "pip install mtcnn" in cls.validate_inputs(model=EMBEDDED)


@pytest.mark.parametrize("node_id, name, good, stale", [
    ("FaceMend_DetectorLoader", "precision", "fp16", "fp8"), ("FaceMend_DetectorLoader", "anchors", "1mb", "2mb"),
    ("FaceMend_DetectAlign", "selection", "largest", "biggest"), ("FaceMend_DetectAlign", "border", "reflect", "wrap"),
    ("FaceMend_DetectAlign", "interpolation", "bicubic", "lanczos"),
    ("FaceMend_DetectAlign", "crop_geometry", "native", "arcface"),
    ("FaceMend_PasteBack", "interpolation", "bicubic", "nearest"), ("FaceMend_ColorFix", "method", "adain", "lab"),
])
def test_a_value_that_is_not_a_choice_is_refused_when_queued(node_id, name, good, stale):
    """A saved workflow with a stale choice is refused before the run (ComfyUI 0.3.64 checks no V3 combo itself;
    these used to fail mid-run with a ValueError from the pipeline)."""
    cls = node_class(node_id)
    assert cls.validate_inputs(**{name: good}) is True
    msg = cls.validate_inputs(**{name: stale})
    assert msg is not True and f"'{stale}'" in msg and good in msg


def test_detector_loader_fingerprint_follows_the_file(detector_dir):
    """An unchanged file is not loaded again when the graph is re-queued; a file replaced under the same name is."""
    cls = node_class("FaceMend_DetectorLoader")
    path = detector_dir / "det.pth"
    path.write_bytes(b"weights v1")
    before = cls.fingerprint_inputs(model="det.pth", precision="fp32", anchors="auto")
    assert cls.fingerprint_inputs(model="det.pth", precision="fp32", anchors="auto") == before
    assert cls.fingerprint_inputs(model="det.pth", precision="fp32", anchors="1mb") != before
    path.write_bytes(b"weights v2, new")
    assert cls.fingerprint_inputs(model="det.pth", precision="fp32", anchors="auto") != before
    embedded = cls.fingerprint_inputs(model=EMBEDDED, precision="fp32")
    assert cls.fingerprint_inputs(model=EMBEDDED, precision="fp32") == embedded


def test_detect_align_previews_the_crops(mtcnn, six_faces, preview_dir):
    cls = node_class("FaceMend_DetectAlign")
    result = cls.execute(six_faces, mtcnn)
    crops = result.result[0]
    assert result.result[2] == 6
    shown = result.ui.as_dict()["images"]
    assert len(shown) == 6 and {s["type"] for s in shown} == {"temp"}
    for crop, ref in zip(crops, shown):  # 512 px crops are shown as they are
        assert np.abs(_png(preview_dir, ref) - crop.numpy()).max() < LEVEL
    assert cls.execute(torch.full((1, 60, 80, 3), 0.5), mtcnn).ui is None  # no face: nothing to show


def test_paste_back_shows_each_photo_before_and_after(mtcnn, six_faces, preview_dir):
    """One preview per photo: the input | the result, each downscaled to at most 512 px and labelled, so the
    change is seen at a glance."""
    cls = node_class("FaceMend_PasteBack")
    crops, alignment, _, _ = op.detect_align(six_faces, mtcnn)
    result = cls.execute(six_faces, 1 - crops, alignment)  # inverted faces: a change nobody can miss
    out = result.result[0]
    assert torch.equal(out, op.paste_back(six_faces, 1 - crops, alignment)[0])
    (ref,) = result.ui.as_dict()["images"]
    pair = _png(preview_dir, ref)
    before = dev.preview_image(six_faces, 512)[0].numpy()
    after = dev.preview_image(out, 512)[0].numpy()
    h, w = before.shape[:2]
    assert max(h, w) == 512 and pair.shape == (h, 2 * w + 8, 3)
    label = h // 10  # the labels' boxes sit in each half's top-left corner; the rest is the photos themselves
    assert np.abs(pair[label:, :w] - before[label:]).max() < LEVEL
    assert np.abs(pair[label:, w + 8:] - after[label:]).max() < LEVEL
    assert np.abs(before - after).mean() > 0.01  # the halves differ where the faces went back


def test_paste_back_preview_of_a_batch_and_of_odd_images(mtcnn, preview_dir):
    """Every photo of a batch (up to PREVIEW_MAX: each preview is a PNG written on every run), gray, RGBA,
    unbatched and 1x1 images too."""
    from facemend.nodes.face import PREVIEW_MAX

    cls = node_class("FaceMend_PasteBack")
    for shape in [(3, 40, 30, 3), (PREVIEW_MAX + 2, 6, 5, 3), (1, 1, 1, 3), (1, 64, 48, 1), (64, 48, 4)]:
        img = torch.rand(shape)
        crops, alignment, _, _ = op.detect_align(img, mtcnn)
        result = cls.execute(img, crops, alignment)
        shown = result.ui.as_dict()["images"]
        assert len(shown) == (min(shape[0], PREVIEW_MAX) if len(shape) == 4 else 1), shape
        h, w = shape[-3:-1]
        assert _png(preview_dir, shown[0]).shape == (h, 2 * w + 8, 3), shape


def test_color_fix_previews_its_images(preview_dir):
    cls = node_class("FaceMend_ColorFix")
    image, reference = torch.rand(2, 48, 48, 3), torch.rand(1, 48, 48, 3)
    result = cls.execute(image, reference, "adain", 1.0)
    out = result.result[0]
    assert torch.equal(out, color_op.fix_colors(image, reference, "adain", 1.0)[0])
    shown = result.ui.as_dict()["images"]
    assert len(shown) == 2
    for img, ref in zip(out, shown):
        assert np.abs(_png(preview_dir, ref) - img.numpy()).max() < LEVEL
    assert cls.execute(torch.zeros(0, 512, 512, 3), reference).ui is None  # no face crops: nothing to show
    from facemend.nodes.face import PREVIEW_MAX

    many = cls.execute(torch.rand(PREVIEW_MAX + 3, 8, 8, 3), reference)
    assert many.result[0].shape[0] == PREVIEW_MAX + 3 and len(many.ui.as_dict()["images"]) == PREVIEW_MAX


@pytest.mark.comfyui
def test_a_missing_model_is_refused_when_queued_in_comfyui(comfyui):
    """In the real host: the shipped fast graph queued with model files that are not there (and a stale choice) is
    refused by /prompt, before anything runs; the refusal names each file, the folder searched and where to get it."""
    import urllib.error
    import urllib.request

    from conftest import ROOT

    url, base = comfyui
    graph = json.loads((ROOT / "workflows" / "api" / "facemend_fast.json").read_text())
    loaders = {n["class_type"]: n for n in graph.values() if n["class_type"].endswith("Loader")}
    loaders["FaceMend_DetectorLoader"]["inputs"]["model"] = "detection_Resnet50_Final.pth"
    loaders["FaceMend_RestorerLoader"]["inputs"]["model"] = "GFPGANv1.3.pth"
    nodes = {n["class_type"]: n for n in graph.values()}
    nodes["FaceMend_DetectAlign"]["inputs"]["selection"] = "biggest"  # a stale choice in a saved graph
    req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": graph}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=60)
    errors = json.loads(refused.value.read())["node_errors"]
    by_type = {e["class_type"]: " ".join(x["details"] for x in e["errors"]) for e in errors.values()}
    detector, restorer = by_type["FaceMend_DetectorLoader"], by_type["FaceMend_RestorerLoader"]
    assert "'detection_Resnet50_Final.pth' was not found" in detector and "github.com/xinntao/facexlib" in detector
    assert str(base / "models" / "facedetection") in detector
    assert "'GFPGANv1.3.pth' was not found" in restorer and "github.com/TencentARC/GFPGAN" in restorer
    assert str(base / "models" / "facerestore_models") in restorer
    assert "selection: 'biggest' is not one of" in by_type["FaceMend_DetectAlign"]


from test_comfyui_e2e import comfyui  # noqa: E402,F401  (the server fixture, for the test above)
