"""Restorer loader + restore nodes and the `fast` preset, with a small GFPGAN (v1.4 layout, 64 px, narrow 0.25)
saved as the official checkpoint ({'params_ema': ...}) in a models folder."""
import pytest
import torch

from facemend.cli import main
from facemend.host import model_paths
from facemend.ops import restore as op
from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean

from conftest import need_shared, node_class, reorder_tol


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "facerestore_models").mkdir()
    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(out_size=64, num_style_feat=64, narrow=0.25))
    torch.save({"params_ema": net.state_dict()}, root / "facerestore_models" / "tiny_gfpgan.pth")
    model_paths.set_models_dirs([str(root)])
    yield root
    model_paths.set_models_dirs([])


def test_restore_node_keeps_size_order_and_visibility(models_dir):
    assert "tiny_gfpgan.pth" in op.restorer_files()
    restorer, = op.OPS["FaceMend_RestorerLoader"](model="tiny_gfpgan.pth", precision="fp32")
    faces = torch.rand(3, 96, 96, 3)
    out, = op.restore_faces(faces, restorer, 1.0, 0.5, 2, 0)
    assert out.shape == faces.shape and torch.isfinite(out).all()
    single, = op.restore_faces(faces[1:2], restorer, 1.0, 0.5, 1, 0)
    # Batching does not change a face's result, beyond the network's own float32 rounding.
    from facemend.pipelines.restore.restorer import FaceRestorer

    path = str(models_dir / "facerestore_models" / "tiny_gfpgan.pth")
    x = faces[1:2].permute(0, 3, 1, 2)
    tol = reorder_tol(lambda dt: FaceRestorer.from_file(path, dtype=dt)(x.to(dt), seed=0))
    assert torch.allclose(out[1:2], single, rtol=0, atol=tol)
    same, = op.restore_faces(faces, restorer, 0.0, 0.5, 2, 0)
    assert torch.equal(same, faces)  # visibility 0: the input itself


def test_loader_lists_the_files_and_refuses_a_missing_one_before_the_run(models_dir):
    """The loader's choices are the folder's files; validate_inputs (run by ComfyUI when a prompt is queued, before
    anything executes) names a missing file, the folders searched and where to get it, and refuses names outside
    the model folders; it redoes ComfyUI's list check, which naming `model` there skips."""
    cls = node_class("FaceMend_RestorerLoader")
    assert "tiny_gfpgan.pth" in cls.GET_NODE_INFO_V1()["input"]["required"]["model"][1]["options"]
    assert cls.validate_inputs(model="tiny_gfpgan.pth") is True
    assert cls.validate_inputs() is True  # a linked input is not passed: nothing to check
    msg = cls.validate_inputs(model="GFPGANv1.4.pth")
    assert "'GFPGANv1.4.pth' was not found" in msg and str(models_dir / "facerestore_models") in msg
    assert "github.com/TencentARC/GFPGAN/releases" in msg
    (models_dir / "facerestore_models" / "notes.txt").write_text("not weights")  # there, but not a choice
    assert "'notes.txt' was not found" in cls.validate_inputs(model="notes.txt")
    assert "outside" in cls.validate_inputs(model="../secret.pth")
    assert "precision: 'fp8' is not one of" in cls.validate_inputs(model="tiny_gfpgan.pth", precision="fp8")


def test_loader_fingerprint_follows_the_file(models_dir):
    """Re-queued with the same file, the loader is not run again; new weights under the same name load again."""
    cls = node_class("FaceMend_RestorerLoader")
    path = models_dir / "facerestore_models" / "tiny_gfpgan.pth"
    before = cls.fingerprint_inputs(model="tiny_gfpgan.pth", precision="fp32")
    assert cls.fingerprint_inputs(model="tiny_gfpgan.pth", precision="fp32") == before
    data = path.read_bytes()
    path.write_bytes(data + b"\0")  # a replaced file (size and mtime change)
    try:
        assert cls.fingerprint_inputs(model="tiny_gfpgan.pth", precision="fp32") != before
    finally:
        path.write_bytes(data)


def test_restore_node_previews_the_restored_faces(models_dir, preview_dir):
    import numpy as np
    from PIL import Image

    cls = node_class("FaceMend_RestoreFaces")
    restorer, = op.OPS["FaceMend_RestorerLoader"](model="tiny_gfpgan.pth", precision="fp32")
    faces = torch.rand(2, 64, 64, 3)
    result = cls.execute(faces, restorer, 1.0, 0.5, 1, 0)
    out = result.result[0]
    shown = result.ui.as_dict()["images"]
    assert [s["type"] for s in shown] == ["temp", "temp"]
    for face, ref in zip(out, shown):  # each restored face, as an 8-bit PNG (ComfyUI truncates: under one level)
        png = np.asarray(Image.open(preview_dir / ref["subfolder"] / ref["filename"])).astype(np.float32) / 255
        assert np.abs(png - face.numpy()).max() < 1 / 255


def test_fast_preset_cli_restores_a_photo(models_dir, tmp_path):
    photo = need_shared("faces", "whole_lq_real", "00.jpg")
    code = main(["--device", "cpu", "restore", str(photo), "-o", str(tmp_path), "--preset", "fast",
                 "--restorer", "tiny_gfpgan.pth", "--precision", "fp32"])
    assert code == 0 and (tmp_path / "00.png").exists()
