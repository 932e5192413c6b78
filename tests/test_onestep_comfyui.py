"""In a real ComfyUI (COMFYUI_DIR): the one-step SR loader finds tiny TSD-SR files in ComfyUI's models/diffusers/
and models/onestep_sr/ folders, and an API graph LoadImage -> loader -> SR x2 -> SaveImage runs through /prompt."""
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from test_comfyui_e2e import _get, comfyui, run_prompt  # noqa: E402,F401  (the server fixture)

pytestmark = pytest.mark.comfyui


def test_onestep_graph_runs_in_comfyui(comfyui):  # noqa: F811
    from onestep_models import make_tsdsr

    url, base = comfyui
    make_tsdsr(str(base / "models"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(base / "input" / "small.png")
    info = _get(url + "/object_info/FaceMend_OneStepSRLoader", timeout=60)["FaceMend_OneStepSRLoader"]
    assert "sd3-tiny" in info["input"]["required"]["base_model"][0]
    assert "tsdsr" in info["input"]["required"]["lora"][0]
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
        "2": {"class_type": "FaceMend_OneStepSRLoader",
              "inputs": {"backend": "tsdsr", "base_model": "sd3-tiny", "lora": "tsdsr", "precision": "fp32"}},
        "3": {"class_type": "FaceMend_OneStepSR",
              "inputs": {"image": ["1", 0], "sr_model": ["2", 0], "scale": 2, "tile_size": 0, "tile_overlap": -1,
                         "seed": 0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "onestep"}},
    }
    entry = run_prompt(url, graph, client_id="facemend-onestep")
    (img,) = [i for out in entry["outputs"].values() for i in out.get("images", []) if i["type"] == "output"]
    assert Image.open(base / "output" / img["subfolder"] / img["filename"]).size == (128, 96)
