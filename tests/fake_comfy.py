"""An in-process server that speaks ComfyUI's HTTP + websocket protocol (server.py of ComfyUI v0.3.x) for the
headless client's own logic: /system_stats, /upload/image, /prompt, /queue, /interrupt, /history, /view, /ws.
No graph runs: a prompt "executes" in a few short steps (websocket executing / progress_state / execution_success
messages as ComfyUI 0.3.64 sends them: its execution API reports a node's steps as 'progress_state', the state of
every started node at once; `legacy_progress` adds the old 'progress' events that comfy.utils.ProgressBar nodes
still send) and each SaveImage node's output is the uploaded image's bytes prefixed with `node <id>:`, so a test
can tell every output file's input and node apart. Every other node (not LoadImage) shows a preview in its history
outputs, as V3 nodes do (ui.PreviewImage: type 'temp', served by /view like the real one); `viewed` records every
(type, filename) /view served. Faults are switched on by attributes:

- `errors`: {path prefix or 'METHOD path': [HTTP status, ...]}: the next requests there get those statuses, one each;
- `garbage`: path prefixes answered with a non-JSON 200 body (a proxy's page);
- `slow`: {path prefix: [seconds, ...]}: the next requests there are answered that late, one delay each;
- `vanish`: that many next prompts leave the queue without a history entry;
- `fail`: prompts fail with a ComfyUI execution_error;
- stop() / start(): the server goes away (every connection dropped, queue and history lost) and comes back on
  the same port, as a restarted ComfyUI does.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    """A server-to-client (unmasked) websocket frame."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + payload


class FakeComfy:
    def __init__(self, port: int, steps: int = 3, step_seconds: float = 0.05):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.steps, self.step_seconds = steps, step_seconds
        self.errors: dict = {}
        self.garbage: tuple = ()
        self.slow: dict = {}
        self.vanish = 0
        self.fail = False
        self.requests: list = []  # (method, path) of every request, for assertions
        self.executed: list = []  # prompt ids run to completion
        self.on_result = None  # callable(pid) after a prompt's history entry is written
        self.legacy_progress = False  # also send the pre-execution-API 'progress' events
        self.viewed: list = []  # (type, filename) of every image /view served
        self.wait_for_ws = 0.0  # seconds a prompt waits for its client's websocket (a test that reads every event)
        self._httpd = None
        self.start()

    # --- lifecycle ------------------------------------------------------------------------------------------
    def start(self):
        self.lock = threading.Condition()
        self.uploads: dict = {}
        self.pending: list = []  # [number, pid, prompt, extra, outputs]
        self.running = None
        self.history: dict = {}
        self.interrupted: set = set()
        self.sockets: set = set()
        self.ws_clients: dict = {}  # client_id -> (socket, lock)
        self.number = 0
        self.alive = True
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._httpd = _Quiet(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._worker = threading.Thread(target=self._execute_loop, daemon=True)
        self._worker.start()
        return self

    def stop(self):
        """Go away like a killed ComfyUI: no listener, every open connection reset, queue and history lost."""
        with self.lock:
            self.alive = False
            self.lock.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        for s in list(self.sockets):
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self._worker.join(timeout=5)

    # --- execution ------------------------------------------------------------------------------------------
    @staticmethod
    def _state(pid, nid, state, value, total) -> dict:
        """One node's entry of a progress_state message (comfy_execution/progress.py WebUIProgressHandler)."""
        return {"value": value, "max": total, "state": state, "node_id": nid, "prompt_id": pid,
                "display_node_id": nid, "parent_node_id": None, "real_node_id": nid}

    def send(self, client_id, kind, data):
        sock_lock = self.ws_clients.get(client_id)
        if not sock_lock:
            return
        sock, lock = sock_lock
        try:
            with lock:
                sock.sendall(ws_frame(json.dumps({"type": kind, "data": data}).encode()))
        except OSError:
            self.ws_clients.pop(client_id, None)

    def _execute_loop(self):
        while True:
            with self.lock:
                while self.alive and not self.pending:
                    self.lock.wait(0.1)
                if not self.alive:
                    return
                item = self.pending.pop(0)
                if self.vanish > 0:  # gone from the queue, no history: a lost prompt
                    self.vanish -= 1
                    continue
                self.running = item
            number, pid, prompt, extra, _ = item
            cid = extra.get("client_id")
            deadline = time.monotonic() + self.wait_for_ws
            while cid not in self.ws_clients and time.monotonic() < deadline:
                time.sleep(0.02)
            self.send(cid, "execution_start", {"prompt_id": pid, "timestamp": 0})
            self.send(cid, "executing", {"node": None, "display_node": None, "prompt_id": pid})
            status, messages = "success", [["execution_start", {"prompt_id": pid}]]
            # The steps belong to the first node that is neither LoadImage nor SaveImage (the one that "works").
            work = next((n for n, v in prompt.items() if v["class_type"] not in ("LoadImage", "SaveImage")),
                        next(iter(prompt), None))
            states: dict = {}
            order = list(prompt)
            after = order[order.index(work) + 1:] if work in order else []
            for nid in order[:len(order) - len(after)]:
                self.send(cid, "executing", {"node": nid, "display_node": nid, "prompt_id": pid})
                states[nid] = self._state(pid, nid, "running", 0.0, 1.0)
                self.send(cid, "progress_state", {"prompt_id": pid, "nodes": dict(states)})
                if nid != work:
                    states[nid] = self._state(pid, nid, "finished", 1.0, 1.0)
            for k in range(self.steps):
                time.sleep(self.step_seconds)
                if not self.alive:
                    return
                if pid in self.interrupted:
                    status = "error"
                    messages.append(["execution_interrupted", {"prompt_id": pid, "node_id": "1",
                                                               "node_type": "Fake"}])
                    break
                states[work] = self._state(pid, work, "running", float(k + 1), float(self.steps))
                self.send(cid, "progress_state", {"prompt_id": pid, "nodes": dict(states)})
                if self.legacy_progress:
                    self.send(cid, "progress", {"value": k + 1, "max": self.steps, "prompt_id": pid, "node": work})
            if status == "success":
                states[work] = self._state(pid, work, "finished", float(self.steps), float(self.steps))
                for nid in after:
                    self.send(cid, "executing", {"node": nid, "display_node": nid, "prompt_id": pid})
                    states[nid] = self._state(pid, nid, "running", 0.0, 1.0)
                    self.send(cid, "progress_state", {"prompt_id": pid, "nodes": dict(states)})
                    states[nid] = self._state(pid, nid, "finished", 1.0, 1.0)
            outputs = {}
            if status == "success" and self.fail:
                status = "error"
                messages.append(["execution_error", {"prompt_id": pid, "node_id": "2", "node_type": "FakeNode",
                                                     "exception_type": "RuntimeError",
                                                     "exception_message": "fake failure"}])
            if status == "success":
                image = next((n["inputs"].get("image") for n in prompt.values() if n["class_type"] == "LoadImage"), None)
                data = self.uploads.get(image, b"")
                for nid, node in prompt.items():
                    if node["class_type"].endswith("SaveImage"):
                        name = f"out_{uuid.uuid4().hex[:8]}.png"
                        self.uploads["out/" + name] = f"node {nid}:".encode() + data
                        outputs[nid] = {"images": [{"filename": name, "subfolder": "", "type": "output"}]}
                    elif node["class_type"] != "LoadImage":  # a node's UI preview, as V3 nodes' ui.PreviewImage
                        name = f"ComfyUI_temp_{uuid.uuid4().hex[:5]}_00001_.png"
                        self.uploads["temp/" + name] = f"preview {nid}:".encode() + data
                        outputs[nid] = {"images": [{"filename": name, "subfolder": "", "type": "temp"}],
                                        "animated": [False]}
                messages.append(["execution_success", {"prompt_id": pid}])
            with self.lock:
                if not self.alive:
                    return
                self.history[pid] = {"prompt": item[:4] + [list(outputs)], "outputs": outputs,
                                     "status": {"status_str": status, "completed": status == "success",
                                                "messages": messages}, "meta": {}}
                self.running = None
                if status == "success":
                    self.executed.append(pid)
            self.send(cid, "executing", {"node": None, "prompt_id": pid})
            if status == "success":
                self.send(cid, "execution_success", {"prompt_id": pid, "timestamp": 0})
            if self.on_result:
                self.on_result(pid)


class _Quiet(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that gave up (a timeout under test) or a server stopped mid-answer: expected here


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeComfy = None
    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        self.server_fake.sockets.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server_fake.sockets.discard(self.connection)

    def _answer(self, code: int, body, content_type="application/json"):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _faults(self) -> bool:
        fake = self.server_fake
        path = urlsplit(self.path).path
        fake.requests.append((self.command, path))
        for prefix, delays in fake.slow.items():
            if path.startswith(prefix) and delays:
                time.sleep(delays.pop(0))
        if any(path.startswith(p) for p in fake.garbage):
            self._answer(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
            return True
        for prefix, codes in fake.errors.items():  # a prefix may name the method: "POST /queue"
            if (path.startswith(prefix) or f"{self.command} {path}".startswith(prefix)) and codes:
                self._answer(codes.pop(0), b"error", "text/plain")
                return True
        return False

    def do_GET(self):
        fake = self.server_fake
        parts = urlsplit(self.path)
        if parts.path == "/ws":
            return self._websocket(parse_qs(parts.query).get("clientId", [""])[0])
        if self._faults():
            return
        if parts.path == "/system_stats":
            return self._answer(200, {"system": {"os": "fake", "comfyui_version": "0.3.64"}, "devices": []})
        if parts.path == "/queue":
            with fake.lock:
                return self._answer(200, {"queue_running": [fake.running] if fake.running else [],
                                          "queue_pending": list(fake.pending)})
        m = re.fullmatch(r"/history/(.+)", parts.path)
        if m:
            with fake.lock:
                entry = fake.history.get(m.group(1))
            return self._answer(200, {m.group(1): entry} if entry else {})
        if parts.path == "/history":
            return self._answer(200, fake.history)
        if parts.path == "/view":
            q = parse_qs(parts.query)
            kind = q.get("type", ["output"])[0]
            key = {"output": "out/", "temp": "temp/"}.get(kind, "") + q["filename"][0]
            fake.viewed.append((kind, q["filename"][0]))
            if key not in fake.uploads:
                return self._answer(404, b"404: Not Found", "text/plain")
            return self._answer(200, fake.uploads[key], "image/png")
        self._answer(404, b"404: Not Found", "text/plain")

    def do_POST(self):
        fake = self.server_fake
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self._faults():
            return
        path = urlsplit(self.path).path
        if path == "/upload/image":
            m = re.search(rb'name="image"; filename="([^"]+)"\r\nContent-Type: [^\r]*\r\n\r\n', body)
            name = m.group(1).decode()
            data = body[m.end():body.rindex(b"\r\n--", m.end())]
            fake.uploads[name] = data
            return self._answer(200, {"name": name, "subfolder": "", "type": "input"})
        payload = json.loads(body or b"{}")
        if path == "/prompt":
            pid = payload.get("prompt_id") or str(uuid.uuid4())
            with fake.lock:
                fake.number += 1
                fake.pending.append([fake.number, pid, payload["prompt"], {"client_id": payload.get("client_id")}, []])
                fake.lock.notify_all()
            return self._answer(200, {"prompt_id": pid, "number": fake.number, "node_errors": {}})
        if path == "/queue":
            with fake.lock:
                fake.pending = [p for p in fake.pending if p[1] not in payload.get("delete", [])]
            return self._answer(200, b"", "text/plain")
        if path == "/interrupt":
            fake.interrupted.add(payload.get("prompt_id"))
            return self._answer(200, b"", "text/plain")
        self._answer(404, b"404: Not Found", "text/plain")

    def _websocket(self, client_id):
        fake = self.server_fake
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        lock = threading.Lock()
        fake.ws_clients[client_id] = (self.connection, lock)
        fake.send(client_id, "status", {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id})
        self.connection.settimeout(0.2)
        while fake.alive:  # hold the connection until the client or the server goes
            try:
                if not self.connection.recv(4096):
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        fake.ws_clients.pop(client_id, None)
        self.close_connection = True
