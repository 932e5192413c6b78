"""benchmarks/gpu_check.py --dry-run: the steps a lent GPU will take, on the CPU at tiny sizes (kept short: one
graph, one precision, standalone and in ComfyUI's novram mode when a ComfyUI checkout is there)."""
import importlib.util
import json

import pytest

from comfy_servers import COMFYUI_DIR, comfyui_missing
from conftest import ROOT


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_takes_the_gpu_steps_and_lists_what_it_skipped(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    pytest.importorskip("onnxruntime")
    gc = _gpu_check()
    hosted = comfyui_missing() is None
    argv = ["--dry-run", "--parts", "graphs,diff", "--graphs", "fast", "--dtypes", "bf16", "--out", str(tmp_path),
            "--modes", "standalone,comfy-novram", "--comfyui", COMFYUI_DIR if hosted else ""]
    result = gc.main(argv)
    assert result["failures"] == 0 and result["device"] == "cpu"
    runs = [r for r in result["rows"] if r["part"] == "graphs" and "graph" in r]
    assert [(r["mode"], r["dtype"], r["size"]) for r in runs] == \
        [("standalone", "bf16", "tiny")] + ([("comfy-novram", "bf16", "tiny")] if hosted else [])
    assert all("error" not in r and r["finite"] and r["seconds"] > 0 and r["syncs"] is None for r in runs)
    if hosted:  # ComfyUI held FaceMend's models and could evict them all
        assert runs[1]["models_held_after_free"] == 0
    else:
        assert any(r.get("error", "").startswith("skipped: no ComfyUI") for r in result["rows"])
    diff = [r for r in result["rows"] if r["part"] == "diff"]
    assert {r["graph"] for r in diff} == {"fast"} and all(r["max_abs"] == 0.0 for r in diff)  # CPU against CPU
    for call in ("torch.cuda.set_sync_debug_mode", "torch.cuda.synchronize", "torch.cuda.get_device_name"):
        assert result["cuda_skipped"].get(call, 0) >= 1
    saved = json.loads((tmp_path / "gpu_check-dry-run.json").read_text())
    assert saved["failures"] == 0
    table = (tmp_path / "gpu_check-dry-run.md").read_text()
    assert "| fast | standalone | bf16 | tiny | ok |" in table and "CUDA-only calls skipped" in table
    assert all(r["steps"] > 0 for r in runs)  # progress units: the denominator of syncs per step


def test_unknown_part_and_missing_cuda_are_refused(tmp_path):
    gc = _gpu_check()
    with pytest.raises(SystemExit, match="unknown part"):
        gc.main(["--dry-run", "--parts", "graphs,nope", "--out", str(tmp_path)])
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--dry-run"):
            gc.main(["--device", "cuda", "--out", str(tmp_path)])


def test_speed_goal_figures_from_suite_rows():
    import torch

    gc = _gpu_check()
    cuda = torch.device("cuda")
    rows = [{"stage": "fast_preset", "case": "t1", "ours_s": 0.5, "ratio": 3.0, "note": ""},
            {"stage": "restore", "case": "GFPGAN v1.4, batch 512", "ours_s": 2.0, "ratio": None,
             "note": "41 GFLOP/face; 31% of the bf16 peak"},
            {"stage": "onestep", "case": "tsdsr 512, real-size random", "ours_s": 0.25, "ratio": None, "note": ""},
            {"stage": "zssr", "case": "x2", "ours_s": 3.0, "ratio": None, "note": ""}]
    assert [gc.speed_goal(r, cuda) for r in rows] == [
        "fast preset 3.00x GFPGANer", "restore 31% of the bf16 peak", "0.250 s/face (tsdsr 512)",
        "10.0 ms/step (300 steps)"]
    result = {"argv": [], "device_name": "GPU", "date": "d", "failures": 0, "cuda_skipped": {},
              "rows": [{"part": "speed", **r, "goal": gc.speed_goal(r, cuda), "reference_s": None,
                        "faces_per_s": None, "peak_mib": None} for r in rows]}
    table = gc.markdown(result)
    assert "| zssr | x2 | 10.0 ms/step (300 steps) | 3.000 |" in table and "| graph |" not in table
