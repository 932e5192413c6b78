"""RestorerID nodes (nodes/identity.py) with tiny files in the official layouts in a models folder, the embedded
MTCNN on a real reference photo and a tiny ArcFace ONNX model."""
from __future__ import annotations

import json
import math

import pytest
import torch

import facemend
from facemend.host import device as dev
from facemend.host import model_paths
from facemend.pipelines.io.errors import Interrupted, ModelFileNotFound

from conftest import load_image, need_shared
from restorerid_models import models_dir  # noqa: F401  (the tiny model folder fixture)

pytest.importorskip("onnxruntime", reason="onnxruntime (optional extra 'iqa') not installed")


def _node(nid):
    return facemend.NODE_CLASS_MAPPINGS[nid]()


def _inputs(models_dir):
    rid = _node("FaceMend_RestorerIDLoader").load("RestorerIDFull.ckpt", "ip-adapter-faceid-plus_sd15.bin",
                                                  "CLIP-ViT-H-14-laion2B-s32B-b79K", "stable-diffusion-v1-5", "fp32")[0]
    det = _node("FaceMend_DetectorLoader").load("mtcnn (embedded)", "fp32")[0]
    idm = _node("FaceMend_IDModelLoader").load("models/buffalo_l/w600k_r50.onnx")[0]
    ref = load_image(need_shared("faces", "clean", "ffhq_00000000.png")).permute(0, 2, 3, 1)
    lq = load_image(need_shared("faces", "aligned_lq_real", "0143.png"))
    crops = torch.nn.functional.interpolate(lq, size=(32, 32), mode="area").repeat(2, 1, 1, 1).permute(0, 2, 3, 1)
    return rid, det, idm, ref, crops


def test_loader_lists_defaults_and_names_missing_files(models_dir, tmp_path):
    spec = _node("FaceMend_RestorerIDLoader").INPUT_TYPES()["required"]
    assert "RestorerIDFull.ckpt" in spec["checkpoint"][0]
    assert "CLIP-ViT-H-14-laion2B-s32B-b79K" in spec["clip_vision"][0]
    model_paths.set_models_dirs([str(tmp_path)])  # an empty models folder
    try:
        for match in ("huggingface.co/YingJiacheng/RestorerID", "h94/IP-Adapter-FaceID"):
            with pytest.raises(ModelFileNotFound, match=match):
                _node("FaceMend_RestorerIDLoader").load(
                    "RestorerIDFull.ckpt", "ip-adapter-faceid-plus_sd15.bin", "CLIP-ViT-H-14-laion2B-s32B-b79K",
                    "stable-diffusion-v1-5")
            (tmp_path / "restorer_id").mkdir(exist_ok=True)
            (tmp_path / "restorer_id" / "RestorerIDFull.ckpt").write_bytes(b"x")
    finally:
        model_paths.set_models_dirs([str(models_dir)])


def test_adaptive_scale_node():
    node = _node("FaceMend_AdaptiveIDScale")
    assert round(node.run(27.6)[0], 3) == 0.164
    assert node.run(27.6, mode="fixed", fixed_scale=0.3)[0] == 0.3
    assert node.run(0.0, max_scale=1.2)[0] == 1.2


def test_restore_node_reports_scale_and_identity(models_dir):
    rid, det, idm, ref, crops = _inputs(models_dir)
    node = _node("FaceMend_RestorerIDRestore")
    out, report = node.run(crops, rid, ref, det, idm, id_scale=0.4, seed=3, steps=2, cfg=4.0)
    assert out.shape == crops.shape
    r = json.loads(report)
    assert r["id_scale"] == [0.4, 0.4] and len(r["id_similarity_before"]) == 2 == len(r["id_similarity_after"])
    assert r["reference"][0]["faces_found"] >= 1
    again, _ = node.run(crops, rid, ref, det, idm, id_scale=0.4, seed=3, steps=2, cfg=4.0)
    assert torch.equal(out, again)


def test_restore_node_per_face_musiq_scale(models_dir):
    rid, det, idm, ref, crops = _inputs(models_dir)

    class FakeMusiq:  # the metric contract: score([N,3,H,W]) -> [N]
        def score(self, x):
            return x.mean((1, 2, 3)) * 0 + 27.6

    _, report = _node("FaceMend_RestorerIDRestore").run(crops, rid, ref, det, idm, steps=1, musiq_metric=FakeMusiq())
    r = json.loads(report)
    assert r["musiq"] == [27.6, 27.6] and r["id_scale"] == [0.16365, 0.16365]


def test_restore_node_is_interruptible(models_dir):
    rid, det, idm, ref, crops = _inputs(models_dir)
    dev.request_interrupt()
    try:
        with pytest.raises(Interrupted):
            _node("FaceMend_RestorerIDRestore").run(crops, rid, ref, det, idm, steps=3)
    finally:
        dev.clear_interrupt()


def test_adaptive_scale_node_refuses_an_unwired_musiq():
    """No default score: an unwired MUSIQ used to give 27.6 (always 0.164) without a word."""
    node = _node("FaceMend_AdaptiveIDScale")
    spec = node.INPUT_TYPES()["required"]["musiq"][1]
    assert spec.get("forceInput") and "default" not in spec          # a socket, not a widget with a value
    with pytest.raises(ValueError, match="musiq input is not connected"):
        node.run()
    with pytest.raises(ValueError, match="not connected"):
        node.run(mode="fixed")


def test_restore_node_uses_musiq_weights_when_present_and_names_a_fixed_scale_otherwise(models_dir, tmp_path):
    """Nothing wired: the adaptive scale from MUSIQ's weights in models/facemend_iqa/ when they are there; else
    id_scale, and the report says which scale and why (it used to be 0.75 without a word)."""
    from test_identity_preset import _musiq_file

    from facemend.ops import quality

    rid, det, idm, ref, crops = _inputs(models_dir)
    node = _node("FaceMend_RestorerIDRestore")
    _, report = node.run(crops, rid, ref, det, idm, id_scale=0.6, steps=1)
    r = json.loads(report)
    assert r["id_scale"] == [0.6, 0.6] and "musiq" not in r
    assert r["id_scale_source"].startswith("fixed id_scale 0.6: no musiq_metric wired and no MUSIQ weights")
    assert "musiq_koniq_ckpt-e95806b9.pth" in r["id_scale_source"]
    with pytest.raises(ModelFileNotFound, match="scale_mode adaptive needs MUSIQ"):
        node.run(crops, rid, ref, det, idm, steps=1, scale_mode="adaptive")
    _musiq_file(models_dir)
    try:
        _, report = node.run(crops, rid, ref, det, idm, id_scale=0.6, steps=1)
        r = json.loads(report)
        assert len(r["musiq"]) == 2 and r["id_scale_source"].startswith("adaptive from MUSIQ's weights")
        for m, s in zip(r["musiq"], r["id_scale"]):
            assert s == pytest.approx(math.exp((9.5 - m) / 10), rel=1e-4, abs=1e-5)   # the report's rounding
        _, report = node.run(crops, rid, ref, det, idm, id_scale=0.6, steps=1, scale_mode="fixed")
        r = json.loads(report)
        assert r["id_scale"] == [0.6, 0.6] and r["id_scale_source"] == "fixed id_scale 0.6 (scale_mode fixed)"
    finally:
        (models_dir / "facemend_iqa" / "musiq_koniq_ckpt-e95806b9.pth").unlink()
        quality._cache.clear()
