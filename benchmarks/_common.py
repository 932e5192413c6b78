"""Shared by the benchmark scripts: this checkout loaded as `facemend`, the ../shared folder, device sync."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACEMEND_SHARED", ROOT.parent / "shared"))


def load_facemend() -> None:
    if "facemend" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("facemend", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["facemend"] = module
    spec.loader.exec_module(module)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
