"""ArcFace ONNX ID similarity (pipelines/quality/id_similarity.py) with a tiny random ONNX model of ArcFace's I/O
([N,3,112,112] -> [N,512]) exported by the test: no insightface weights exist offline."""
import pytest
import torch

from facemend.pipelines.io.errors import ModelFileInvalid

pytest.importorskip("onnxruntime", reason="onnxruntime (optional extra 'iqa') not installed")
from facemend.pipelines.quality.id_similarity import ArcFaceONNX  # noqa: E402
from facemend.pipelines.face.geometry import face_template  # noqa: E402

from conftest import load_image, modules_reorder_tol, need_shared, rounding_bound  # noqa: E402


def _export(path, size=112, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, 4), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, 2),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(512)).eval()
    x = torch.rand(1, 3, size, size)
    net(x)
    torch.onnx.export(net, x, str(path), input_names=["input.1"], output_names=["embedding"],
                      dynamic_axes={"input.1": {0: "N"}, "embedding": {0: "N"}}, dynamo=False)
    return net


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("insightface") / "w600k_r50.onnx"
    net = _export(path)
    return ArcFaceONNX.from_file(str(path)), net


@pytest.fixture(scope="module")
def faces():
    names = ("Adele_crop.png", "Julia_Roberts_crop.png")
    return torch.cat([load_image(need_shared("faces", "aligned_lq_real", n))[..., ::2, ::2] for n in names])


def test_embedding_equals_the_exported_network(model):
    arc, net = model
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.normalize(net((x * 255 - 127.5) / 127.5), dim=1)
    # onnxruntime's float32 kernels sum in another order than torch's: reorder_tol's 4x torch's own measured
    # float32 error (against the network in float64) covers two float32 evaluations in different orders
    with torch.no_grad():
        tol = modules_reorder_tol(lambda n, x_: torch.nn.functional.normalize(n((x_ * 255 - 127.5) / 127.5), dim=1),
                                  net, x)
    assert (arc.embed(x) - expected.detach()).abs().max() < tol


def test_identical_faces_score_one_and_similar_beats_different(model, faces):
    arc, _ = model
    same = arc.similarity(faces, faces)
    # The cosine of an embedding with itself: a 512-term dot product of unit vectors (and their norms).
    assert torch.allclose(same, torch.ones(2), rtol=0, atol=rounding_bound(2 * 512 + 2, evaluations=1))
    noisy = (faces + torch.randn(faces.shape, generator=torch.Generator().manual_seed(0)) * 0.02).clamp(0, 1)
    close = arc.similarity(faces, noisy)
    other = arc.similarity(faces, faces.flip(0))
    assert (close > other).all(), (close, other)
    assert (close < 1).all()


def test_both_faces_are_warped_with_the_input_landmarks(model, faces):
    """Only the ArcFace crop around the input's landmarks is compared: changing the output outside that region
    changes nothing, changing it inside does; and landmarks default to the FFHQ template of aligned crops."""
    arc, _ = model
    a = faces[:1]
    lm = face_template(a.shape[-1])[None]
    outside = a.clone()
    outside[..., :12, :] = 0.0  # the top rows: forehead/hair, outside the 112 ArcFace crop
    inside = a.clone()
    inside[..., 110:150, 70:190] = 0.0  # over the eyes
    assert float(arc.similarity(a, outside, lm)) == pytest.approx(1.0, abs=rounding_bound(2 * 512 + 2, evaluations=1))
    assert float(arc.similarity(a, inside, lm)) < 0.999
    assert torch.equal(arc.similarity(a, inside), arc.similarity(a, inside, lm))  # the same landmarks, same path
    # other landmarks (a face shifted by 20 px in the input): the same pair compares another region
    assert float(arc.similarity(a, inside, lm + 20)) != pytest.approx(float(arc.similarity(a, inside, lm)), abs=1e-4)


def test_non_arcface_models_are_refused(tmp_path):
    path = tmp_path / "det_10g.onnx"
    _export(path, size=64)
    with pytest.raises(ModelFileInvalid, match=r"expected \[N,3,112,112\]"):
        ArcFaceONNX.from_file(str(path))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(ModelFileInvalid, match="Cannot load ONNX model"):
        ArcFaceONNX.from_file(str(junk))


# --- onnxruntime provider per device (issue 20): faked provider lists, the real session on the CPU underneath

class _Session:
    """onnxruntime.InferenceSession on the CPU that reports the providers a GPU session would have ended with."""

    ends_with: list = []
    asked: list = []
    real = None

    def __init__(self, path, sess_options=None, providers=None):
        type(self).asked.append(providers)
        self._real = type(self).real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    def get_providers(self):
        return list(type(self).ends_with)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def fake_ort(monkeypatch, tmp_path):
    import onnxruntime

    path = tmp_path / "w600k_r50.onnx"
    _export(path)
    _Session.asked, _Session.real = [], onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", _Session)
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    return str(path)


def test_provider_follows_the_device_and_the_log_says_which_runs(fake_ort, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="facemend")
    _Session.ends_with = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    arc = ArcFaceONNX.from_file(fake_ort, "cuda:1")
    assert _Session.asked[-1] == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert arc.provider == "CUDAExecutionProvider" and "runs on onnxruntime's CUDAExecutionProvider" in caplog.text
    _Session.ends_with = ["CPUExecutionProvider"]
    arc = ArcFaceONNX.from_file(fake_ort, "cpu")
    assert _Session.asked[-1] == ["CPUExecutionProvider"] and arc.provider == "CPUExecutionProvider"
    x = torch.rand(2, 3, 112, 112)
    assert arc.embed(x).shape == (2, 512)


def test_a_failed_cuda_provider_is_refused_not_replaced_by_the_cpu(fake_ort):
    from facemend.pipelines.io.errors import FaceMendError

    _Session.ends_with = ["CPUExecutionProvider"]     # what onnxruntime does when CUDA/cuDNN fail to load
    with pytest.raises(FaceMendError, match=r"w600k_r50.onnx.*cuda:0.*CUDA provider failed to start.*onnxruntime-gpu"):
        ArcFaceONNX.from_file(fake_ort, "cuda:0")


def test_cpu_only_package_on_a_cuda_device_runs_on_the_cpu_and_says_how_to_get_the_gpu_one(monkeypatch, caplog):
    from facemend.pipelines.quality.id_similarity import choose_providers

    with caplog.at_level("WARNING", logger="facemend"):
        got = choose_providers(torch.device("cuda", 0), ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert got == ["CPUExecutionProvider"]
    assert "runs on the CPU" in caplog.text and "onnxruntime-gpu" in caplog.text and "identity-gpu" in caplog.text
    assert choose_providers(torch.device("cpu"), ["CUDAExecutionProvider", "CPUExecutionProvider"]) == \
        ["CPUExecutionProvider"]
