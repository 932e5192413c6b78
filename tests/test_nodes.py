"""Node contract (schema, tooltips, permanent ids and input names) and node behaviour on real photos and
bad inputs, calling the node classes the way ComfyUI does."""
import json
from pathlib import Path

import pytest
import torch

import facemend
from facemend.pipelines.io.errors import InvalidImage, ModelFileInvalid, ModelFileNotFound

from conftest import load_image, need_shared

API_FILE = Path(__file__).with_name("node_api.json")
COMFY_TYPES = {"IMAGE", "MASK", "INT", "FLOAT", "STRING", "BOOLEAN"}


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    return {section: spec.get(section, {}) for section in ("required", "optional")}


def current_api():
    return {nid: {s: list(v) for s, v in _inputs(cls).items()} for nid, cls in facemend.NODE_CLASS_MAPPINGS.items()}


@pytest.mark.parametrize("node_id", sorted(facemend.NODE_CLASS_MAPPINGS))
def test_node_schema_is_complete(node_id):
    cls = facemend.NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("FaceMend_") and node_id in facemend.NODE_DISPLAY_NAME_MAPPINGS
    for attr in ("RETURN_TYPES", "FUNCTION", "CATEGORY", "DESCRIPTION"):
        assert getattr(cls, attr), f"{node_id} lacks {attr}"
    assert callable(getattr(cls(), cls.FUNCTION))
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    for section, inputs in _inputs(cls).items():
        for name, spec in inputs.items():
            assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (node_id, name)
            options = spec[1] if len(spec) == 2 else {}
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            kind = spec[0]
            assert isinstance(kind, list) or kind in COMFY_TYPES or kind.isupper(), (node_id, name, kind)
            if isinstance(kind, list) and "default" in options:
                assert options["default"] in kind


def test_node_ids_and_input_names_are_permanent():
    """Saved workflows refer to node ids and input names: existing ones never disappear or move;
    new inputs are optional and appended. Update node_api.json only by adding."""
    recorded = json.loads(API_FILE.read_text())
    now = current_api()
    for nid, sections in recorded.items():
        assert nid in now, f"node {nid} was removed or renamed"
        for section, names in sections.items():
            assert now[nid][section][: len(names)] == names, f"{nid} {section} inputs changed"
    for nid in now:
        if nid in recorded:
            assert len(now[nid]["required"]) == len(recorded[nid]["required"]), f"{nid}: new inputs must be optional"


def test_importing_does_no_model_loading():
    from facemend.pipelines.face import detectors
    assert detectors._cache == {} or all(k for k in detectors._cache)  # nothing forced at import
    assert not torch.cuda.is_initialized()


def _node(node_id):
    return facemend.NODE_CLASS_MAPPINGS[node_id]()


def _to_image(x):
    return x.permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def mtcnn():
    return _node("FaceMend_DetectorLoader").load("mtcnn (embedded)")[0]


def test_detect_colorfix_paste_on_real_photo(mtcnn):
    img = _to_image(load_image(need_shared("faces", "clean", "t1_six_faces.jpg")))
    crops, alignment, count, info = _node("FaceMend_DetectAlign").run(img, mtcnn)
    assert count == 6 and crops.shape == (6, 512, 512, 3) and len(json.loads(info)["faces"]) == 6
    fixed, = _node("FaceMend_ColorFix").run(crops, crops, "wavelet", 1.0)
    out, blend = _node("FaceMend_PasteBack").run(img, fixed, alignment)
    assert out.shape == img.shape and blend.shape == img.shape[:3]
    assert (out - img).abs().mean() < 2e-3
    largest = _node("FaceMend_DetectAlign").run(img, mtcnn, "largest")
    assert largest[2] == 1


def test_no_face_passes_through_with_count_zero(mtcnn):
    flat = torch.full((2, 120, 160, 3), 0.5)
    crops, alignment, count, _ = _node("FaceMend_DetectAlign").run(flat, mtcnn)
    assert count == 0 and crops.shape == (0, 512, 512, 3)  # an empty batch: the face nodes do nothing with it
    out, blend = _node("FaceMend_PasteBack").run(flat, crops, alignment)
    assert torch.equal(out, flat) and float(blend.max()) == 0.0


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (1, 7, 5, 3), (1, 64, 48, 1), (1, 64, 48, 4), (64, 48, 3)])
def test_tiny_gray_rgba_and_unbatched_images(mtcnn, shape):
    img = torch.rand(shape)
    crops, alignment, count, _ = _node("FaceMend_DetectAlign").run(img, mtcnn)
    out, _ = _node("FaceMend_PasteBack").run(img, crops, alignment)
    assert out.shape[-1] == 3 and out.shape[1:3] == (shape[-3], shape[-2])


def test_nan_image_is_a_clear_error(mtcnn):
    img = torch.rand(1, 32, 32, 3)
    img[0, 3, 3, 1] = float("nan")
    with pytest.raises(InvalidImage, match="NaN"):
        _node("FaceMend_DetectAlign").run(img, mtcnn)


@pytest.mark.slow
def test_huge_image_is_detected_downscaled_and_cropped_full_size(mtcnn):
    import torch.nn.functional as F
    photo = load_image(need_shared("faces", "clean", "t1_six_faces.jpg"))
    huge = F.interpolate(photo, size=(6000, 8000), mode="bilinear", align_corners=False)
    crops, alignment, count, _ = _node("FaceMend_DetectAlign").run(_to_image(huge), mtcnn)
    assert count == 6
    # Boxes are in full-resolution coordinates (~6.25x the 1280 px photo's).
    assert float(alignment.boxes[:, 2].max()) > 3000


def test_paste_rejects_crops_from_another_detection(mtcnn):
    img = _to_image(load_image(need_shared("faces", "clean", "t1_six_faces.jpg")))
    crops, alignment, _, _ = _node("FaceMend_DetectAlign").run(img, mtcnn)
    with pytest.raises(InvalidImage, match="6 aligned faces"):
        _node("FaceMend_PasteBack").run(img, crops[:2], alignment)


def test_loader_errors_name_the_file(tmp_path, monkeypatch):
    from facemend.host import model_paths

    (tmp_path / "facedetection").mkdir()
    model_paths.set_models_dirs([str(tmp_path)])
    try:
        with pytest.raises(ModelFileNotFound, match="detection_Resnet50_Final.pth") as err:
            _node("FaceMend_DetectorLoader").load("detection_Resnet50_Final.pth")
        assert "github.com/xinntao/facexlib" in str(err.value) and "facedetection" in str(err.value)
        (tmp_path / "facedetection" / "broken.pth").write_bytes(b"PK\x03\x04 truncated")
        with pytest.raises(ModelFileInvalid, match="broken.pth"):
            _node("FaceMend_DetectorLoader").load("broken.pth")
        torch.save({"conv_body.weight": torch.zeros(3, 3)}, tmp_path / "facedetection" / "other.pth")
        with pytest.raises(ModelFileInvalid, match="other.pth"):
            _node("FaceMend_DetectorLoader").load("other.pth")
    finally:
        model_paths.set_models_dirs([])
