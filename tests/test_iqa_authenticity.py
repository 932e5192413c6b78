"""Authenticity check f(x) / f(f(x)) (pipelines/quality/authenticity.py; the FaceMend_Authenticity node: ops/quality.py
computes it, nodes/quality.py shows its result)."""
import json

import pytest
import torch

from facemend.host import model_paths
from facemend.host import device as dev
from facemend.ops import quality as N
from facemend.pipelines.quality.authenticity import authenticity
from facemend.pipelines.quality.metrics import SPECS, IQAMetric
from facemend.pipelines.quality.niqe import NIQE

from conftest import load_image, need_shared, node_class, restorer_reorder_tol


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
        fx, ffx, gain, drift, report = N.check_authenticity(image, restorer, niqe, id_model=id_model, seed=3)
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


class _NoisyRestorer:
    """A FaceRestorer stand-in (same call) that adds fresh noise on every pass."""
    device = torch.device("cpu")

    def __init__(self):
        self.passes = 0

    def __call__(self, x, fidelity=0.5, seed=0, callback=None):
        self.passes += 1
        out = (x + torch.randn(x.shape, generator=torch.Generator().manual_seed(self.passes)) * 0.06).clamp(0, 1)
        if callback is not None:
            callback(x.shape[0])
        return out


def test_authenticity_shows_fx_then_ffx_as_progress_previews(faces, niqe, monkeypatch):
    """Hosted, the node's live preview shows f(x) as soon as it is made, then f(f(x)); standalone (no preview
    wanted) nothing is made for it."""
    shown, asked = [], []

    class Recording(dev.Progress):
        def wants_preview(self):
            asked.append(1)
            return wanting

        def update(self, n=1, preview=None):
            if preview is not None:
                shown.append(preview.clone())
            super().update(n)

    monkeypatch.setattr(dev, "Progress", Recording)
    wanting = False
    N.check_authenticity(faces.permute(0, 2, 3, 1), _NoisyRestorer(), niqe)
    assert len(asked) == 2 and shown == []
    wanting = True
    fx, ffx, *_ = N.check_authenticity(faces.permute(0, 2, 3, 1), _NoisyRestorer(), niqe)
    assert len(shown) == 2
    assert torch.equal(shown[0].permute(0, 2, 3, 1), fx) and torch.equal(shown[1].permute(0, 2, 3, 1), ffx)


def test_authenticity_node_shows_fx_beside_ffx(faces, niqe, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    cls = node_class("FaceMend_Authenticity")
    import folder_paths

    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    out = cls.execute(face_crops=faces.permute(0, 2, 3, 1), restorer=_NoisyRestorer(), metric=niqe)
    fx, ffx = out.args[:2]
    assert len(out.args) == 5 and not torch.equal(fx, ffx)
    (saved,) = out.ui.as_dict()["images"]  # one face: f(x) | f(f(x)), 192 x 384, shown at full size
    png = np.asarray(Image.open(tmp_path / saved["subfolder"] / saved["filename"]))
    side_by_side = torch.cat([fx, ffx], dim=2)[0].numpy()
    assert np.array_equal(png, np.clip(255.0 * side_by_side, 0, 255).astype(np.uint8))
