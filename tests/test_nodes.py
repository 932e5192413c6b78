"""Node contract (schema, tooltips, permanent ids and input names) as ComfyUI serves it, and what the nodes compute
on real photos and bad inputs (through ops/, the nodes' plain functions)."""
import json
from pathlib import Path

import pytest
import torch

from facemend.pipelines.io.errors import InvalidImage, ModelFileInvalid, ModelFileNotFound

from conftest import load_image, need_shared
from node_specs import inputs, kind, node_infos, node_op, options, opts

API_FILE = Path(__file__).with_name("node_api.json")
COMFY_TYPES = {"IMAGE", "MASK", "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@pytest.fixture(scope="module")
def infos():
    return node_infos()


def current_api(infos):
    return {nid: {s: list(v) for s, v in inputs(info).items()} for nid, info in infos.items()}


def test_node_schema_is_complete(infos):
    assert len(infos) >= len(json.loads(API_FILE.read_text()))
    for node_id, info in infos.items():
        _check_schema(node_id, info)


def _check_schema(node_id, info):
    assert node_id.startswith("FaceMend_") and info["display_name"] and info["display_name"] != node_id
    assert info["category"] and info["description"], node_id
    assert info["output"] and len(info["output_name"]) == len(info["output"]), node_id
    for section, specs in inputs(info).items():
        for name, spec in specs.items():
            assert isinstance(spec, (tuple, list)) and 1 <= len(spec) <= 2, (node_id, name)
            assert opts(spec).get("tooltip"), f"{node_id}.{name} has no tooltip"
            k = kind(spec)
            assert k in COMFY_TYPES or k.isupper(), (node_id, name, k)
            if options(spec) is not None and "default" in opts(spec):
                assert opts(spec)["default"] in options(spec), (node_id, name)


def test_node_ids_and_input_names_are_permanent(infos):
    """Saved workflows refer to node ids and input names: existing ones never disappear or move;
    new inputs are optional and appended. Update node_api.json only by adding."""
    recorded = json.loads(API_FILE.read_text())
    now = current_api(infos)
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


def test_every_v3_node_computes_through_ops(infos):
    """The CLI, benchmarks and tests run a node through ops/ (no ComfyUI): every V3 node has its function there,
    taking the node's inputs by name."""
    import inspect

    from node_specs import ops_registry

    ops = ops_registry()
    for nid, info in infos.items():
        assert nid in ops, f"{nid} has no function in ops/"
        params = inspect.signature(ops[nid]).parameters
        names = [n for section in inputs(info).values() for n in section]
        assert list(params)[: len(names)] == names, f"{nid}: ops arguments {list(params)} != inputs {names}"


def _to_image(x):
    return x.permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def mtcnn():
    return node_op("FaceMend_DetectorLoader")("mtcnn (embedded)")[0]


def test_detect_colorfix_paste_on_real_photo(mtcnn):
    img = _to_image(load_image(need_shared("faces", "clean", "t1_six_faces.jpg")))
    crops, alignment, count, info = node_op("FaceMend_DetectAlign")(img, mtcnn)
    assert count == 6 and crops.shape == (6, 512, 512, 3) and len(json.loads(info)["faces"]) == 6
    fixed, = node_op("FaceMend_ColorFix")(crops, crops, "wavelet", 1.0)
    out, blend = node_op("FaceMend_PasteBack")(img, fixed, alignment)
    assert out.shape == img.shape and blend.shape == img.shape[:3]
    assert (out - img).abs().mean() < 2e-3
    largest = node_op("FaceMend_DetectAlign")(img, mtcnn, "largest")
    assert largest[2] == 1


def test_no_face_passes_through_with_count_zero(mtcnn):
    flat = torch.full((2, 120, 160, 3), 0.5)
    crops, alignment, count, _ = node_op("FaceMend_DetectAlign")(flat, mtcnn)
    assert count == 0 and crops.shape == (0, 512, 512, 3)  # an empty batch: the face nodes do nothing with it
    out, blend = node_op("FaceMend_PasteBack")(flat, crops, alignment)
    assert torch.equal(out, flat) and float(blend.max()) == 0.0


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (1, 7, 5, 3), (1, 64, 48, 1), (1, 64, 48, 4), (64, 48, 3)])
def test_tiny_gray_rgba_and_unbatched_images(mtcnn, shape):
    img = torch.rand(shape)
    crops, alignment, count, _ = node_op("FaceMend_DetectAlign")(img, mtcnn)
    out, _ = node_op("FaceMend_PasteBack")(img, crops, alignment)
    assert out.shape[-1] == 3 and out.shape[1:3] == (shape[-3], shape[-2])


def test_nan_image_is_a_clear_error(mtcnn):
    img = torch.rand(1, 32, 32, 3)
    img[0, 3, 3, 1] = float("nan")
    with pytest.raises(InvalidImage, match="NaN"):
        node_op("FaceMend_DetectAlign")(img, mtcnn)


@pytest.mark.slow
def test_huge_image_is_detected_downscaled_and_cropped_full_size(mtcnn):
    import torch.nn.functional as F
    photo = load_image(need_shared("faces", "clean", "t1_six_faces.jpg"))
    huge = F.interpolate(photo, size=(6000, 8000), mode="bilinear", align_corners=False)
    crops, alignment, count, _ = node_op("FaceMend_DetectAlign")(_to_image(huge), mtcnn)
    assert count == 6
    # Boxes are in full-resolution coordinates (~6.25x the 1280 px photo's).
    assert float(alignment.boxes[:, 2].max()) > 3000


def test_paste_rejects_crops_from_another_detection(mtcnn):
    img = _to_image(load_image(need_shared("faces", "clean", "t1_six_faces.jpg")))
    crops, alignment, _, _ = node_op("FaceMend_DetectAlign")(img, mtcnn)
    with pytest.raises(InvalidImage, match="6 aligned faces"):
        node_op("FaceMend_PasteBack")(img, crops[:2], alignment)


def test_loader_errors_name_the_file(tmp_path, monkeypatch):
    from facemend.host import model_paths

    (tmp_path / "facedetection").mkdir()
    model_paths.set_models_dirs([str(tmp_path)])
    try:
        with pytest.raises(ModelFileNotFound, match="detection_Resnet50_Final.pth") as err:
            node_op("FaceMend_DetectorLoader")("detection_Resnet50_Final.pth")
        assert "github.com/xinntao/facexlib" in str(err.value) and "facedetection" in str(err.value)
        (tmp_path / "facedetection" / "broken.pth").write_bytes(b"PK\x03\x04 truncated")
        with pytest.raises(ModelFileInvalid, match="broken.pth"):
            node_op("FaceMend_DetectorLoader")("broken.pth")
        torch.save({"conv_body.weight": torch.zeros(3, 3)}, tmp_path / "facedetection" / "other.pth")
        with pytest.raises(ModelFileInvalid, match="other.pth"):
            node_op("FaceMend_DetectorLoader")("other.pth")
    finally:
        model_paths.set_models_dirs([])
