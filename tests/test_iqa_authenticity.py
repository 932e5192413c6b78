"""Authenticity check f(x) / f(f(x)) (pipelines/quality/authenticity.py, the FaceMend_Authenticity node)."""
import json

import pytest
import torch

from facemend.host import model_paths
from facemend.nodes import quality as N
from facemend.pipelines.quality.authenticity import authenticity
from facemend.pipelines.quality.metrics import SPECS, IQAMetric
from facemend.pipelines.quality.niqe import NIQE

from conftest import load_image, need_shared, restorer_reorder_tol


@pytest.fixture(scope="module")
def niqe():
    return IQAMetric(SPECS["niqe"], NIQE.from_file(str(need_shared("models", "iqa", "niqe_pris_params.npz"))))


@pytest.fixture(scope="module")
def faces():
    return load_image(need_shared("faces", "clean", "ffhq_00000000.png"))[..., ::2, ::2][..., 32:224, 32:224]


def _noisy_restorer():
    """Adds fresh noise on every call: each pass degrades the face further."""
    calls = []

    def f(x):
        calls.append(1)
        g = torch.Generator().manual_seed(len(calls))
        return (x + torch.randn(x.shape, generator=g) * 0.06).clamp(0, 1)
    return f


def test_idempotent_restorer_is_authentic_and_a_degrading_one_is_not(niqe, faces):
    fx, ffx, report = authenticity(lambda t: t.clamp(0, 1), faces, niqe)
    assert torch.equal(fx, ffx) and report["authentic_faces"] == 1
    assert report["faces"][0]["quality_gain"] == pytest.approx(0.0, abs=1e-9)
    _, _, report = authenticity(_noisy_restorer(), faces, niqe)  # NIQE rises on each pass
    face = report["faces"][0]
    assert face["score_ffx"] > face["score_fx"] > face["score_x"]
    assert face["quality_gain"] < 0 and not face["authentic"]


def test_authenticity_node_with_a_restorer_and_id_model(tmp_path, faces, niqe):
    pytest.importorskip("onnxruntime")
    from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean
    from facemend.ops.restore import load_restorer

    (tmp_path / "facerestore_models").mkdir()
    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(out_size=64, num_style_feat=64, narrow=0.25))
    torch.save({"params_ema": net.state_dict()}, tmp_path / "facerestore_models" / "tiny_gfpgan.pth")
    arc = tmp_path / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx"
    arc.parent.mkdir(parents=True)
    onnx_net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, 4), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(16 * 28 * 28, 512)).eval()
    torch.onnx.export(onnx_net, torch.rand(1, 3, 112, 112), str(arc), input_names=["input.1"],
                      output_names=["embedding"], dynamic_axes={"input.1": {0: "N"}}, dynamo=False)
    model_paths.set_models_dirs([str(tmp_path)])
    N._cache.clear()
    try:
        restorer = load_restorer("tiny_gfpgan.pth", "fp32")
        id_model = N.open_id_model("models/buffalo_l/w600k_r50.onnx")
        image = faces.permute(0, 2, 3, 1)
        fx, ffx, gain, drift, report = N.Authenticity().run(image, restorer, niqe, id_model=id_model, seed=3)
    finally:
        model_paths.set_models_dirs([])
        N._cache.clear()
    report = json.loads(report)
    again = restorer(fx.permute(0, 3, 1, 2), seed=3)
    # f(f(x)) is the restorer applied to f(x), up to the network's own float32 rounding.
    tol = restorer_reorder_tol(restorer, fx.permute(0, 3, 1, 2), seed=3)
    assert torch.allclose(ffx.permute(0, 3, 1, 2), again, rtol=0, atol=tol)
    face = report["faces"][0]
    assert gain == pytest.approx(face["score_fx"] - face["score_ffx"], abs=1e-6)  # NIQE: lower is better
    assert drift == pytest.approx(1 - face["id_fx_ffx"], abs=1e-6)
    assert set(face) >= {"score_x", "score_fx", "score_ffx", "id_x_fx", "id_fx_ffx", "id_x_ffx", "authentic"}
