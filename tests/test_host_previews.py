"""What a user sees of FaceMend's V3 nodes in a real ComfyUI (tests/comfy_servers.py; skipped without ComfyUI):

- RestoreFaces shows the restored faces: its /history outputs carry them as preview images (type 'temp'), one per
  face, the very faces it passed on;
- its progress reaches the websocket through ComfyUI's execution API ('progress_state' for that node: the faces
  done, then finished);
- the headless client run of a shipped API graph (fast) gets only the SaveImage output, though the server holds
  the node previews too;
- progress previews (binary PREVIEW_IMAGE_WITH_METADATA frames, sent to a client that announces the feature flag
  supports_preview_metadata) arrive for a node that sends them (per-image tune);
- in-process: what host/device.Progress reports when hosted reaches ComfyUI's progress registry for the running
  node, preview image included (nodes/api.py's reporter on ComfyUI 0.3.64's execution API).
Small random-weight GFPGAN (the e2e tests' size): the tests check what the host shows, not restoration quality.
"""
from __future__ import annotations

import io
import json
import os
import socket
import struct
import time
import urllib.parse
import urllib.request
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_servers import ComfyServer, comfyui_missing, free_port, get_json
from conftest import ROOT, need_shared

pytestmark = pytest.mark.comfyui
PORTS = (int(os.environ.get("FACEMEND_TEST_PORT_LO", "8400")), int(os.environ.get("FACEMEND_TEST_PORT_HI", "8500")))
PREVIEW_IMAGE_WITH_METADATA = 4  # ComfyUI's protocol.BinaryEventTypes


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    reason = comfyui_missing()
    if reason:
        pytest.skip(reason)
    from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean

    models = tmp_path_factory.mktemp("models")
    (models / "facerestore_models").mkdir()
    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(out_size=64, num_style_feat=64, narrow=0.25))
    torch.save({"params_ema": net.state_dict()}, models / "facerestore_models" / "GFPGANv1.4.pth")
    server = ComfyServer(tmp_path_factory.mktemp("host"), free_port(*PORTS), models)
    photo = Image.open(need_shared("faces", "clean", "ffhq_00000000.png")).convert("RGB").resize((192, 192))
    photo.save(server.base / "input" / "face.png")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


class Listener:
    """A websocket client of the server, as the frontend is: announces supports_preview_metadata first."""

    def __init__(self, url: str, preview_metadata: bool = True):
        from facemend.client.websocket import WebSocket

        self.client_id = uuid.uuid4().hex
        netloc = urllib.parse.urlsplit(url).netloc
        self.ws = WebSocket(f"ws://{netloc}/ws?clientId={self.client_id}", timeout=10)
        if preview_metadata:
            self.ws.send_text(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        self.ws.settimeout(1.0)
        self.messages: list = []  # (type, data) of the JSON messages
        self.frames: list = []  # (metadata dict, PIL image) of the PREVIEW_IMAGE_WITH_METADATA frames

    def until_done(self, prompt_id: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                msg = self.ws.recv()
            except socket.timeout:
                continue
            if isinstance(msg, bytes):
                (event,) = struct.unpack(">I", msg[:4])
                if event == PREVIEW_IMAGE_WITH_METADATA:
                    (n,) = struct.unpack(">I", msg[4:8])
                    self.frames.append((json.loads(msg[8:8 + n]), Image.open(io.BytesIO(msg[8 + n:]))))
                continue
            obj = json.loads(msg)
            self.messages.append((obj["type"], obj.get("data")))
            data = obj.get("data") or {}
            if obj["type"] in ("execution_success", "execution_error", "execution_interrupted") \
                    and data.get("prompt_id") == prompt_id:
                return
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")

    def close(self):
        self.ws.close()


def queue(url: str, graph: dict, client_id: str) -> str:
    req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": graph, "client_id": client_id}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["prompt_id"]
    except urllib.error.HTTPError as err:
        raise AssertionError(f"/prompt refused the graph: {err.read().decode()[:2000]}") from None


def history(url: str, prompt_id: str, timeout: float = 30) -> dict:
    """The prompt's history entry (written just after its execution_success message)."""
    deadline = time.time() + timeout
    while True:
        entry = get_json(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None or time.time() > deadline:
            assert entry, f"no history entry for {prompt_id}"
            return entry
        time.sleep(0.2)


def view(url: str, ref: dict) -> np.ndarray:
    q = urllib.parse.urlencode({k: ref[k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{url}/view?{q}", timeout=30) as r:
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


def fast_graph(crop: int = 128) -> dict:
    graph = json.loads((ROOT / "workflows" / "api" / "facemend_fast.json").read_text())
    graph["1"]["inputs"]["image"] = "face.png"
    graph["3"]["inputs"]["crop_size"] = crop
    return graph


def node_of(graph: dict, class_type: str) -> str:
    (nid,) = [k for k, v in graph.items() if v["class_type"] == class_type]
    return nid


def test_restore_faces_shows_the_restored_faces_and_reports_progress_through_the_execution_api(host):
    graph = fast_graph()
    restore = node_of(graph, "FaceMend_RestoreFaces")
    # The restored faces also go to a SaveImage, so the preview can be compared with what the node passed on.
    graph["99"] = {"class_type": "SaveImage", "inputs": {"images": [restore, 0], "filename_prefix": "faces"}}
    listener = Listener(host.url)
    try:
        pid = queue(host.url, graph, listener.client_id)
        listener.until_done(pid)
    finally:
        listener.close()
    entry = history(host.url, pid)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    shown = entry["outputs"][restore]["images"]
    saved = entry["outputs"]["99"]["images"]
    assert len(shown) == len(saved) == 1 and all(ref["type"] == "temp" for ref in shown)
    assert np.array_equal(view(host.url, shown[0]), view(host.url, saved[0]))  # the face it restored, 128 px
    assert view(host.url, shown[0]).shape == (128, 128, 3)

    states = [d["nodes"][restore] for kind, d in listener.messages
              if kind == "progress_state" and d.get("prompt_id") == pid and restore in d.get("nodes", {})]
    assert states, "no progress_state for RestoreFaces reached the websocket"
    assert any(s["state"] == "running" and s["max"] == 1 and s["value"] == 1 for s in states), states  # 1 face done
    assert states[-1]["state"] == "finished"
    # ComfyUI's execution API only: none of the pre-V3 'progress' events come from our nodes.
    ours = {k for k, v in graph.items() if v["class_type"].startswith("FaceMend_")}
    assert not [d for kind, d in listener.messages if kind == "progress" and d.get("node") in ours]


def test_the_client_gets_only_the_save_image_output_of_a_shipped_graph(host, tmp_path):
    from facemend.client import Runner
    from facemend.client.progress import Progress

    one = tmp_path / "in"
    one.mkdir()
    Image.open(host.base / "input" / "face.png").save(one / "a.png")
    runner = Runner([host.url], fast_graph(), tmp_path / "out", progress=Progress(1, live=False))
    report = runner.run([one])
    job = report["jobs"][0]
    assert job["status"] == "done", job["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "facemend_api_report.json"]
    assert Image.open(tmp_path / "out" / "a.png").size == (192, 192)  # the pasted-back photo, not a face preview
    assert job["outputs"] == [str(tmp_path / "out" / "a.png")]
    # The server did hold the node previews for this run: the client left them there.
    client_id = runner.servers[0].client_id
    ours = [h for h in get_json(host.url + "/history").values() if h["prompt"][3].get("client_id") == client_id]
    assert len(ours) == 1
    temp = [ref for out in ours[0]["outputs"].values() for ref in out.get("images", []) if ref["type"] == "temp"]
    assert temp, "the server showed no node preview: nothing was left out"


def shows_preview(cls) -> bool:
    """Whether a V3 node class's execute returns a UI preview (io.NodeOutput(..., ui=preview(...))), read from its
    source: a node that gains one is checked by the tests that use this, with no list to keep."""
    import inspect

    execute = getattr(cls, "execute", None)
    if execute is None or not hasattr(cls, "GET_SCHEMA"):  # a node still on the dictionary API (migration)
        return False
    return "ui=preview(" in inspect.getsource(inspect.unwrap(getattr(execute, "__func__", execute)))


def test_restore_faces_is_among_the_nodes_that_show_previews():
    from conftest import facemend_nodes

    classes = facemend_nodes().NODE_CLASSES
    assert shows_preview(classes["FaceMend_RestoreFaces"]) and not shows_preview(classes["FaceMend_RestorerLoader"])


def _sends_progress_previews(node_id: str) -> str | None:
    """Why the node cannot be checked yet (None when it sends progress previews): its ops module, where a node's
    Progress lives, makes no preview (Progress.update(preview=...), guarded by wants_preview())."""
    stage = {"FaceMend_PerImageTune": "tune"}[node_id]
    path = ROOT / "ops" / f"{stage}.py"
    if not path.is_file() or "preview" not in path.read_text():
        return (f"{node_id} sends no progress preview yet ({path.relative_to(ROOT)} makes none for "
                "Progress.update): the identity/tune migration adds it")
    return None


def test_progress_previews_arrive_with_their_node_for_a_client_that_asks(host):
    tune = "FaceMend_PerImageTune"
    reason = _sends_progress_previews(tune)
    if reason:
        pytest.skip(reason)
    graph = json.loads((ROOT / "workflows" / "api" / "facemend_demo.json").read_text())
    graph["1"]["inputs"]["image"] = "face.png"
    node = node_of(graph, tune)
    graph[node]["inputs"].update(steps=4, crop_size=32, validation_interval=1)
    graph[node_of(graph, "FaceMend_DetectAlign")]["inputs"]["crop_size"] = 128
    frames = {}
    for asks in (True, False):
        listener = Listener(host.url, preview_metadata=asks)
        try:
            pid = queue(host.url, graph, listener.client_id)
            listener.until_done(pid)
        finally:
            listener.close()
        assert history(host.url, pid)["status"]["status_str"] == "success"
        frames[asks] = [(meta, img) for meta, img in listener.frames if meta.get("prompt_id") == pid]
    assert frames[True], "no PREVIEW_IMAGE_WITH_METADATA frame reached a client that announced the feature"
    assert {meta["node_id"] for meta, _ in frames[True]} == {node}
    assert all(meta["image_type"] in ("image/png", "image/jpeg") and max(img.size) <= 512 for meta, img in frames[True])
    assert frames[False] == []  # a client without the feature flag gets none in that format


def test_progress_with_a_preview_goes_to_the_execution_api_of_the_running_node():
    """In-process, no server: what host/device.Progress reports when hosted (nodes/api.py's reporter) reaches
    ComfyUI's progress registry for the node that runs, with the preview image ComfyUI then sends."""
    from conftest import facemend_nodes

    api = facemend_nodes().api
    from comfy_execution import progress as cp
    from comfy_execution.utils import CurrentNodeContext

    seen = []

    class Recorder(cp.ProgressHandler):
        def update_handler(self, node_id, value, max_value, state, prompt_id, image=None):
            seen.append((node_id, value, max_value, prompt_id, image))

    before = cp.global_progress_registry
    # A registry made directly: the default one imports ComfyUI's top-level `nodes`, which this checkout's nodes/
    # shadows when the repository root is on sys.path.
    cp.global_progress_registry = cp.ProgressRegistry("p1", None)
    try:
        cp.add_progress_handler(Recorder("recorder"))
        with CurrentNodeContext("p1", "7", None):
            api._report_progress(1, 4, None)
            api._report_progress(2, 4, torch.full((1, 8, 8, 3), 0.5))
    finally:
        cp.global_progress_registry = before
    assert [(n, v, m, p) for n, v, m, p, _ in seen] == [("7", 1, 4, "p1"), ("7", 2, 4, "p1")]
    assert seen[0][4] is None
    kind, image, _ = seen[1][4]  # ComfyUI's PreviewImageTuple: format, PIL image, max size
    assert image.size == (8, 8) and image.getpixel((0, 0)) == (127, 127, 127)
