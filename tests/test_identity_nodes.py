"""RestorerID nodes (nodes/identity.py) with tiny files in the official layouts in a models folder, the embedded
MTCNN on a real reference photo and a tiny ArcFace ONNX model."""
from __future__ import annotations

import json

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
