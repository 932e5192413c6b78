"""`python -m facemend evaluate`: per-image table, means, NTIRE score, low-ID count, JSON + CSV + PNG, on real
faces with the real NIQE parameters, a tiny ArcFace-shaped ONNX model and a random-weight FID Inception."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from facemend.cli import main
from facemend.ops import quality as N
from facemend.pipelines.io.images import write_image
from facemend.pipelines.quality.niqe import NIQE
from facemend.pipelines.quality.ntire_score import score_terms

from conftest import load_image, need_shared


@pytest.fixture
def setup(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("pytorch_fid")
    from torchvision.models.inception import Inception3

    models = tmp_path / "models"
    (models / "facemend_iqa").mkdir(parents=True)
    os.symlink(need_shared("models", "iqa", "niqe_pris_params.npz"), models / "facemend_iqa" / "niqe_pris_params.npz")
    torch.manual_seed(0)
    torch.save(Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict(),
               models / "facemend_iqa" / "pt_inception-2015-12-05-6726825d.pth")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 64))
    np.savez(models / "facemend_iqa" / "stats.npz", mu=rng.standard_normal(2048) * 0.1, sigma=a @ a.T / 64)
    arc = models / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx"
    arc.parent.mkdir(parents=True)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, 4), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(16 * 28 * 28, 512)).eval()
    torch.onnx.export(net, torch.rand(1, 3, 112, 112), str(arc), input_names=["input.1"],
                      output_names=["embedding"], dynamic_axes={"input.1": {0: "N"}}, dynamo=False)
    # outputs: two faces in an NTIRE subset folder, one at the top; inputs: blurred copies with the same names
    outputs, inputs = tmp_path / "out", tmp_path / "lq"
    (outputs / "CelebA").mkdir(parents=True)
    inputs.mkdir()
    names = [("CelebA/ffhq.png", ("clean", "ffhq_00000000.png")), ("CelebA/adele.png", ("aligned_lq_real", "Adele_crop.png")),
             ("julia.png", ("aligned_lq_real", "Julia_Roberts_crop.png"))]
    for rel, src in names:
        img = load_image(need_shared("faces", *src))[..., ::2, ::2][..., 32:224, 32:224]
        write_image(str(outputs / rel), img)
        lq = torch.nn.functional.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=False)
        write_image(str(inputs / os.path.basename(rel)), lq)
    N._cache.clear()
    yield models, outputs, inputs, tmp_path / "report"
    N._cache.clear()


def test_evaluate_writes_table_means_score_and_chart(setup, capsys):
    models, outputs, inputs, report_dir = setup
    code = main(["--models-dir", str(models), "--device", "cpu", "evaluate", str(outputs), "--inputs", str(inputs),
                 "-o", str(report_dir), "--metrics", "niqe", "--id-model", "models/buffalo_l/w600k_r50.onnx",
                 "--fid-stats", "stats.npz", "--id-threshold", "0.999", "--qalign", "4.5"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((report_dir / "report.json").read_text())
    rows = {r["file"]: r for r in report["per_image"]}
    assert set(rows) == {"CelebA/ffhq.png", "CelebA/adele.png", "julia.png"}
    assert rows["CelebA/ffhq.png"]["dataset"] == "CelebA" and rows["julia.png"]["dataset"] is None
    # the per-image NIQE is the metric's value on the written file
    niqe = NIQE.from_file(str(models / "facemend_iqa" / "niqe_pris_params.npz"))
    # (the same computation on the same pixels, and JSON keeps a float exactly: equal)
    assert rows["julia.png"]["niqe"] == float(niqe(load_image(outputs / "julia.png")))
    # the NTIRE score is the formula of the means it has (NIQE + FID here) and says what is missing
    means = report["means"]
    # (the same terms summed in the same order: equal)
    assert report["ntire"]["score"] == sum(score_terms(niqe=means["niqe"], fid=means["fid"], qalign=4.5).values())
    assert set(report["ntire"]["missing_terms"]) == {"clipiqa", "maniqa", "musiq"}
    assert report["external_means"] == {"qalign": 4.5}
    assert means["fid"] > 0
    # ID: blurred inputs vs sharp outputs are not identical: CelebA's 0.5 for two, the default 0.999 for julia
    gate = report["id_gate"]
    assert rows["julia.png"]["low_id"] == (rows["julia.png"]["id_sim"] < 0.999)
    assert all(rows[f]["low_id"] == (rows[f]["id_sim"] < 0.5) for f in ("CelebA/ffhq.png", "CelebA/adele.png"))
    assert gate["low_count"] == sum(r["low_id"] for r in rows.values()) and gate["passed"]
    # an ArcFace model is reported as the proxy it is, under the default protocol
    assert report["id_model"]["name"] == "ArcFace (proxy)" and not report["id_model"]["as_the_challenge"]
    assert report["protocol"]["name"] == "ntire2025" and gate["landmarks"] == {"template": 3}
    with open(report_dir / "per_image.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and {"file", "niqe", "id_sim", "low_id"} <= set(table[0])
    with Image.open(report_dir / "summary.png") as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 300
    assert "NTIRE score" in capsys.readouterr().out


def test_evaluate_errors_name_what_is_missing(setup, capsys):
    models, outputs, inputs, report_dir = setup
    os.remove(inputs / "julia.png")
    code = main(["--models-dir", str(models), "evaluate", str(outputs), "--inputs", str(inputs), "-o",
                 str(report_dir), "--id-model", "models/buffalo_l/w600k_r50.onnx"])
    assert code == 2 and "no input image named julia" in capsys.readouterr().err
    code = main(["--models-dir", str(models), "evaluate", str(outputs), "-o", str(report_dir), "--metrics", "musiq"])
    err = capsys.readouterr().err
    assert code == 2 and "musiq_koniq_ckpt-e95806b9.pth" in err


def test_explicit_model_paths_on_the_command_line(setup, capsys):
    """Loaders read only inside the models folders, but a path typed on the command line is the user's choice:
    --id-model and --fid-stats may name files anywhere (issue 11 item 13)."""
    models, outputs, inputs, report_dir = setup
    elsewhere = report_dir.parent / "elsewhere"
    elsewhere.mkdir()
    arc = elsewhere / "arcface.onnx"
    os.replace(models / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx", arc)
    os.replace(models / "facemend_iqa" / "stats.npz", elsewhere / "stats.npz")
    code = main(["--models-dir", str(models), "--device", "cpu", "evaluate", str(outputs), "--inputs", str(inputs),
                 "-o", str(report_dir), "--metrics", "niqe", "--id-model", str(arc),
                 "--fid-stats", str(elsewhere / "stats.npz")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((report_dir / "report.json").read_text())
    assert {"fid", "id_sim"} <= set(report["means"])
