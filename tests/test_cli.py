"""The CLI / Python API: demo, restore of files and folders, errors, interruption."""
import json

import pytest
import torch

from facemend.cli import main, run_demo
from facemend.host import device as dev
from facemend.pipelines.errors import Interrupted

from conftest import need_shared


def test_demo_writes_its_images_and_finds_the_face(tmp_path):
    pytest.importorskip("skimage")
    summary = run_demo(str(tmp_path / "demo"), device="cpu", log=lambda *_: None)
    assert summary["faces"] == 1
    assert {"astronaut_degraded.png", "astronaut_restored.png", "astronaut_before_after.png"} <= set(summary["outputs"])
    assert summary["psnr_restored_db"] >= summary["psnr_degraded_db"] - 0.05  # never worse than the input


def test_restore_folder_with_report(tmp_path, capsys):
    photo = need_shared("faces", "clean", "t1_six_faces.jpg")
    out = tmp_path / "out"
    code = main(["--device", "cpu", "restore", str(photo.parent), "-o", str(out), "--report", str(tmp_path / "r.json")])
    assert code == 0
    written = sorted(p.name for p in out.iterdir())
    assert "t1_six_faces.png" in written and not any(".part" in n for n in written)
    report = {r["input"].split("/")[-1]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert sum(report["t1_six_faces.jpg"]["faces"]) == 6


def test_missing_restorer_is_an_error_naming_the_file(tmp_path, capsys):
    photo = need_shared("faces", "clean", "t1_six_faces.jpg")
    code = main(["--models-dir", str(tmp_path), "restore", str(photo), "-o", str(tmp_path / "o"), "--preset", "fast"])
    assert code == 2
    err = capsys.readouterr().err
    assert "GFPGANv1.4.pth" in err and "facerestore_models" in err and "github.com/TencentARC" in err


def test_interrupt_stops_the_node_and_leaves_no_output():
    import facemend

    detector = facemend.NODE_CLASS_MAPPINGS["FaceMend_DetectorLoader"]().load("mtcnn (embedded)")[0]
    dev.request_interrupt()
    with pytest.raises(Interrupted):
        facemend.NODE_CLASS_MAPPINGS["FaceMend_DetectAlign"]().run(torch.rand(1, 64, 64, 3), detector)
    # The flag is consumed: the next run works.
    assert facemend.NODE_CLASS_MAPPINGS["FaceMend_DetectAlign"]().run(torch.rand(1, 64, 64, 3), detector)[2] == 0
