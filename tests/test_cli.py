"""The CLI / Python API: demo, restore of files and folders, errors, interruption."""
import json

import numpy as np
import pytest
import torch

from facemend.cli import main, run_demo
from facemend.host import device as dev
from facemend.pipelines.io.errors import Interrupted

from conftest import need_shared


def test_demo_restores_the_face_better_than_bicubic(tmp_path):
    """The README's demo: x2 downscaled astronaut -> demo preset (ZSSR on the face) beats bicubic x2 on the
    face and is never worse on the whole photo. (CI runs 60 steps; the default 200 gain more.)"""
    pytest.importorskip("skimage")
    summary = run_demo(str(tmp_path / "demo"), device="cpu", log=lambda *_: None, tune_steps=60)
    assert summary["faces"] == 1
    assert {"astronaut_degraded.png", "astronaut_restored.png", "astronaut_before_after.png"} <= set(summary["outputs"])
    from PIL import Image

    pair = np.asarray(Image.open(tmp_path / "demo" / "astronaut_before_after.png").convert("RGB"))
    w = (pair.shape[1] - 8) // 2
    for x0 in (0, w + 8):  # both halves carry their label: white text on a black box at the top left
        box = pair[:20, x0:x0 + 60]
        assert (box == 0).all(-1).mean() > 0.4 and (box > 200).all(-1).sum() > 10
    assert summary["face_psnr_restored_db"] > summary["face_psnr_bicubic_db"] + 0.3
    assert summary["psnr_restored_db"] >= summary["psnr_bicubic_db"]


def test_restore_folder_with_report(tmp_path, capsys):
    import shutil

    from PIL import Image

    photo = need_shared("faces", "clean", "t1_six_faces.jpg")
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photo, folder)
    Image.new("RGB", (40, 30), (90, 120, 150)).save(folder / "no_face.png")
    out = tmp_path / "out"
    code = main(["--device", "cpu", "restore", str(folder), "-o", str(out), "--report", str(tmp_path / "r.json"),
                 "--tune-steps", "4"])
    assert code == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["no_face.png", "t1_six_faces.png"]
    report = {r["input"].split("/")[-1]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert sum(report["t1_six_faces.jpg"]["faces"]) == 6 and sum(report["no_face.png"]["faces"]) == 0
    # The demo preset is an x2 face super-resolution: every output is twice the input size.
    assert Image.open(out / "t1_six_faces.png").size == tuple(2 * v for v in Image.open(photo).size)
    assert Image.open(out / "no_face.png").size == (80, 60)


def test_missing_restorer_is_an_error_naming_the_file(tmp_path, capsys):
    photo = need_shared("faces", "clean", "t1_six_faces.jpg")
    code = main(["--models-dir", str(tmp_path), "restore", str(photo), "-o", str(tmp_path / "o"), "--preset", "fast"])
    assert code == 2
    err = capsys.readouterr().err
    assert "GFPGANv1.4.pth" in err and "facerestore_models" in err and "github.com/TencentARC" in err


def test_interrupt_stops_the_node_and_leaves_no_output():
    from facemend.ops import face as op

    detector = op.load_face_detector("mtcnn (embedded)")
    dev.request_interrupt()
    with pytest.raises(Interrupted):
        op.detect_align(torch.rand(1, 64, 64, 3), detector)
    # The flag is consumed: the next run works.
    assert op.detect_align(torch.rand(1, 64, 64, 3), detector)[2] == 0
