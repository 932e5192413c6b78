"""RestorerID nodes (ops/identity.py, nodes/identity.py) with tiny files in the official layouts in a models folder,
the embedded MTCNN on a real reference photo and a tiny ArcFace ONNX model."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from facemend.host import device as dev
from facemend.host import model_paths
from facemend.ops import identity as op
from facemend.pipelines.io.errors import Interrupted, ModelFileNotFound

from conftest import load_image, need_shared
from restorerid_models import models_dir  # noqa: F401  (the tiny model folder fixture)

pytest.importorskip("onnxruntime", reason="onnxruntime (optional extra 'iqa') not installed")

LOADER_ARGS = ("RestorerIDFull.ckpt", "ip-adapter-faceid-plus_sd15.bin", "CLIP-ViT-H-14-laion2B-s32B-b79K",
               "stable-diffusion-v1-5")


def run_op(node_id: str, **inputs):
    """What node `node_id` computes, without ComfyUI: its ops function."""
    from facemend.ops import node_ops

    return node_ops()[node_id](**inputs)


def _inputs(models_dir):
    rid = op.load_restorer_id(*LOADER_ARGS, "fp32")
    det = run_op("FaceMend_DetectorLoader", model="mtcnn (embedded)", precision="fp32")[0]
    idm = run_op("FaceMend_IDModelLoader", model="models/buffalo_l/w600k_r50.onnx")[0]
    ref = load_image(need_shared("faces", "clean", "ffhq_00000000.png")).permute(0, 2, 3, 1)
    lq = load_image(need_shared("faces", "aligned_lq_real", "0143.png"))
    crops = torch.nn.functional.interpolate(lq, size=(32, 32), mode="area").repeat(2, 1, 1, 1).permute(0, 2, 3, 1)
    return rid, det, idm, ref, crops


def test_loader_lists_defaults_and_names_missing_files(models_dir, tmp_path):
    assert "RestorerIDFull.ckpt" in op.checkpoint_files()
    assert "CLIP-ViT-H-14-laion2B-s32B-b79K" in op.clip_vision_sources()
    model_paths.set_models_dirs([str(tmp_path)])  # an empty models folder
    try:
        for match in ("huggingface.co/YingJiacheng/RestorerID", "h94/IP-Adapter-FaceID"):
            with pytest.raises(ModelFileNotFound, match=match):
                op.load_restorer_id(*LOADER_ARGS)
            (tmp_path / "restorer_id").mkdir(exist_ok=True)
            (tmp_path / "restorer_id" / "RestorerIDFull.ckpt").write_bytes(b"x")
    finally:
        model_paths.set_models_dirs([str(models_dir)])


def test_loader_node_refuses_missing_files_before_the_run(models_dir, tmp_path):
    """validate_inputs names the missing file, the folders searched and where to get it before the graph runs
    (it used to fail inside the loader). Naming the combos there turns off ComfyUI's combo check: redone."""
    from conftest import node_class

    node = node_class("FaceMend_RestorerIDLoader")
    assert node.validate_inputs(*LOADER_ARGS) is True
    assert "not one of the choices" in node.validate_inputs("other.ckpt", *LOADER_ARGS[1:])
    model_paths.set_models_dirs([str(tmp_path)])  # an empty models folder: the defaults are still offered
    try:
        why = node.validate_inputs(*LOADER_ARGS)
        assert "'RestorerIDFull.ckpt' was not found in the 'restorer_id' folder" in why
        assert str(tmp_path / "restorer_id") in why and "huggingface.co/YingJiacheng/RestorerID" in why
        (tmp_path / "restorer_id").mkdir()
        (tmp_path / "restorer_id" / "RestorerIDFull.ckpt").write_bytes(b"x")
        assert "h94/IP-Adapter-FaceID" in node.validate_inputs(*LOADER_ARGS)
    finally:
        model_paths.set_models_dirs([str(models_dir)])


def test_loader_fingerprint_follows_the_files(models_dir):
    """Unchanged files: the same fingerprint (ComfyUI reuses the loaded model); a file replaced under the same name,
    also inside the CLIP folder, changes it (the loader runs again); precision too."""
    from conftest import node_class

    node = node_class("FaceMend_RestorerIDLoader")
    first = node.fingerprint_inputs(*LOADER_ARGS, "fp32")
    assert node.fingerprint_inputs(*LOADER_ARGS, "fp32") == first
    assert node.fingerprint_inputs(*LOADER_ARGS, "fp16") != first
    ckpt = models_dir / "restorer_id" / "RestorerIDFull.ckpt"
    clip_dir = models_dir / "clip_vision" / LOADER_ARGS[2]
    inner = next(p for p in sorted(clip_dir.rglob("*")) if p.is_file())
    for path in (ckpt, inner):
        st = path.stat()
        before = node.fingerprint_inputs(*LOADER_ARGS, "fp32")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))   # what a copy over it does
        try:
            assert node.fingerprint_inputs(*LOADER_ARGS, "fp32") != before, path
        finally:
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_adaptive_scale_node():
    assert round(op.adaptive_scale(27.6)[0], 3) == 0.164
    assert op.adaptive_scale(27.6, mode="fixed", fixed_scale=0.3)[0] == 0.3
    assert op.adaptive_scale(0.0, max_scale=1.2)[0] == 1.2


def test_restore_node_reports_scale_and_identity(models_dir):
    rid, det, idm, ref, crops = _inputs(models_dir)
    out, report = op.restore_with_reference(crops, rid, ref, det, idm, id_scale=0.4, seed=3, steps=2, cfg=4.0)
    assert out.shape == crops.shape
    r = json.loads(report)
    assert r["id_scale"] == [0.4, 0.4] and len(r["id_similarity_before"]) == 2 == len(r["id_similarity_after"])
    assert r["reference"][0]["faces_found"] >= 1
    again, _ = op.restore_with_reference(crops, rid, ref, det, idm, id_scale=0.4, seed=3, steps=2, cfg=4.0)
    assert torch.equal(out, again)


def test_restore_node_shows_faces_and_live_previews(models_dir, tmp_path, monkeypatch):
    """The restored faces on the node (ui images) and, hosted, each finished batch as the live preview: with one
    face per batch, the first face after its batch, the last face when all are done."""
    from conftest import node_class

    node = node_class("FaceMend_RestorerIDRestore")
    import folder_paths

    rid, det, idm, ref, crops = _inputs(models_dir)
    crops = torch.cat([crops[:1], crops[1:].flip(2)])                    # two different faces
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path))
    shown = []
    monkeypatch.setattr(dev, "is_hosted", lambda: True)
    monkeypatch.setattr(dev, "_reporter", lambda done, total, image: shown.append((done, total, image)))
    monkeypatch.setattr(dev, "PREVIEW_INTERVAL_S", 0.0)
    res = node.execute(crops, rid, ref, det, idm, id_scale=0.4, seed=3, steps=1, batch_size=1, scale_mode="fixed")
    out = res.result[0]
    files = res.ui.as_dict()["images"]
    assert len(files) == 2 and all((tmp_path / f["subfolder"] / f["filename"]).is_file() for f in files)
    previews = [(done, total, img) for done, total, img in shown if img is not None]
    assert [(done, total) for done, total, _ in previews] == [(1, 2), (2, 2)]   # after each batch (1 step each)
    assert torch.equal(previews[0][2], dev.preview_image(out[:1]))
    assert torch.equal(previews[1][2], dev.preview_image(out[1:]))


def test_restore_node_per_face_musiq_scale(models_dir):
    rid, det, idm, ref, crops = _inputs(models_dir)

    class FakeMusiq:  # the metric contract: score([N,3,H,W]) -> [N]
        def score(self, x):
            return x.mean((1, 2, 3)) * 0 + 27.6

    _, report = op.restore_with_reference(crops, rid, ref, det, idm, steps=1, musiq_metric=FakeMusiq())
    r = json.loads(report)
    assert r["musiq"] == [27.6, 27.6] and r["id_scale"] == [0.16365, 0.16365]


def test_restore_node_is_interruptible(models_dir):
    rid, det, idm, ref, crops = _inputs(models_dir)
    dev.request_interrupt()
    try:
        with pytest.raises(Interrupted):
            op.restore_with_reference(crops, rid, ref, det, idm, steps=3)
    finally:
        dev.clear_interrupt()


def test_adaptive_scale_node_refuses_an_unwired_musiq():
    """No default score: an unwired MUSIQ used to give 27.6 (always 0.164) without a word."""
    from conftest import node_class

    spec = node_class("FaceMend_AdaptiveIDScale").GET_NODE_INFO_V1()["input"]["required"]["musiq"][1]
    assert spec.get("forceInput") and "default" not in spec          # a socket, not a widget with a value
    with pytest.raises(ValueError, match="musiq input is not connected"):
        op.adaptive_scale()
    with pytest.raises(ValueError, match="not connected"):
        op.adaptive_scale(mode="fixed")


def test_restore_node_uses_musiq_weights_when_present_and_names_a_fixed_scale_otherwise(models_dir, tmp_path):
    """Nothing wired: the adaptive scale from MUSIQ's weights in models/facemend_iqa/ when they are there; else
    id_scale, and the report says which scale and why (it used to be 0.75 without a word)."""
    from test_identity_preset import _musiq_file

    from facemend.ops import quality

    rid, det, idm, ref, crops = _inputs(models_dir)
    _, report = op.restore_with_reference(crops, rid, ref, det, idm, id_scale=0.6, steps=1)
    r = json.loads(report)
    assert r["id_scale"] == [0.6, 0.6] and "musiq" not in r
    assert r["id_scale_source"].startswith("fixed id_scale 0.6: no musiq_metric wired and no MUSIQ weights")
    assert "musiq_koniq_ckpt-e95806b9.pth" in r["id_scale_source"]
    with pytest.raises(ModelFileNotFound, match="scale_mode adaptive needs MUSIQ"):
        op.restore_with_reference(crops, rid, ref, det, idm, steps=1, scale_mode="adaptive")
    _musiq_file(models_dir)
    try:
        _, report = op.restore_with_reference(crops, rid, ref, det, idm, id_scale=0.6, steps=1)
        r = json.loads(report)
        assert len(r["musiq"]) == 2 and r["id_scale_source"].startswith("adaptive from MUSIQ's weights")
        for m, s in zip(r["musiq"], r["id_scale"]):
            assert s == pytest.approx(math.exp((9.5 - m) / 10), rel=1e-4, abs=1e-5)   # the report's rounding
        _, report = op.restore_with_reference(crops, rid, ref, det, idm, id_scale=0.6, steps=1, scale_mode="fixed")
        r = json.loads(report)
        assert r["id_scale"] == [0.6, 0.6] and r["id_scale_source"] == "fixed id_scale 0.6 (scale_mode fixed)"
    finally:
        (models_dir / "facemend_iqa" / "musiq_koniq_ckpt-e95806b9.pth").unlink()
        quality._cache.clear()
