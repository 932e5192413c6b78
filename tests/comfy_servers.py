"""Real ComfyUI servers for tests: each in its own temporary --base-directory (the pack linked into
custom_nodes/ under an arbitrary name, an optional shared models folder), on a free port of a given range."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import ROOT, comfyui_dir, comfyui_skip_reason

COMFYUI_DIR = str(comfyui_dir() or "") or None  # $COMFYUI_DIR, else the pinned cache
PACK_FOLDER = "ComfyUI-FaceMend"


def comfyui_missing() -> str | None:
    if not COMFYUI_DIR or not Path(COMFYUI_DIR, "main.py").is_file():
        return comfyui_skip_reason()
    return None


def free_port(lo: int, hi: int) -> int:
    for port in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


def get_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class ComfyServer:
    def __init__(self, base: Path, port: int, models: Path | None = None, extra_args=(), command=None):
        """command: what runs ComfyUI (default: python main.py --cpu); see tests/test_host_models_comfyui.py."""
        self.base, self.port = base, port
        for sub in ("custom_nodes", "input", "output", "user", "temp"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
        if models is not None:
            (base / "models").symlink_to(models, target_is_directory=True)
        else:
            (base / "models").mkdir()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = base / "server.log"
        self._log = open(self.log_path, "w")
        self._cmd = [*(command or [sys.executable, "main.py", "--cpu"]), "--listen", "127.0.0.1", "--port", str(port),
                     "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
                     *extra_args]
        self.start()

    def start(self):
        """Start (again, after kill(): a restart on the same port, as a crashed server's supervisor does)."""
        self.proc = subprocess.Popen(self._cmd, cwd=COMFYUI_DIR, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        return self

    def wait_ready(self, timeout=240):
        deadline = time.time() + timeout
        while True:
            try:
                get_json(self.url + "/system_stats", timeout=2)
                return self
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError("ComfyUI did not start:\n" + self.log_path.read_text()[-4000:])
                time.sleep(1)

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self._log.close()
