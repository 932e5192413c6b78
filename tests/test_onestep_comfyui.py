"""In a real ComfyUI (COMFYUI_DIR): the one-step SR loader finds tiny TSD-SR files in ComfyUI's models/diffusers/
and models/onestep_sr/ folders, and an API graph LoadImage -> loader -> SR x2 -> SaveImage runs through /prompt (the
SR node showing its output); a graph naming missing files is refused at /prompt with the files named."""
import json
import urllib.error
import urllib.request

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
    assert "sd3-tiny" in info["input"]["required"]["base_model"][1]["options"]  # a V3 combo: ("COMBO", {options})
    assert "tsdsr" in info["input"]["required"]["lora"][1]["options"]
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
    (img,) = entry["outputs"]["4"]["images"]
    assert Image.open(base / "output" / img["subfolder"] / img["filename"]).size == (128, 96)
    (shown,) = entry["outputs"]["3"]["images"]  # the SR node's own preview of its output
    assert shown["type"] == "temp" and Image.open(base / "temp" / shown["subfolder"] / shown["filename"]).size == (
        128, 96)

    # The default SD3 folder is listed (so a missing one is named) but absent: /prompt refuses the graph before
    # anything runs, with the loader's own message naming the files and where to get them.
    graph["2"]["inputs"]["base_model"] = "stable-diffusion-3-medium-diffusers"
    req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": graph}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    refused = json.loads(err.value.read())
    errors = refused["node_errors"]["2"]["errors"]  # ComfyUI files the message under each input validate_inputs names
    assert {e["type"] for e in errors} == {"custom_validation_failed"} and "3" not in refused["node_errors"]
    error = errors[0]
    assert "TSD-SR: model files are missing" in error["details"] and "never downloads" in error["details"]
    assert str(base / "models" / "diffusers" / "stable-diffusion-3-medium-diffusers" / "vae") in error["details"]
