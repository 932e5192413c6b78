#!/usr/bin/env python3
"""Install ComfyUI's own requirements into the running Python, so the node and real-host tests can import it.

    python tests/setup_comfyui.py            # the ComfyUI of $COMFYUI_DIR, else the pinned one in the cache

FaceMend's nodes are V3 nodes: they import ComfyUI's node API (comfy_api), and ComfyUI is not on PyPI. CI pins
ComfyUI in tests/official_pins.json and fetches it with tests/fetch_official.py; this script then installs that
checkout's requirements.txt (as pinned there, comfyui-frontend-package included) with this interpreter's pip.
torch, torchvision and torchaudio are left alone: the environment's torch (a CPU or CUDA build) is the one to test.
Requirements already satisfied are not passed to pip, so a second run only reads the installed metadata (well under
a second). Without a ComfyUI checkout it prints the fetch command and exits 0: the tests that need ComfyUI then
skip with that command.
"""
from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIN = "Comfy-Org/ComfyUI"
SKIP = {"torch", "torchvision", "torchaudio"}  # the environment's own build stays


def comfyui_dir() -> Path | None:
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return Path(env) if Path(env, "main.py").is_file() else None
    sys.path.insert(0, str(HERE))
    from fetch_official import checkout_dir, is_fetched

    return checkout_dir(PIN) if is_fetched(PIN) else None


def requirements(path: Path) -> list[str]:
    """The requirement lines of ComfyUI's requirements.txt, without comments and the torch family."""
    from packaging.requirements import Requirement

    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and Requirement(line).name.lower() not in SKIP:
            out.append(line)
    return out


def missing(reqs: list[str]) -> list[str]:
    """Those not satisfied by what this Python has installed (absent, or a version outside the specifier)."""
    from packaging.requirements import Requirement

    todo = []
    for line in reqs:
        req = Requirement(line)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            todo.append(line)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            todo.append(line)
    return todo


def main() -> int:
    root = comfyui_dir()
    if root is None:
        where = f"COMFYUI_DIR={os.environ['COMFYUI_DIR']} has no main.py" if os.environ.get("COMFYUI_DIR") else \
            "no pinned ComfyUI in the official-code cache"
        print(f"setup_comfyui: {where}; the node and real-host tests will skip. To run them: "
              f"`python tests/fetch_official.py {PIN}` (add `--from <a local clone>` offline), then run this again.")
        return 0
    todo = missing(requirements(root / "requirements.txt"))
    if not todo:
        print(f"setup_comfyui: ComfyUI's requirements are installed ({root})")
        return 0
    print(f"setup_comfyui: installing {len(todo)} of ComfyUI's requirements: {' '.join(todo)}", flush=True)
    return subprocess.call([sys.executable, "-m", "pip", "install", *todo])


if __name__ == "__main__":
    sys.exit(main())
