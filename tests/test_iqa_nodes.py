"""IQA nodes (nodes/quality.py) called as ComfyUI calls them: NIQE loader/score on real faces, missing-file errors,
ID similarity with an exported tiny ArcFace-shaped ONNX model, best-of selection with and without the ID gate."""
import json
import os

import pytest
import torch

from facemend.host import model_paths
from facemend.nodes import quality as N
from facemend.pipelines.quality.best_of import select_best
from facemend.pipelines.io.errors import FaceMendError, ModelFileNotFound

from conftest import load_image, need_shared


@pytest.fixture
def models_dir(tmp_path):
    """A models folder laid out as the pack expects: facemend_iqa/niqe_pris_params.npz (a link to ../shared's copy)
    and insightface/models/buffalo_l/w600k_r50.onnx (a tiny random network with ArcFace's I/O)."""
    iqa = tmp_path / "facemend_iqa"
    iqa.mkdir()
    os.symlink(need_shared("models", "iqa", "niqe_pris_params.npz"), iqa / "niqe_pris_params.npz")
    model_paths.set_models_dirs([str(tmp_path)])
    N._cache.clear()
    yield tmp_path
    model_paths.set_models_dirs([])
    N._cache.clear()


def _export_arcface(models_dir):
    pytest.importorskip("onnxruntime", reason="onnxruntime (optional extra 'iqa') not installed")
    path = models_dir / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, 4), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(16 * 28 * 28, 512)).eval()
    torch.onnx.export(net, torch.rand(1, 3, 112, 112), str(path), input_names=["input.1"],
                      output_names=["embedding"], dynamic_axes={"input.1": {0: "N"}}, dynamo=False)
    return N.IDModelLoader().load("models/buffalo_l/w600k_r50.onnx")[0]


def _image(t):  # [N,3,H,W] -> ComfyUI IMAGE
    return t.permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def faces():
    """Two real faces at 256 px and two degraded versions of each: [clean, blur, noise] x 2 faces."""
    names = (("clean", "ffhq_00000000.png"), ("aligned_lq_real", "Adele_crop.png"))
    clean = torch.cat([load_image(need_shared("faces", *n))[..., ::2, ::2] for n in names])
    blur = torch.nn.functional.avg_pool2d(clean, 5, stride=1, padding=2, count_include_pad=False)
    noise = (clean + torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)) * 0.1).clamp(0, 1)
    return clean, blur, noise


def test_niqe_loader_and_score_node(models_dir, faces):
    clean, blur, _ = faces
    metric = N.IQAMetricLoader().load("niqe")[0]
    assert metric.name == "niqe" and metric.lower_better
    mean, report = N.IQAScore().run(_image(torch.cat([clean, blur])), metric, batch_size=3)
    report = json.loads(report)
    assert len(report["scores"]) == 4 and report["lower_better"] is True
    assert mean == pytest.approx(sum(report["scores"]) / 4, abs=1e-4)
    assert report["scores"][0] < report["scores"][2]  # the clean face scores better than its blurred copy
    assert N.IQAMetricLoader().load("niqe")[0] is metric  # cached


def test_missing_weights_name_the_file_and_where_to_get_it(tmp_path):
    model_paths.set_models_dirs([str(tmp_path)])
    try:
        with pytest.raises(ModelFileNotFound) as err:
            N.IQAMetricLoader().load("niqe")
        assert "niqe_pris_params.npz" in str(err.value) and "facemend_iqa" in str(err.value)
        assert "BasicSR" in str(err.value)
        with pytest.raises(ModelFileNotFound, match="(?s)musiq_koniq_ckpt-e95806b9.pth.*huggingface.co"):
            N.IQAMetricLoader().load("musiq")
        with pytest.raises(ModelFileNotFound, match="w600k_r50.onnx"):
            N.IDModelLoader().load("models/buffalo_l/w600k_r50.onnx")
        with pytest.raises(FaceMendError, match="15 GB"):
            N.open_metric("qalign")
    finally:
        model_paths.set_models_dirs([])


def test_best_of_picks_the_best_candidate_per_face(models_dir, faces):
    clean, blur, noise = faces
    metric = N.IQAMetricLoader().load("niqe")[0]
    # the clean face sits in a different slot for each face
    c1 = torch.stack([blur[0], clean[1]])
    c2 = torch.stack([clean[0], noise[1]])
    c3 = torch.stack([noise[0], blur[1]])
    best, report = N.BestOf().run(_image(c1), _image(c2), metric, candidates_3=_image(c3))
    report = json.loads(report)
    assert [f["chosen"] for f in report["faces"]] == [1, 0]
    assert torch.equal(best, _image(clean))  # a chosen candidate is passed on as it is


def test_best_of_id_gate_excludes_a_better_scoring_other_person(models_dir, faces):
    clean, blur, _ = faces
    id_model = _export_arcface(models_dir)
    metric = N.IQAMetricLoader().load("niqe")[0]
    inputs = clean[1:]  # Adele
    same_blurred, other_clean = blur[1:], clean[:1]  # Adele blurred (worse NIQE) vs the FFHQ face (another person)
    sims = [float(id_model.similarity(inputs, c)) for c in (same_blurred, other_clean)]
    assert sims[0] > sims[1]
    threshold = (sims[0] + sims[1]) / 2
    _, ungated = N.BestOf().run(_image(same_blurred), _image(other_clean), metric)
    assert json.loads(ungated)["faces"][0]["chosen"] == 1  # the other person's sharp face scores better
    best, gated = N.BestOf().run(_image(same_blurred), _image(other_clean), metric, input_faces=_image(inputs),
                                 id_model=id_model, id_threshold=threshold)
    face = json.loads(gated)["faces"][0]
    assert face["chosen"] == 0 and face["passed_id_gate"] == [True, False] and face["gate"] == "ok"
    assert torch.equal(best, _image(same_blurred))
    with pytest.raises(Exception, match="both input_faces and id_model"):
        N.BestOf().run(_image(same_blurred), _image(other_clean), metric, id_model=id_model)


def test_select_best_when_no_candidate_passes_takes_the_closest_identity():
    scores = torch.tensor([[5.0, 1.0], [3.0, 2.0]])
    sims = torch.tensor([[0.2, 0.9], [0.4, 0.9]])
    choice, report = select_best(scores, lower_better=True, id_sims=sims, id_threshold=0.5)
    assert choice.tolist() == [1, 0]
    assert report[0]["gate"] == "none passed" and report[1]["gate"] == "ok"


def test_id_similarity_node(models_dir, faces):
    clean, blur, _ = faces
    id_model = _export_arcface(models_dir)
    mean, low, report = N.IDSimilarity().run(_image(clean), _image(clean), id_model, threshold=0.6)
    assert mean == pytest.approx(1.0, abs=1e-5) and low == 0
    mean, low, report = N.IDSimilarity().run(_image(clean), _image(clean.flip(0)), id_model, threshold=0.9999)
    report = json.loads(report)
    assert low == 2 and report["low"] == [True, True] and mean < 0.9999
