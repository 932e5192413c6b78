"""The quality nodes in a real ComfyUI (V3 schema): a missing model file is refused when the prompt is queued
(validate_inputs: /prompt answers 400 with the file, the folders searched and where to get it, instead of an
error in the middle of the run), and a valid graph runs, with Best-Of's chosen faces shown as the node's preview."""
import json
import os
import shutil
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from comfy_servers import ComfyServer, comfyui_missing, free_port, get_json
from conftest import need_shared

pytestmark = pytest.mark.comfyui
PORTS = (int(os.environ.get("FACEMEND_TEST_PORT_LO", "8400")), int(os.environ.get("FACEMEND_TEST_PORT_HI", "8500")))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One ComfyUI whose models folder holds only NIQE's parameters; a 256 px real face in its input folder."""
    reason = comfyui_missing()
    if reason:
        pytest.skip(reason)
    models = tmp_path_factory.mktemp("models")
    (models / "facemend_iqa").mkdir()
    shutil.copy(need_shared("models", "iqa", "niqe_pris_params.npz"), models / "facemend_iqa")
    s = ComfyServer(tmp_path_factory.mktemp("comfy"), free_port(*PORTS), models)
    try:
        s.wait_ready()
        face = Image.open(need_shared("faces", "clean", "ffhq_00000000.png")).convert("RGB")
        face.resize((256, 256), Image.BICUBIC).save(s.base / "input" / "face.png")
        yield s
    finally:
        s.stop()


def _queue(server, graph) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + "/prompt", data=json.dumps({"prompt": graph}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _details(answer, node) -> str:
    return " ".join(e["details"] for e in answer["node_errors"][node]["errors"])


FACE = {"class_type": "LoadImage", "inputs": {"image": "face.png"}}


def test_missing_model_files_are_refused_when_queued(server):
    status, answer = _queue(server, {
        "1": FACE,
        "2": {"class_type": "FaceMend_IQALoader", "inputs": {"metric": "musiq", "weights_file": "default"}},
        "3": {"class_type": "FaceMend_IQAScore", "inputs": {"image": ["1", 0], "metric": ["2", 0]}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
        "5": {"class_type": "FaceMend_IDModelLoader", "inputs": {"model": "models/buffalo_l/w600k_r50.onnx"}},
        "6": {"class_type": "FaceMend_IDSimilarity",
              "inputs": {"input_faces": ["1", 0], "restored_faces": ["1", 0], "id_model": ["5", 0]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 2]}},
    })
    assert status == 400 and set(answer["node_errors"]) >= {"2", "5"}
    musiq = _details(answer, "2")
    assert "musiq_koniq_ckpt-e95806b9.pth" in musiq and "huggingface.co" in musiq
    assert str(server.base / "models" / "facemend_iqa") in musiq  # the folder searched
    arcface = _details(answer, "5")
    assert "w600k_r50.onnx" in arcface and "buffalo_l.zip" in arcface


def test_best_of_runs_and_shows_the_chosen_face(server):
    status, answer = _queue(server, {
        "1": FACE,
        "2": {"class_type": "FaceMend_IQALoader", "inputs": {"metric": "niqe", "weights_file": "default"}},
        "3": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 4, "sigma": 2.0}},
        "4": {"class_type": "FaceMend_BestOf",
              "inputs": {"candidates_1": ["3", 0], "candidates_2": ["1", 0], "metric": ["2", 0]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    })
    assert status == 200, answer
    deadline = time.time() + 240
    while time.time() < deadline:
        entry = get_json(f"{server.url}/history/{answer['prompt_id']}").get(answer["prompt_id"])
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.5)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    report = json.loads(entry["outputs"]["5"]["text"][0])
    assert report["faces"][0]["chosen"] == 1  # the sharp face, not its blurred copy
    (shown,) = entry["outputs"]["4"]["images"]
    assert shown["type"] == "temp"
    png = np.asarray(Image.open(server.base / "temp" / shown["subfolder"] / shown["filename"])).astype(int)
    face = np.asarray(Image.open(server.base / "input" / "face.png")).astype(int)
    # LoadImage divides by 255, the preview multiplies back and truncates: at most one level lower.
    assert png.shape == face.shape and 0 <= (face - png).min() and (face - png).max() <= 1
