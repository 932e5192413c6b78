"""In a real ComfyUI (COMFYUI_DIR): the shipped id_preserve API workflow runs through /prompt with tiny
RestorerID files, a tiny ArcFace and a random-weight MUSIQ in ComfyUI's own model folders (restorer_id/,
ipadapter/, clip_vision/, diffusers/, insightface/, facemend_iqa/)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from conftest import ROOT, need_shared  # noqa: E402
from test_comfyui_e2e import _get, comfyui, run_prompt  # noqa: E402,F401  (the server fixture)

pytestmark = pytest.mark.comfyui


def test_id_preserve_api_workflow_runs_in_comfyui(comfyui):  # noqa: F811
    pytest.importorskip("pyiqa")
    from facemend.pipelines.quality import metrics as M
    from restorerid_models import export_tiny_arcface, make_restorerid_files

    url, base = comfyui
    graph = json.loads((ROOT / "workflows" / "api" / "facemend_id_preserve.json").read_text())
    # No RestorerID files yet: /prompt refuses the graph at once, naming the file, the folders and where to get it
    # (the loader's validate_inputs), instead of failing after the nodes before it ran.
    errors = _refused(url, graph)["node_errors"][_node_id(graph, "FaceMend_RestorerIDLoader")]["errors"]
    assert any("'RestorerIDFull.ckpt' was not found in the 'restorer_id' folder" in e["details"]
               and "huggingface.co/YingJiacheng/RestorerID" in e["details"] for e in errors), errors
    models = base / "models"
    make_restorerid_files(str(models))
    (models / "insightface" / "models" / "buffalo_l").mkdir(parents=True)
    export_tiny_arcface(models / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx")
    (models / "facemend_iqa").mkdir()
    torch.manual_seed(0)
    torch.save(M.build_pyiqa_net("musiq").state_dict(), models / "facemend_iqa" / M.SPECS["musiq"].file)
    Image.open(need_shared("faces", "clean", "ffhq_00000000.png")).convert("RGB").resize((256, 256)).save(
        base / "input" / "example.png")
    Image.open(need_shared("faces", "aligned_lq_real", "0143.png")).convert("RGB").save(base / "input" / "reference.png")
    info = _get(url + "/object_info/FaceMend_RestorerIDLoader", timeout=60)["FaceMend_RestorerIDLoader"]
    kind, opts = info["input"]["required"]["clip_vision"]
    assert kind == "COMBO" and "CLIP-ViT-H-14-laion2B-s32B-b79K" in opts["options"]  # a V3 combo
    graph["4"]["inputs"]["image"] = "reference.png"  # the reference LoadImage (the template names example.png)
    for node in graph.values():  # a CPU-sized run of the same graph: 64 px crops, 2 steps
        if node["class_type"] == "FaceMend_DetectAlign":
            node["inputs"]["crop_size"] = 64
        if node["class_type"] == "FaceMend_RestorerIDRestore":
            node["inputs"]["steps"] = 2
    entry = run_prompt(url, graph, client_id="facemend-identity")
    (img,) = [i for out in entry["outputs"].values() for i in out.get("images", []) if i["type"] == "output"]
    result = Image.open(base / "output" / img["subfolder"] / img["filename"])
    assert result.size == (256, 256)
    assert np.asarray(result).std() > 1
    # the restored faces show on the RestorerID node (a preview in ComfyUI's temp folder)
    shown = entry["outputs"][_node_id(graph, "FaceMend_RestorerIDRestore")]["images"]
    assert shown and all(i["type"] == "temp" and (base / "temp" / i["subfolder"] / i["filename"]).is_file()
                         for i in shown)


def _node_id(graph: dict, class_type: str) -> str:
    (nid,) = [k for k, v in graph.items() if v["class_type"] == class_type]
    return nid


def _refused(url: str, graph: dict) -> dict:
    """POST a graph that /prompt must refuse (HTTP 400): its error answer."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": graph}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    return json.loads(err.value.read())
