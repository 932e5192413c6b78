"""Shared test fixtures.

The package under test is always *this* checkout, loaded as `facemend` from the repository root (the same
folder ComfyUI loads from custom_nodes/), whatever else is installed.
"""
from __future__ import annotations

import contextlib
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


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny tensors gain
    nothing from two, and a single thread does not stall in OpenMP barriers on a shared, loaded CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# ---------------------------------------------------------------------------------------------- tolerances
# Float results depend on the order sums are taken in (batched vs single kernels, tiles, SIMD width such as
# AVX-512, thread count), so no test compares floats with a constant picked on one machine. Each tolerance is
# derived from the computation it checks, by one of the two helpers below.

def rounding_bound(ops: int, magnitude: float = 1.0, evaluations: int = 2, dtype=None) -> float:
    """First-order bound on float rounding for a short formula: each of the `ops` additions / multiplications
    on the way to an output value rounds by at most u*|its result| (u = eps/2, |result| <= `magnitude`), in
    whatever order the machine takes them; in averaging / blending formulas an earlier error passes on scaled by
    at most 1, so one evaluation is within ops*u*magnitude of the exact value, and `evaluations` of them (two
    orders compared with each other: 2; a float32 result against an exact or float64 one: 1) within that times
    `evaluations`."""
    import torch

    return evaluations * ops * torch.finfo(dtype or torch.float32).eps / 2 * magnitude


def reorder_tol(run, margin: float = 4.0) -> float:
    """For deep computations (networks), where no useful bound can be written down: the float32 rounding error
    this computation actually has on this machine, run(torch.float32) against run(torch.float64), times
    `margin`: two float32 evaluations in different orders are each about that far from the exact result (2x),
    and another order's error may exceed the one sampled (2x more)."""
    import torch

    with torch.no_grad():
        err = (run(torch.float32).double() - run(torch.float64)).abs().max().item()
    return margin * max(err, rounding_bound(1, evaluations=1))


def restorer_reorder_tol(restorer, x, **call_kw) -> float:
    """reorder_tol for a FaceRestorer call on `x`: the same restorer in float64 (a copy) as the reference."""
    import copy

    import torch

    def run(dtype):
        r = restorer if dtype == restorer.dtype else copy.deepcopy(restorer).to(dtype=dtype)
        return r(x.to(dtype), **call_kw)

    return reorder_tol(run) if restorer.dtype == torch.float32 else float("nan")


def modules_reorder_tol(fn, *args, margin: float = 4.0) -> float:
    """reorder_tol for fn(*args), where args are float32 modules, tensors or anything else: the float64 reference
    runs fn on float64 copies of the modules and floating tensors (other args pass as they are). For small
    networks and reference comparisons: the official code's float32 error is of the same kind as ours."""
    import copy

    import torch

    def cast(a, dtype):
        if isinstance(a, torch.nn.Module):
            return a if dtype == torch.float32 else copy.deepcopy(a).to(dtype=dtype)
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.to(dtype)
        return a

    return reorder_tol(lambda dtype: fn(*(cast(a, dtype) for a in args)), margin)


def pair_reorder_tol(ours, x, ref_fn, *ref_args, scale: float = 1.0, **call_kw) -> float:
    """Tolerance for our FaceRestorer `ours` on `x` against the official code ref_fn(*ref_args) on the same
    weights: the two float32 results are apart by at most the sum of their distances to the exact result, each
    measured (float32 vs float64 run, 2x margin each). `scale` carries a measurement on a reduced-width copy
    (built with the same code, cheap to run in float64) over to the full network: the ratio of the reductions'
    lengths (rounding error of a K-term sum grows at most linearly in K)."""
    return scale * (restorer_reorder_tol(ours, x, **call_kw) / 2 + modules_reorder_tol(ref_fn, *ref_args, margin=2))


@contextlib.contextmanager
def float_casts_follow(dtype, *modules):
    """For the float64 reference run of official code that casts to float32 in places (`.float()`,
    `x.type(self.dtype)` with a module attribute dtype = float32): those casts go to float64 while this is
    active (dtype float32: nothing changes). Modules' float32 `dtype` attributes are set for good."""
    import torch

    if dtype != torch.float64:
        yield
        return
    for net in modules:
        for m in net.modules():
            if getattr(m, "dtype", None) == torch.float32:
                m.dtype = torch.float64
    orig = torch.Tensor.float
    torch.Tensor.float = lambda self, *a, **k: self.double()
    try:
        yield
    finally:
        torch.Tensor.float = orig


COMFYUI_PIN = "Comfy-Org/ComfyUI"


def comfyui_dir() -> Path | None:
    """The ComfyUI the node tests use: $COMFYUI_DIR, else the pinned checkout in the official-code cache."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return Path(env) if Path(env, "main.py").is_file() else None
    from fetch_official import checkout_dir, is_fetched

    return checkout_dir(COMFYUI_PIN) if is_fetched(COMFYUI_PIN) else None


def comfyui_skip_reason() -> str:
    return (f"needs ComfyUI (V3 nodes import its node API): run `python tests/fetch_official.py {COMFYUI_PIN}` "
            "(add `--from <a local clone>` offline) and `python tests/setup_comfyui.py`, or set COMFYUI_DIR to a "
            "ComfyUI checkout with its requirements installed")


def facemend_nodes():
    """facemend.nodes (the V3 node classes), importing ComfyUI's node API from comfyui_dir(); skips the calling test
    with what to run when ComfyUI or its requirements are missing. The standalone model search stays in charge:
    the node API alone does not make the process 'hosted'."""
    import importlib

    import pytest

    found = comfyui_dir()
    if found is None:
        pytest.skip(comfyui_skip_reason())
    if str(found) not in sys.path:
        sys.path.append(str(found))
    try:
        importlib.import_module("comfy_api.v0_0_2")
    except ImportError as exc:
        pytest.skip(f"ComfyUI at {found} does not import ({exc}): run `python tests/setup_comfyui.py`")
    return importlib.import_module("facemend.nodes")


def node_class(node_id: str):
    """The V3 class of a FaceMend node (skips without ComfyUI, see facemend_nodes)."""
    return facemend_nodes().NODE_CLASSES[node_id]


@pytest.fixture
def preview_dir(tmp_path, monkeypatch):
    """ComfyUI's temp folder, where node previews (ui.PreviewImage) are written, moved to a fresh folder for the test
    (not the ComfyUI checkout's); skips without ComfyUI. Read a preview back with preview_dir / ref["filename"]."""
    facemend_nodes()
    import folder_paths

    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "comfy_temp"))
    return tmp_path / "comfy_temp"
