"""Shared test fixtures.

The package under test is always *this* checkout, loaded as `facemend` from the repository root (the same
folder ComfyUI loads from custom_nodes/), whatever else is installed.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACEMEND_SHARED", ROOT.parent / "shared"))
FACES = SHARED / "faces"
MODELS = SHARED / "models"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _load_checkout_as_facemend() -> None:
    mod = sys.modules.get("facemend")
    if mod is not None and Path(mod.__file__).resolve().parent == ROOT:
        return
    for name in [n for n in sys.modules if n == "facemend" or n.startswith("facemend.")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        "facemend", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["facemend"] = module
    spec.loader.exec_module(module)


_load_checkout_as_facemend()


def need_shared(*parts: str) -> Path:
    """Path inside ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared faces/models folder beside the checkout); not present here")
    return path


@pytest.fixture
def shared_models_dir():
    """Point the standalone model search path at ../shared/models for the duration of a test."""
    from facemend.host import model_paths

    need_shared("models")
    model_paths.set_models_dirs([str(MODELS)])
    yield MODELS
    model_paths.set_models_dirs([])


def load_image(path) -> "torch.Tensor":
    """A real photo as [1,3,H,W] float in [0,1] (through the pack's own reader)."""
    from facemend.pipelines.io.images import read_image

    return read_image(str(path))[0]


def smooth_faces_bgr(n: int, size: int, seed: int, noise: float = 0.1):
    """Smooth random 'faces' (BGR uint8 HWC, like aligned crops rather than white noise): the restorer
    equivalence tests feed these to the official pipelines, which take cv2 images."""
    import torch

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    img = (img + noise * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)
    return (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).flip(-1).contiguous().numpy()


def bgr_to_ours(faces_bgr):
    """What a node hands over for those faces: RGB float32 [N,3,H,W] = uint8 / 255."""
    import numpy as np
    import torch

    rgb = torch.from_numpy(np.ascontiguousarray(faces_bgr[..., ::-1]))
    return rgb.permute(0, 3, 1, 2).contiguous().float() / 255.0
