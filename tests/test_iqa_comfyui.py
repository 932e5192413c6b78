"""The quality nodes in a real ComfyUI (V3 schema): a missing model file is refused when the prompt is queued
(validate_inputs: /prompt answers 400 with the file, the folders searched and where to get it, instead of an
error in the middle of the run), and valid graphs run: Best-Of's chosen faces shown as the node's preview, the
Authenticity check's f(x) as a live preview while it runs (the execution API) and f(x) | f(f(x)) when it is done."""
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
    """One ComfyUI whose models folder holds NIQE's parameters and a tiny random GFPGAN (nothing else); a 256 px
    real face in its input folder."""
    reason = comfyui_missing()
    if reason:
        pytest.skip(reason)
    import torch

    from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean

    models = tmp_path_factory.mktemp("models")
    (models / "facemend_iqa").mkdir()
    shutil.copy(need_shared("models", "iqa", "niqe_pris_params.npz"), models / "facemend_iqa")
    (models / "facerestore_models").mkdir()
    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(out_size=64, num_style_feat=64, narrow=0.25))
    torch.save({"params_ema": net.state_dict()}, models / "facerestore_models" / "tiny_gfpgan.pth")
    s = ComfyServer(tmp_path_factory.mktemp("comfy"), free_port(*PORTS), models)
    try:
        s.wait_ready()
        face = Image.open(need_shared("faces", "clean", "ffhq_00000000.png")).convert("RGB")
        face.resize((256, 256), Image.BICUBIC).save(s.base / "input" / "face.png")
        yield s
    finally:
        s.stop()


def _queue(server, graph, client_id="facemend-test") -> tuple[int, dict]:
    req = urllib.request.Request(server.url + "/prompt",
                                 data=json.dumps({"prompt": graph, "client_id": client_id}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _details(answer, node) -> str:
    return " ".join(e["details"] for e in answer["node_errors"][node]["errors"])


def _finished(server, status, answer) -> dict:
    """The history entry of a queued prompt once it has run, asserting it ran without error."""
    assert status == 200, answer
    deadline = time.time() + 240
    while time.time() < deadline:
        entry = get_json(f"{server.url}/history/{answer['prompt_id']}").get(answer["prompt_id"])
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.5)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    return entry


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


def test_best_of_with_half_an_id_gate_is_refused_when_queued(server):
    status, answer = _queue(server, {
        "1": FACE,
        "2": {"class_type": "FaceMend_IQALoader", "inputs": {"metric": "niqe", "weights_file": "default"}},
        "3": {"class_type": "FaceMend_IDModelLoader", "inputs": {"model": "models/buffalo_l/w600k_r50.onnx"}},
        "4": {"class_type": "FaceMend_BestOf", "inputs": {"candidates_1": ["1", 0], "candidates_2": ["1", 0],
                                                          "metric": ["2", 0], "id_model": ["3", 0]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    })
    # (The ID model file is missing too: each node says what is wrong with it.)
    assert status == 400 and "4" in answer["node_errors"]
    assert "needs both input_faces and id_model" in _details(answer, "4")


def test_best_of_runs_and_shows_the_chosen_face(server):
    status, answer = _queue(server, {
        "1": FACE,
        "2": {"class_type": "FaceMend_IQALoader", "inputs": {"metric": "niqe", "weights_file": "default"}},
        "3": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 4, "sigma": 2.0}},
        "4": {"class_type": "FaceMend_BestOf",
              "inputs": {"candidates_1": ["3", 0], "candidates_2": ["1", 0], "metric": ["2", 0]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
    })
    entry = _finished(server, status, answer)
    report = json.loads(entry["outputs"]["5"]["text"][0])
    assert report["faces"][0]["chosen"] == 1  # the sharp face, not its blurred copy
    (shown,) = entry["outputs"]["4"]["images"]
    assert shown["type"] == "temp"
    png = np.asarray(Image.open(server.base / "temp" / shown["subfolder"] / shown["filename"])).astype(int)
    face = np.asarray(Image.open(server.base / "input" / "face.png")).astype(int)
    # LoadImage divides by 255, the preview multiplies back and truncates: at most one level lower.
    assert png.shape == face.shape and 0 <= (face - png).min() and (face - png).max() <= 1


def test_authenticity_shows_fx_live_and_fx_beside_ffx_when_done(server):
    import io
    import struct
    import uuid

    from facemend.client.websocket import WebSocket

    client_id = uuid.uuid4().hex
    ws = WebSocket(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=120)
    try:
        # As the frontend does: previews with their node id go only to clients that say they read them.
        ws.send_text(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        while not (isinstance(m := ws.recv(), str) and json.loads(m)["type"] == "feature_flags"):
            pass
        status, answer = _queue(server, {
            "1": FACE,
            "2": {"class_type": "FaceMend_IQALoader", "inputs": {"metric": "niqe", "weights_file": "default"}},
            "3": {"class_type": "FaceMend_RestorerLoader", "inputs": {"model": "tiny_gfpgan.pth", "precision": "fp32"}},
            "4": {"class_type": "FaceMend_Authenticity",
                  "inputs": {"face_crops": ["1", 0], "restorer": ["3", 0], "metric": ["2", 0]}},
            "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 4]}},
        }, client_id)
        assert status == 200, answer
        live = []
        while True:
            m = ws.recv()
            if isinstance(m, str):
                msg = json.loads(m)
                if msg["type"] in ("execution_success", "execution_error") and \
                        msg["data"]["prompt_id"] == answer["prompt_id"]:
                    break
            elif struct.unpack(">I", m[:4])[0] == 4:  # PREVIEW_IMAGE_WITH_METADATA
                (n,) = struct.unpack(">I", m[4:8])
                meta = json.loads(m[8:8 + n])
                if meta["node_id"] == "4":
                    live.append(Image.open(io.BytesIO(m[8 + n:])))
    finally:
        ws.close()
    entry = _finished(server, status, answer)
    (shown,) = entry["outputs"]["4"]["images"]
    done = Image.open(server.base / "temp" / shown["subfolder"] / shown["filename"]).convert("RGB")
    assert done.size == (512, 256)  # f(x) | f(f(x)) of the 256 px face
    # While it ran: f(x), square (ComfyUI scales live previews to its --preview-size): nearer to the f(x) shown at
    # the end than to the input face (the random-weight restorer changes the face a lot).
    assert live and live[0].width == live[0].height
    seen = np.asarray(live[0].convert("RGB").resize((256, 256), Image.BILINEAR)).astype(float)
    fx = np.asarray(done.crop((0, 0, 256, 256))).astype(float)
    face = np.asarray(Image.open(server.base / "input" / "face.png").convert("RGB")).astype(float)
    assert np.abs(seen - fx).mean() < np.abs(seen - face).mean()
