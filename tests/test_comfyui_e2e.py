"""End to end in a real ComfyUI: the pack loads from custom_nodes/ (under an arbitrary folder name), its
nodes appear in /object_info, and the shipped API workflow runs through /prompt.

Needs a ComfyUI checkout in $COMFYUI_DIR and its requirements in this Python environment; skipped otherwise.
$COMFYUI_TEST_PORT picks the server's port (default: any free one).
The server runs with a temporary --base-directory, so the user's ComfyUI folders are not touched.
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, comfyui_dir, comfyui_skip_reason, need_shared

pytestmark = pytest.mark.comfyui
COMFYUI_DIR = str(comfyui_dir() or "") or None  # $COMFYUI_DIR, else the pinned cache


def _free_port():
    """Any free port, or the first free one of FACEMEND_TEST_PORTS=lo-hi (machines where ports are shared out)."""
    span = os.environ.get("FACEMEND_TEST_PORTS")
    candidates = range(int(span.split("-")[0]), int(span.split("-")[1]) + 1) if span else [0]
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in FACEMEND_TEST_PORTS={span}")


def _get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as err:
        raise AssertionError(f"/prompt refused the workflow: {err.read().decode()[:2000]}") from None


def run_prompt(url, graph, client_id="facemend-test", timeout=300) -> dict:
    """POST an API graph to /prompt, wait for it, assert success; the history entry (outputs, status)."""
    prompt_id = _post(url + "/prompt", {"prompt": graph, "client_id": client_id})["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        hist = _get(f"{url}/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            break
        time.sleep(1)
    entry = hist[prompt_id]
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    return entry


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    if not COMFYUI_DIR or not Path(COMFYUI_DIR, "main.py").is_file():
        pytest.skip(comfyui_skip_reason())
    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("custom_nodes", "input", "output", "models", "user", "temp"):
        (base / sub).mkdir()
    (base / "custom_nodes" / "ComfyUI-FaceMend").symlink_to(ROOT, target_is_directory=True)
    port = int(os.environ.get("COMFYUI_TEST_PORT") or _free_port())  # a fixed port where ports are shared out
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
        cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            _get(url + "/system_stats", timeout=2)
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("ComfyUI did not start:\n" + (base / "server.log").read_text()[-4000:])
            time.sleep(1)
    yield url, base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_pack_nodes_are_listed_with_tooltips(comfyui):
    url, base = comfyui
    info = _get(url + "/object_info", timeout=60)
    ours = {k: v for k, v in info.items() if k.startswith("FaceMend_")}
    log = (base / "server.log").read_text()
    assert ours, "FaceMend nodes missing from /object_info; server log:\n" + log[-4000:]
    from conftest import facemend_nodes

    assert set(ours) == set(facemend_nodes().NODE_CLASSES)
    tips = ours["FaceMend_DetectAlign"]["input"]["required"]["selection"][1]
    assert tips.get("tooltip")
    assert "IMPORT FAILED" not in log or "ComfyUI-FaceMend" not in log.split("IMPORT FAILED")[1][:300]


def test_demo_api_workflow_runs(comfyui):
    url, base = comfyui
    photo = need_shared("faces", "clean", "t1_six_faces.jpg")
    Image.open(photo).convert("RGB").save(base / "input" / "example.png")
    graph = json.loads((ROOT / "workflows" / "api" / "facemend_demo.json").read_text())
    tune = [n for n in graph.values() if n["class_type"] == "FaceMend_PerImageTune"]
    assert len(tune) == 1
    tune[0]["inputs"]["steps"] = 10  # a CPU-sized run of the same graph
    entry = run_prompt(url, graph)
    # SaveImage's file; the nodes' previews (type "temp") are beside it
    images = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    assert len(images) == 1
    tune_id = next(k for k, v in graph.items() if v["class_type"] == "FaceMend_PerImageTune")
    assert entry["outputs"][tune_id]["images"][0]["type"] == "temp"  # the tuned faces show on the node
    result = np.asarray(Image.open(base / "output" / images[0]["subfolder"] / images[0]["filename"]).convert("RGB"))
    source = Image.open(base / "input" / "example.png")
    assert result.shape == (2 * source.height, 2 * source.width, 3)  # the demo is an x2 face super-resolution
    # Away from the faces the photo is ComfyUI's own bicubic x2; on the six faces ZSSR changed it.
    import torch
    import torch.nn.functional as F
    src = torch.from_numpy(np.asarray(source).copy()).permute(2, 0, 1)[None].float() / 255
    bicubic = (F.interpolate(src, scale_factor=2, mode="bicubic").clamp(0, 1)[0].permute(1, 2, 0) * 255).numpy()
    diff = np.abs(result.astype(float) - bicubic).max(-1)
    assert np.median(diff) <= 1.0
    assert (diff > 3).mean() > 0.002  # six faces' worth of pixels differ
