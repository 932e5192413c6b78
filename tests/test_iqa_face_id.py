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
