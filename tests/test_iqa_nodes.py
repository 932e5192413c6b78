"""IQA nodes: what they compute (ops/quality.py: NIQE loader/score on real faces, missing-file errors, ID similarity
with an exported tiny ArcFace-shaped ONNX model, best-of selection with and without the ID gate) and their V3 side
(nodes/quality.py through ComfyUI's node API: validation before a run, file fingerprints, previews)."""
import json
import os
import sys

import numpy as np

import pytest
import torch

from facemend.host import model_paths
from facemend.ops import quality as N
from facemend.pipelines.quality.best_of import select_best
from facemend.pipelines.io.errors import FaceMendError, ModelFileNotFound

from conftest import load_image, need_shared, node_class


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
    return N.load_id_model("models/buffalo_l/w600k_r50.onnx")[0]


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
    metric = N.load_metric("niqe")[0]
    assert metric.name == "niqe" and metric.lower_better
    mean, report = N.iqa_score(_image(torch.cat([clean, blur])), metric, batch_size=3)
    report = json.loads(report)
    assert len(report["scores"]) == 4 and report["lower_better"] is True
    assert mean == pytest.approx(sum(report["scores"]) / 4, abs=1e-4)
    assert report["scores"][0] < report["scores"][2]  # the clean face scores better than its blurred copy
    assert N.load_metric("niqe")[0] is metric  # cached


def test_missing_weights_name_the_file_and_where_to_get_it(tmp_path):
    model_paths.set_models_dirs([str(tmp_path)])
    try:
        with pytest.raises(ModelFileNotFound) as err:
            N.load_metric("niqe")
        assert "niqe_pris_params.npz" in str(err.value) and "facemend_iqa" in str(err.value)
        assert "BasicSR" in str(err.value)
        with pytest.raises(ModelFileNotFound, match="(?s)musiq_koniq_ckpt-e95806b9.pth.*huggingface.co"):
            N.load_metric("musiq")
        with pytest.raises(ModelFileNotFound, match="w600k_r50.onnx"):
            N.load_id_model("models/buffalo_l/w600k_r50.onnx")
        with pytest.raises(FaceMendError, match="15 GB"):
            N.open_metric("qalign")
    finally:
        model_paths.set_models_dirs([])


def test_best_of_picks_the_best_candidate_per_face(models_dir, faces):
    clean, blur, noise = faces
    metric = N.load_metric("niqe")[0]
    # the clean face sits in a different slot for each face
    c1 = torch.stack([blur[0], clean[1]])
    c2 = torch.stack([clean[0], noise[1]])
    c3 = torch.stack([noise[0], blur[1]])
    best, report = N.best_of(_image(c1), _image(c2), metric, candidates_3=_image(c3))
    report = json.loads(report)
    assert [f["chosen"] for f in report["faces"]] == [1, 0]
    assert torch.equal(best, _image(clean))  # a chosen candidate is passed on as it is


def test_best_of_id_gate_excludes_a_better_scoring_other_person(models_dir, faces):
    clean, blur, _ = faces
    id_model = _export_arcface(models_dir)
    metric = N.load_metric("niqe")[0]
    inputs = clean[1:]  # Adele
    same_blurred, other_clean = blur[1:], clean[:1]  # Adele blurred (worse NIQE) vs the FFHQ face (another person)
    sims = [float(id_model.similarity(inputs, c)) for c in (same_blurred, other_clean)]
    assert sims[0] > sims[1]
    threshold = (sims[0] + sims[1]) / 2
    _, ungated = N.best_of(_image(same_blurred), _image(other_clean), metric)
    assert json.loads(ungated)["faces"][0]["chosen"] == 1  # the other person's sharp face scores better
    best, gated = N.best_of(_image(same_blurred), _image(other_clean), metric, input_faces=_image(inputs),
                                 id_model=id_model, id_threshold=threshold)
    face = json.loads(gated)["faces"][0]
    assert face["chosen"] == 0 and face["passed_id_gate"] == [True, False] and face["gate"] == "ok"
    assert torch.equal(best, _image(same_blurred))
    with pytest.raises(Exception, match="both input_faces and id_model"):
        N.best_of(_image(same_blurred), _image(other_clean), metric, id_model=id_model)


def test_select_best_when_no_candidate_passes_takes_the_closest_identity():
    scores = torch.tensor([[5.0, 1.0], [3.0, 2.0]])
    sims = torch.tensor([[0.2, 0.9], [0.4, 0.9]])
    choice, report = select_best(scores, lower_better=True, id_sims=sims, id_threshold=0.5)
    assert choice.tolist() == [1, 0]
    assert report[0]["gate"] == "none passed" and report[1]["gate"] == "ok"


def test_id_similarity_node(models_dir, faces):
    clean, blur, _ = faces
    id_model = _export_arcface(models_dir)
    mean, low, report = N.id_similarity(_image(clean), _image(clean), id_model, threshold=0.6)
    assert mean == pytest.approx(1.0, abs=1e-5) and low == 0
    mean, low, report = N.id_similarity(_image(clean), _image(clean.flip(0)), id_model, threshold=0.9999)
    report = json.loads(report)
    assert low == 2 and report["low"] == [True, True] and mean < 0.9999


# ------------------------------------------------------------------------------------ the V3 nodes (ComfyUI's API)

def test_loaders_refuse_a_missing_file_or_package_before_the_run(models_dir, monkeypatch):
    """validate_inputs: what used to fail in the middle of a run is said when the prompt is queued, with the file,
    the folders searched and where to get it (or the package to install); ComfyUI's own combo check, which it
    skips for the inputs validate_inputs names, is redone; an input fed by a link (None) is left to the run."""
    import inspect

    iqa, idl = node_class("FaceMend_IQALoader"), node_class("FaceMend_IDModelLoader")
    assert iqa.validate_inputs(metric="niqe", weights_file="default") is True  # niqe_pris_params.npz is there
    msg = iqa.validate_inputs(metric="musiq", weights_file="default")
    assert "musiq_koniq_ckpt-e95806b9.pth" in msg and str(models_dir / "facemend_iqa") in msg
    assert "huggingface.co" in msg
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # as if the optional 'iqa' extra were not installed
    msg = iqa.validate_inputs(metric="musiq", weights_file="default")
    assert "pyiqa is not installed" in msg and "pip install --no-deps pyiqa" in msg
    assert iqa.validate_inputs(metric="niqe", weights_file="default") is True  # NIQE is ours: no pyiqa needed
    assert "'qalign' is not one of" in iqa.validate_inputs(metric="qalign", weights_file="default")
    assert "'x.pth' is not one of" in iqa.validate_inputs(metric="niqe", weights_file="x.pth")
    assert iqa.validate_inputs(metric=None, weights_file="default") is True
    # Every input named is checked here (ComfyUI then checks none of them): niqe_variant's choices too.
    assert inspect.getfullargspec(iqa.validate_inputs).args[1:] == ["metric", "weights_file", "niqe_variant"]
    assert "'x' is not one of" in iqa.validate_inputs(metric="niqe", weights_file="default", niqe_variant="x")

    model = "models/buffalo_l/w600k_r50.onnx"
    msg = idl.validate_inputs(model=model)
    assert "w600k_r50.onnx" in msg and str(models_dir / "insightface") in msg and "buffalo_l.zip" in msg
    _export_arcface(models_dir)
    assert idl.validate_inputs(model=model) is True
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert "pip install onnxruntime" in idl.validate_inputs(model=model)
    assert idl.validate_inputs(model=None) is True


def test_best_of_refuses_half_an_id_gate_when_queued():
    """ComfyUI passes a wired link to validate_inputs as None and leaves an unwired optional input out."""
    best_of = node_class("FaceMend_BestOf")
    assert best_of.validate_inputs() is True and best_of.validate_inputs(input_faces=None, id_model=None) is True
    for half in ({"input_faces": None}, {"id_model": None}):
        assert "needs both input_faces and id_model" in best_of.validate_inputs(**half)


def test_loader_fingerprints_follow_the_files(tmp_path):
    """fingerprint_inputs: the same choice gives the same fingerprint (ComfyUI keeps the loaded model); new weights
    under the same file name give another (the loader runs again)."""
    import shutil

    (tmp_path / "facemend_iqa").mkdir()
    niqe = tmp_path / "facemend_iqa" / "niqe_pris_params.npz"
    shutil.copy(need_shared("models", "iqa", "niqe_pris_params.npz"), niqe)
    ada = tmp_path / "adaface" / "adaface_ir50_ms1mv2.ckpt"
    ada.parent.mkdir()
    ada.write_bytes(b"first weights")
    iqa, idl = node_class("FaceMend_IQALoader"), node_class("FaceMend_IDModelLoader")
    model_paths.set_models_dirs([str(tmp_path)])
    try:
        before = iqa.fingerprint_inputs(metric="niqe", weights_file="default")
        ada_before = idl.fingerprint_inputs(model=ada.name)
        assert iqa.fingerprint_inputs(metric="niqe", weights_file="default") == before
        assert iqa.fingerprint_inputs(metric="niqe", weights_file="niqe_pris_params.npz")[1] == before[1]
        assert idl.fingerprint_inputs(model=ada.name) == ada_before
        niqe.write_bytes(niqe.read_bytes() + b"\0")  # replaced by another file of that name
        ada.write_bytes(b"other weights, longer")
        assert iqa.fingerprint_inputs(metric="niqe", weights_file="default") != before
        assert idl.fingerprint_inputs(model=ada.name) != ada_before
    finally:
        model_paths.set_models_dirs([])


@pytest.fixture
def temp_folder(tmp_path, monkeypatch):
    """ComfyUI's temp folder (where node previews are written) in tmp_path."""
    node_class("FaceMend_BestOf")  # imports ComfyUI, or skips
    import folder_paths

    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "temp"))
    return tmp_path / "temp"


def test_best_of_node_shows_the_chosen_faces(models_dir, faces, temp_folder):
    from PIL import Image

    clean, blur, noise = faces
    metric = N.load_metric("niqe")[0]
    out = node_class("FaceMend_BestOf").execute(candidates_1=_image(torch.stack([blur[0], clean[1]])),
                                                candidates_2=_image(torch.stack([clean[0], noise[1]])), metric=metric)
    best = out.args[0]
    assert torch.equal(best, _image(clean))
    shown = out.ui.as_dict()["images"]
    assert len(shown) == 2  # one preview per face, the chosen one (256 px: shown at full size)
    for face, saved in zip(best, shown):
        png = np.asarray(Image.open(temp_folder / saved["subfolder"] / saved["filename"]))
        assert np.array_equal(png, np.clip(255.0 * face.numpy(), 0, 255).astype(np.uint8))
