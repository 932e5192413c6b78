"""FaceMend's models under ComfyUI's model management when hosted; plain objects standalone.

A loader calls `manage(model)` once: hosted, the model's torch modules go under one
comfy.model_patcher.ModelPatcher (load device: ComfyUI's compute device, offload device: its unet offload
device), so they appear in comfy.model_management.current_loaded_models and ComfyUI loads, keeps and evicts them
like its own. A node wraps its work in `on_device(model, ..., memory_required=...)`: ComfyUI loads those models
(evicting others as needed), and they stay loaded after the node unless ComfyUI runs with --novram. Standalone
(the CLI) both are no-ops: models stay where their loader put them, as before.

FaceMend's networks are plain PyTorch modules, without the weight-casting layers ComfyUI streams in its low-VRAM
modes, so a model is always loaded whole while it runs (ComfyUI does the same for upscale models); --novram
then unloads it when the node is done, --lowvram lets ComfyUI evict it whenever another model needs the memory.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Iterable

import torch

from . import device as dev

PATCHER = "_facemend_patcher"


def same_device(a, b) -> bool:
    """Where tensors of the two devices live is the same place (cuda == cuda:<current>, cpu == cpu:0)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cpu" or a.index == b.index:
        return True
    if a.type == "cuda":
        cur = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)
    return False


def torch_modules(model) -> list:
    """The torch modules a FaceMend model object holds: the object itself when it is one, else its public
    attributes that are modules or lists/tuples of modules (FaceRestorer.net, MTCNN's three nets, RestorerID's six
    parts, OneStepSR.modules, IQAMetric.module). Private caches (_fast, _compiled) are derived copies, rebuilt by
    the object's own `to` (manage(follow_moves=True))."""
    if isinstance(model, torch.nn.Module):
        return [model]
    found, seen = [], set()
    for name, value in vars(model).items():
        if name.startswith("_"):
            continue
        items = value if isinstance(value, (list, tuple)) else (value,)
        for m in items:
            if isinstance(m, torch.nn.Module) and id(m) not in seen:
                seen.add(id(m))
                found.append(m)
    return found


class ModelHolder(torch.nn.Module):
    """One FaceMend model's modules as the single module a ModelPatcher moves, sizes and evicts. After a whole-
    model move (ComfyUI loading it fully or unloading it) the owner's own `to(device)`, when there is an owner,
    moves what is not a module (cached tensors, derived copies)."""

    def __init__(self, modules: Iterable[torch.nn.Module], name: str = "", owner=None):
        super().__init__()
        self.parts = torch.nn.ModuleList(list(modules))
        self.model_name = name
        # A weak reference: the owner holds the patcher that holds this module (no cycle for ComfyUI's leak check).
        self._owner = weakref.ref(owner) if owner is not None else None

    def to(self, *args, **kwargs):
        out = super().to(*args, **kwargs)
        # The device exactly as ComfyUI names it (nn.Module.to's own argument parser): a tensor's device would
        # not tell ComfyUI's cpu:0 compute device (tests) from its cpu offload device.
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        owner = self._owner() if self._owner is not None else None
        if owner is not None and device is not None:
            owner.to(device)
        return out

    def extra_repr(self) -> str:
        return self.model_name


def patcher_of(model):
    return getattr(model, PATCHER, None)


def manage(model, name: str = "", follow_moves: bool = False):
    """Hosted: put `model`'s torch modules under a ModelPatcher (kept on the model, so it lives as long as the
    loader's cache holds the model); when they are on the compute device already, load it, so ComfyUI counts it
    from now on. follow_moves: call model.to(device) after ComfyUI moves the whole model (for what is not a
    module: cached tensors, derived copies). Standalone, or a model without torch modules (an onnxruntime
    session): `model` unchanged. Returns `model`."""
    mm = dev._mm()
    if mm is None or patcher_of(model) is not None:
        return model
    modules = torch_modules(model)
    if not modules:
        return model
    import comfy.model_patcher  # hosted: ComfyUI is importable

    holder = ModelHolder(modules, name or type(model).__name__, model if follow_moves else None)
    first = next(iter(holder.parameters()), None)
    holder.device = first.device if first is not None else mm.unet_offload_device()
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device=dev.compute_device(),
                                               offload_device=dev.offload_device())
    setattr(model, PATCHER, patcher)
    if first is not None and first.device != torch.device(patcher.offload_device) and not novram():
        load(model)  # already on the compute device (the loader put it there): ComfyUI counts it from now on
    return model


def _loaded_entry(mm, patcher):
    for entry in mm.current_loaded_models:
        if entry.model is patcher:
            return entry
    return None


def load(*models, memory_required: int = 0) -> None:
    """Hosted: ComfyUI loads the managed models onto their compute device, whole, freeing what they and
    `memory_required` more bytes (activations) need by evicting other models. No-op standalone."""
    mm = dev._mm()
    patchers = [p for p in (patcher_of(m) for m in models if m is not None) if p is not None]
    if mm is None or not patchers:
        return
    mm.load_models_gpu(patchers, memory_required=int(memory_required), force_full_load=True)
    for p in patchers:
        # --novram loads nothing up front (ComfyUI streams its own cast-capable layers): load ours whole.
        if p.loaded_size() < p.model_size():
            entry = _loaded_entry(mm, p)
            if entry is not None:
                entry.model_use_more_vram(p.model_size() * 2 + 1)
            else:
                p.partially_load(p.load_device, p.model_size() * 2 + 1)


def unload(*models) -> None:
    """Hosted: ComfyUI unloads these models to their offload device now (and forgets them until next use)."""
    mm = dev._mm()
    if mm is None:
        return
    for m in models:
        p = patcher_of(m) if m is not None else None
        entry = _loaded_entry(mm, p) if p is not None else None
        if entry is not None:
            entry.model_unload()
            mm.current_loaded_models.remove(entry)


def novram() -> bool:
    mm = dev._mm()
    return mm is not None and getattr(mm, "vram_state", None) == getattr(mm, "VRAMState").NO_VRAM


@contextlib.contextmanager
def on_device(*models, memory_required: int = 0):
    """Load the models (see load), run the block; with --novram unload them again afterwards."""
    load(*models, memory_required=memory_required)
    try:
        yield
    finally:
        if novram():
            unload(*models)
            dev.soft_empty_cache()


def as_host_oom(exc: BaseException):
    """Hosted: ComfyUI's out-of-memory exception (comfy.model_management.OOM_EXCEPTION) carrying `exc`'s message
    when `exc` is an out-of-memory error of ours or a library's that ComfyUI would not recognise (our
    OutOfMemory, cuBLAS/cuDNN ALLOC_FAILED), so that ComfyUI unloads its models after it; else None."""
    from ..pipelines.io.memory import is_oom

    mm = dev._mm()
    oom_type = getattr(mm, "OOM_EXCEPTION", None) if mm is not None else None
    if oom_type is None or isinstance(exc, oom_type) or not is_oom(exc):
        return None
    return oom_type(f"{type(exc).__name__}: {exc}")


def host_oom(fn):
    """Decorator for a node's FUNCTION: out of memory leaves it as ComfyUI's own exception (see as_host_oom),
    raised after the original is released, so the failed run's tensors are freed before ComfyUI unloads."""
    if getattr(fn, "_facemend_host_oom", False):
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - converted or re-raised unchanged
            converted = as_host_oom(exc)
            if converted is None:
                raise
        raise converted

    run._facemend_host_oom = True
    return run
