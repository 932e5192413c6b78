"""In a real ComfyUI (COMFYUI_DIR): the shipped `facemend_osdface` API graph (the template's twin) runs through
/prompt with tiny OSDFace files in ComfyUI's models/diffusers/ and models/onestep_sr/osdface/ folders."""
import json

import pytest
from PIL import Image

pytest.importorskip("diffusers")

from conftest import ROOT, need_shared  # noqa: E402
from test_comfyui_e2e import _get, comfyui, run_prompt  # noqa: E402,F401  (the server fixture)

pytestmark = pytest.mark.comfyui


def test_osdface_workflow_runs_in_comfyui(comfyui):  # noqa: F811
    from osdface_models import make_osdface

    url, base = comfyui
    make_osdface(str(base / "models"), base_name="stable-diffusion-2-1-base")
    photo = Image.open(need_shared("faces", "clean", "ffhq_00000000.png")).convert("RGB").resize((256, 256))
    photo.save(base / "input" / "example.png")
    info = _get(url + "/object_info/FaceMend_OSDFaceLoader", timeout=60)["FaceMend_OSDFaceLoader"]
    assert "osdface" in info["input"]["required"]["osdface_folder"][1]["options"]  # a V3 combo
    graph = json.loads((ROOT / "workflows" / "api" / "facemend_osdface.json").read_text())
    entry = run_prompt(url, graph, client_id="facemend-osdface")
    (img,) = [i for out in entry["outputs"].values() for i in out.get("images", []) if i["type"] == "output"]
    out = Image.open(base / "output" / img["subfolder"] / img["filename"])
    assert out.size == (256, 256)
