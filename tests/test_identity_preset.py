"""The id_preserve preset and CLI (--reference) with tiny RestorerID files, a tiny ArcFace and a random-weight
MUSIQ in the official layouts, on real photos from ../shared/faces."""
from __future__ import annotations

import json
import math

import pytest
import torch

from facemend import cli
from facemend.pipelines.io.errors import FaceMendError

from conftest import need_shared, rounding_bound
from restorerid_models import models_dir  # noqa: F401  (the tiny model folder fixture)

pytest.importorskip("onnxruntime", reason="onnxruntime (optional extra 'iqa') not installed")


def _musiq_file(root):
    pytest.importorskip("pyiqa", reason="MUSIQ needs pyiqa (optional extra 'iqa')")
    from facemend.pipelines.quality import metrics as M

    torch.manual_seed(0)
    (root / "facemend_iqa").mkdir(exist_ok=True)
    torch.save(M.build_pyiqa_net("musiq").state_dict(), root / "facemend_iqa" / M.SPECS["musiq"].file)


def test_preset_restores_a_photo_with_adaptive_scale_and_reports_it(models_dir, tmp_path):
    _musiq_file(models_dir)
    photo = need_shared("faces", "clean", "ffhq_00000000.png")
    ref = need_shared("faces", "aligned_lq_real", "0143.png")
    pipe = cli.build_pipeline("id_preserve", device="cpu", reference=[str(ref)], steps=2, crop_size=64)
    (report,) = cli.restore_files([str(photo)], str(tmp_path / "out"), pipe, log=lambda *a: None)
    r = report["restorer_id"]
    assert len(r["musiq"]) == sum(report["faces"]) == len(r["id_similarity_before"]) == len(r["id_similarity_after"])
    for musiq, scale in zip(r["musiq"], r["id_scale"]):
        want = math.exp((9.5 - musiq) / 10)
        # the report prints MUSIQ to 4 decimals (the scale moves by scale/10 per MUSIQ point) and the scale to 5;
        # the scale itself is a float32 rounding of the float64 formula
        tol = 0.5e-5 + want * 0.5e-4 / 10 + rounding_bound(2, want, evaluations=1)
        assert abs(scale - want) <= tol
    assert r["reference"][0]["reference"] == str(ref)
    assert (tmp_path / "out" / "ffhq_00000000.png").is_file()


def test_cli_needs_a_reference_and_names_a_photo_without_face(models_dir, tmp_path, capsys):
    photo = need_shared("faces", "clean", "ffhq_00000000.png")
    rc = cli.main(["--models-dir", str(models_dir), "restore", str(photo), "-o", str(tmp_path / "o"),
                   "--preset", "id_preserve", "--id-scale", "0.5"])
    assert rc == 2 and "--reference" in capsys.readouterr().err
    from PIL import Image

    Image.new("RGB", (128, 128), (120, 120, 120)).save(tmp_path / "blank.png")
    with pytest.raises(FaceMendError, match="blank.png.*no face"):
        cli.build_pipeline("id_preserve", device="cpu", reference=[str(tmp_path / "blank.png")], id_scale=0.5)


def test_cli_runs_with_a_fixed_scale(models_dir, tmp_path):
    photo = need_shared("faces", "clean", "ffhq_00000000.png")
    ref = need_shared("faces", "aligned_lq_real", "0143.png")
    pipe = cli.build_pipeline("id_preserve", device="cpu", reference=[str(ref), str(photo)], id_scale=0.5, steps=1,
                              crop_size=64)
    (report,) = cli.restore_files([str(photo)], str(tmp_path / "o"), pipe, log=lambda *a: None)
    assert report["restorer_id"]["musiq"] is None and set(report["restorer_id"]["id_scale"]) == {0.5}
    assert len(report["restorer_id"]["reference"]) == 2
    json.dumps(report)


def test_cli_without_musiq_weights_says_which_fixed_scale_it_uses(models_dir, tmp_path, capsys):
    """No --id-scale and no MUSIQ weights: RestorerID's training scale 0.75, said on stderr and in the report
    (before, a missing MUSIQ file stopped the run)."""
    from facemend.ops import quality
    from facemend.pipelines.quality import metrics as M

    musiq = models_dir / "facemend_iqa" / M.SPECS["musiq"].file
    away = tmp_path / "musiq.pth"
    if musiq.exists():
        musiq.rename(away)
    quality._cache.clear()
    try:
        photo = need_shared("faces", "clean", "ffhq_00000000.png")
        ref = need_shared("faces", "aligned_lq_real", "0143.png")
        pipe = cli.build_pipeline("id_preserve", device="cpu", reference=[str(ref)], steps=1, crop_size=64)
        err = capsys.readouterr().err
        assert "id_preserve: fixed id_scale 0.75: no MUSIQ weights" in err and M.SPECS["musiq"].file in err
        (report,) = cli.restore_files([str(photo)], str(tmp_path / "o"), pipe, log=lambda *a: None)
        r = report["restorer_id"]
        assert set(r["id_scale"]) == {0.75} and r["musiq"] is None
        assert r["id_scale_source"].startswith("fixed id_scale 0.75: no MUSIQ weights")
    finally:
        if away.exists():
            away.rename(musiq)
