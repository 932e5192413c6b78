"""Restorer loader + restore nodes and the `fast` preset, with a small GFPGAN (v1.4 layout, 64 px, narrow 0.25)
saved as the official checkpoint ({'params_ema': ...}) in a models folder."""
import pytest
import torch

import facemend
from facemend.cli import main
from facemend.host import model_paths
from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean

from conftest import need_shared, reorder_tol


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
    loader = facemend.NODE_CLASS_MAPPINGS["FaceMend_RestorerLoader"]()
    assert "tiny_gfpgan.pth" in loader.INPUT_TYPES()["required"]["model"][0]
    restorer, = loader.load("tiny_gfpgan.pth", "fp32")
    node = facemend.NODE_CLASS_MAPPINGS["FaceMend_RestoreFaces"]()
    faces = torch.rand(3, 96, 96, 3)
    out, = node.run(faces, restorer, 1.0, 0.5, 2, 0)
    assert out.shape == faces.shape and torch.isfinite(out).all()
    single, = node.run(faces[1:2], restorer, 1.0, 0.5, 1, 0)
    # Batching does not change a face's result, beyond the network's own float32 rounding.
    from facemend.pipelines.restore.restorer import FaceRestorer

    path = str(models_dir / "facerestore_models" / "tiny_gfpgan.pth")
    x = faces[1:2].permute(0, 3, 1, 2)
    tol = reorder_tol(lambda dt: FaceRestorer.from_file(path, dtype=dt)(x.to(dt), seed=0))
    assert torch.allclose(out[1:2], single, rtol=0, atol=tol)
    same, = node.run(faces, restorer, 0.0, 0.5, 2, 0)
    assert torch.equal(same, faces)  # visibility 0: the input itself


def test_fast_preset_cli_restores_a_photo(models_dir, tmp_path):
    photo = need_shared("faces", "whole_lq_real", "00.jpg")
    code = main(["--device", "cpu", "restore", str(photo), "-o", str(tmp_path), "--preset", "fast",
                 "--restorer", "tiny_gfpgan.pth", "--precision", "fp32"])
    assert code == 0 and (tmp_path / "00.png").exists()
