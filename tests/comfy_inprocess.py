"""The real ComfyUI's model management imported into the test process (CPU mode), with a compute device that
ComfyUI tells apart from its offload device.

On a CPU-only machine ComfyUI's compute and offload devices are both `cpu`, so nothing would ever move. Here the
compute device is `cpu:0`: tensors "moved" there stay in the same memory, but ComfyUI's bookkeeping (load device,
offload device, free_memory(device), the VRAM state) sees two devices, as on a GPU machine. The comfy modules
are imported once per test module and put into sys.modules only while a test runs (other tests must see a
standalone pack: host/device.py decides "hosted" from sys.modules)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from comfy_servers import COMFYUI_DIR, comfyui_missing

COMPUTE = torch.device("cpu", 0)
OFFLOAD = torch.device("cpu")


def import_comfy(cpu: bool = True) -> dict:
    """{module name: module} of comfy.* imported from COMFYUI_DIR, in CPU mode unless told otherwise (a GPU
    machine: benchmarks/gpu_check.py); skips when absent."""
    missing = comfyui_missing()
    if missing:
        pytest.skip(missing)
    before = set(sys.modules)
    sys.path.insert(0, COMFYUI_DIR)
    try:
        import comfy.cli_args  # noqa: F401  (parses no command line: comfy.options.args_parsing is False)

        sys.modules["comfy.cli_args"].args.cpu = cpu
        import comfy.model_management  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.utils  # noqa: F401
    finally:
        sys.path.remove(COMFYUI_DIR)
    root = str(Path(COMFYUI_DIR).resolve())
    mods = {k: sys.modules[k] for k in set(sys.modules) - before
            if str(Path(getattr(sys.modules[k], "__file__", None) or "/").resolve()).startswith(root)}
    for k in mods:  # ComfyUI's own modules only (torch's lazily imported ones register operators once)
        del sys.modules[k]
    return mods


def host(monkeypatch, mods: dict, vram: str = "normal", fake_device: bool = True):
    """Make the pack hosted by `mods` for one test: VRAM state `vram` (normal / lowvram / novram, as ComfyUI's
    flags set it on a GPU machine), no model loaded yet; fake_device: compute device cpu:0, offload device cpu.
    Returns comfy.model_management."""
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)
    # The node API (node_class) imports ComfyUI's folder_paths for good; with model management loaded here it would
    # make the model search ComfyUI's, which has none of the tests' folders: these tests use the standalone search.
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    # Progress goes to ComfyUI's execution API only inside a running server's prompt (the API is a stub here).
    from facemend.host import device as dev

    monkeypatch.setattr(dev, "_reporter", None)
    mm = mods["comfy.model_management"]
    state = {"normal": mm.VRAMState.NORMAL_VRAM, "lowvram": mm.VRAMState.LOW_VRAM,
             "novram": mm.VRAMState.NO_VRAM}[vram]
    monkeypatch.setattr(mm, "vram_state", state)
    monkeypatch.setattr(mm, "lowvram_available", True)
    monkeypatch.setattr(mm, "current_loaded_models", [])
    if fake_device:
        monkeypatch.setattr(mm, "get_torch_device", lambda: COMPUTE)
        # cpu:0 plays the GPU: only the plain `cpu` is ComfyUI's CPU (the offload device).
        monkeypatch.setattr(mm, "is_device_cpu",
                            lambda d: getattr(d, "type", d) == "cpu" and getattr(d, "index", 1) is None)
        monkeypatch.setattr(mm, "unet_offload_device", lambda: OFFLOAD)
    return mm


def loaded_entry(mm, model):
    """ComfyUI's LoadedModel of a FaceMend model (None when ComfyUI does not hold it loaded)."""
    from facemend.host.models import patcher_of

    p = patcher_of(model)
    return next((e for e in mm.current_loaded_models if p is not None and e.model is p), None)
