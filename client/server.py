"""One ComfyUI server seen through its HTTP API (server.py of ComfyUI): /prompt, /upload/image, /view,
/history, /queue, /interrupt, /system_stats. Standard library only. Connection problems raise
ServerUnavailable (the job can go to another server); a refused workflow raises PromptRejected with
ComfyUI's own error text."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid


class ServerUnavailable(ConnectionError):
    """The server cannot be reached or broke the connection: its jobs can run elsewhere."""


class ServerBusy(ServerUnavailable):
    """A request timed out: the server is there but slow (a loaded CPU, a model loading); worth waiting for."""


class BadAnswer(RuntimeError):
    """The server answered, but not as ComfyUI does (a body that is not JSON, an unexpected HTTP status: a proxy's
    error page, another program on that port): this job cannot run there."""


class PromptRejected(RuntimeError):
    """ComfyUI answered /prompt with an error (validation): the message is ComfyUI's own text."""


def format_prompt_error(body: dict) -> str:
    """ComfyUI's /prompt error JSON ({"error": {...}, "node_errors": {id: {...}}}) as readable lines."""
    err = body.get("error") or {}
    lines = [": ".join(s for s in (err.get("message"), err.get("details")) if s) or json.dumps(body)[:500]]
    for nid, node in (body.get("node_errors") or {}).items():
        for e in node.get("errors", []):
            lines.append(f"  node {nid} ({node.get('class_type', '?')}): "
                         + ": ".join(s for s in (e.get("message"), e.get("details")) if s))
    return "\n".join(lines)


class Server:
    def __init__(self, url: str, headers: dict | None = None, timeout: float = 60.0, busy_grace: float = 600.0,
                 transfer_timeout: float | None = None):
        url = url.rstrip("/")
        if "://" not in url:
            url = "http://" + url
        self.url = url
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.transfer_timeout = transfer_timeout or max(timeout, 120.0)  # uploads and downloads of images
        # A request that times out is sent again until busy_grace seconds have passed without an answer: the
        # server is there but slow (a loaded CPU, a model loading). One rule for every request.
        self.busy_grace = busy_grace
        self.client_id = "facemend-" + uuid.uuid4().hex[:12]

    def __repr__(self):
        return f"Server({self.url})"

    def _request(self, method: str, path: str, data: bytes | None = None, content_type: str | None = None,
                 timeout: float | None = None, wait_busy: bool = True):
        """The body of the answer. Timeouts are retried for up to busy_grace seconds (wait_busy), then ServerBusy."""
        start = time.monotonic()
        while True:
            try:
                return self._request_once(method, path, data, content_type, timeout)
            except ServerBusy:
                if not wait_busy or time.monotonic() - start >= self.busy_grace:
                    raise

    def _request_once(self, method, path, data, content_type, timeout):
        headers = dict(self.headers)
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError as err:
            body = err.read()
            if err.code in (401, 403):
                raise ServerUnavailable(f"{self.url}{path}: HTTP {err.code} (check the --auth/--header values for "
                                        f"this server)") from None
            if err.code >= 500 or err.code in (404, 405):
                raise ServerUnavailable(f"{self.url}{path}: HTTP {err.code} {body[:300]!r}") from None
            raise _HTTPStatus(err.code, body) from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(err, (socket.timeout, TimeoutError)) or isinstance(reason, (socket.timeout, TimeoutError)):
                raise ServerBusy(f"{self.url}{path}: no answer in {timeout or self.timeout:.0f} s"
                                 + (f" (for {self.busy_grace:.0f} s)" if self.busy_grace else "")) from None
            raise ServerUnavailable(f"{self.url}: {reason}") from None

    def _json(self, raw: bytes, path: str):
        try:
            return json.loads(raw)
        except ValueError:
            raise BadAnswer(f"{self.url}{path} answered something that is not JSON (is this a ComfyUI server, or a "
                            f"proxy's error page?): {raw[:200]!r}") from None

    def get_json(self, path: str, timeout: float | None = None, wait_busy: bool = True):
        try:
            return self._json(self._request("GET", path, timeout=timeout, wait_busy=wait_busy), path)
        except _HTTPStatus as err:
            raise BadAnswer(f"{self.url}{path}: HTTP {err.code} {err.body[:300]!r}") from None

    def post_json(self, path: str, payload: dict, wait_busy: bool = True):
        raw = self._request("POST", path, json.dumps(payload).encode(), "application/json", wait_busy=wait_busy)
        return self._json(raw, path) if raw.strip() else None

    def alive(self, answer_needed: bool = False) -> bool:
        """Whether the server answers (a slow answer counts, unless answer_needed: only a refused or broken
        connection is 'gone')."""
        try:
            self.get_json("/system_stats", timeout=min(10.0, self.timeout), wait_busy=False)
            return True
        except ServerBusy:
            return not answer_needed
        except (ServerUnavailable, BadAnswer):
            return False

    def upload_image(self, data: bytes, name: str, subfolder: str = "") -> str:
        """POST /upload/image (overwrite); the name to put in LoadImage's `image` input."""
        boundary = "facemend" + uuid.uuid4().hex
        parts = []
        for key, value in (("overwrite", "true"), ("type", "input"), ("subfolder", subfolder)):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        try:
            raw = self._request("POST", "/upload/image", b"".join(parts), f"multipart/form-data; boundary={boundary}",
                                timeout=self.transfer_timeout)
        except _HTTPStatus as err:
            raise PromptRejected(f"{self.url} refused the upload of {name}: HTTP {err.code}") from None
        reply = self._json(raw, "/upload/image")
        if not isinstance(reply, dict) or "name" not in reply:
            raise BadAnswer(f"{self.url}/upload/image: unexpected answer {raw[:200]!r}")
        return f"{reply['subfolder']}/{reply['name']}" if reply.get("subfolder") else reply["name"]

    def queue_prompt(self, graph: dict, prompt_id: str | None = None) -> str:
        payload = {"prompt": graph, "client_id": self.client_id}
        if prompt_id:
            payload["prompt_id"] = prompt_id
        start = time.monotonic()
        try:
            try:
                reply = self.post_json("/prompt", payload, wait_busy=False)
            except ServerBusy:
                # The request reached the server, which has not answered yet: sending it again could queue it
                # twice, so wait (up to busy_grace) for it to show up in the queue or the history.
                while prompt_id:
                    if self.knows(prompt_id):
                        return prompt_id
                    if time.monotonic() - start >= self.busy_grace:
                        break
                    time.sleep(min(1.0, self.timeout))
                raise
            if not isinstance(reply, dict) or "prompt_id" not in reply:
                raise BadAnswer(f"{self.url}/prompt: unexpected answer {json.dumps(reply)[:200]}")
            return reply["prompt_id"]
        except _HTTPStatus as err:
            try:
                text = format_prompt_error(json.loads(err.body))
            except ValueError:
                text = err.body.decode("utf-8", "replace")[:2000]
            raise PromptRejected(text) from None

    def history(self, prompt_id: str) -> dict | None:
        reply = self.get_json(f"/history/{prompt_id}")
        if not isinstance(reply, dict):
            raise BadAnswer(f"{self.url}/history/{prompt_id}: unexpected answer {json.dumps(reply)[:200]}")
        return reply.get(prompt_id)

    def queued(self) -> set:
        """Prompt ids running or waiting in the server's queue."""
        q = self.get_json("/queue")
        try:
            return {item[1] for item in q["queue_running"] + q["queue_pending"]}
        except (KeyError, TypeError, IndexError):
            raise BadAnswer(f"{self.url}/queue: unexpected answer {json.dumps(q)[:200]}") from None

    def knows(self, prompt_id: str) -> bool:
        """Whether the prompt is queued, running or finished on this server."""
        return prompt_id in self.queued() or self.history(prompt_id) is not None

    def view(self, ref: dict) -> bytes:
        query = urllib.parse.urlencode({"filename": ref["filename"], "subfolder": ref.get("subfolder", ""),
                                        "type": ref.get("type", "output")})
        try:
            return self._request("GET", "/view?" + query, timeout=self.transfer_timeout)
        except _HTTPStatus as err:
            raise ServerUnavailable(f"{self.url}/view {ref['filename']}: HTTP {err.code}") from None

    def cancel(self, prompt_ids) -> None:
        """Remove our pending prompts from the queue and interrupt ours if it is running (a targeted interrupt:
        other users' prompts on a shared server are left alone)."""
        ids = list(prompt_ids)
        if not ids:
            return
        try:
            self._request("POST", "/queue", json.dumps({"delete": ids}).encode(), "application/json", timeout=10,
                          wait_busy=False)
            for pid in ids:
                self._request("POST", "/interrupt", json.dumps({"prompt_id": pid}).encode(), "application/json",
                              timeout=10, wait_busy=False)
        except _HTTPStatus as err:
            raise BadAnswer(f"{self.url}: HTTP {err.code} {err.body[:200]!r}") from None

    def ws_url(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/ws?clientId={self.client_id}"


class _HTTPStatus(Exception):
    def __init__(self, code, body):
        super().__init__(f"HTTP {code}")
        self.code, self.body = code, body
