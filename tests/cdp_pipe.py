"""A headless Chromium driven over the Chrome DevTools Protocol through --remote-debugging-pipe.

The pipe (file descriptors 3 and 4 of the browser, NUL-separated JSON messages) needs no websocket library and
opens no debugging port, so the test depends only on Debian's `chromium` binary. Test-only helper.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    """$FACEMEND_CHROMIUM, else the first Chromium on PATH."""
    env = os.environ.get("FACEMEND_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in BROWSER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless browser with one page; `call` sends a command to the page and waits for its answer."""

    def __init__(self, executable: str, width: int = 1600, height: int = 1000):
        self._profile = tempfile.mkdtemp(prefix="facemend-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def _fds():  # the browser reads commands on fd 3 and writes answers on fd 4
            r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w))
            os.dup2(r, 3)  # dup2 makes 3 and 4 inheritable; the pipes' own fds are not (PEP 446)
            os.dup2(w, 4)

        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [executable, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--mute-audio",
             f"--user-data-dir={self._profile}", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=_fds, close_fds=False)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._answers: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.events: list[dict] = []  # every event of the page session, in order
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = None
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                     session=False)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except Exception:
            self.close()
            raise

    def _read(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                for q in list(self._answers.values()):
                    q.put({"error": {"message": "the browser closed the debugging pipe"}})
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    q = self._answers.get(msg["id"])
                    if q is not None:
                        q.put(msg)
                elif msg.get("sessionId") == self.session:
                    self.events.append(msg)

    def call(self, method: str, params: dict | None = None, timeout: float = 60, session: bool = True) -> dict:
        with self._lock:
            self._next_id += 1
            mid = self._next_id
            self._answers[mid] = q = queue.Queue()
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        try:
            answer = q.get(timeout=timeout)
        except queue.Empty:
            raise CDPError(f"{method}: no answer from the browser in {timeout:.0f} s") from None
        finally:
            self._answers.pop(mid, None)
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error'].get('message')}")
        return answer["result"]

    def evaluate(self, expression: str, timeout: float = 60):
        """The value of a JavaScript expression in the page (promises awaited); a thrown error raises CDPError."""
        res = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True,
                                             "timeout": int(timeout * 1000)}, timeout=timeout + 5)
        if "exceptionDetails" in res:
            details = res["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"page error: {text}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120, what: str = "") -> object:
        """Poll an expression until it is truthy; its value."""
        deadline = time.time() + timeout
        last_error = None
        while time.time() < deadline:
            try:
                value = self.evaluate(expression, timeout=10)
                if value:
                    return value
            except CDPError as err:
                last_error = err
            time.sleep(0.25)
        raise CDPError(f"timed out after {timeout:.0f} s waiting for {what or expression} (last error: {last_error})")

    def navigate(self, url: str):
        self.call("Page.navigate", {"url": url})

    def screenshot(self, path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        tmp = f"{path}.part"
        with open(tmp, "wb") as f:
            f.write(base64.b64decode(data))
        os.replace(tmp, path)

    def page_errors_since(self, first_event: int = 0) -> list[str]:
        """Uncaught exceptions ("exception: ...") and console errors the page reported since an event index."""
        out = []
        for ev in self.events[first_event:]:
            if ev["method"] == "Runtime.exceptionThrown":
                d = ev["params"]["exceptionDetails"]
                out.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
            elif ev["method"] == "Runtime.consoleAPICalled" and ev["params"]["type"] == "error":
                out.append("console.error: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in ev["params"]["args"]))
            elif ev["method"] == "Log.entryAdded" and ev["params"]["entry"]["level"] == "error":
                e = ev["params"]["entry"]
                out.append(f"log: {e.get('text')} {e.get('url', '')}")
        return out

    def close(self):
        try:
            self.call("Browser.close", session=False, timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)
