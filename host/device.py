"""Compute device, dtype, memory, progress and interruption: ComfyUI's model management when hosted,
plain torch otherwise. Nodes and the CLI go through this module only."""
from __future__ import annotations

import sys
import threading
from typing import Callable, Optional

import torch

from ..pipelines.io.errors import Interrupted

DTYPES = ("auto", "fp32", "fp16", "bf16")
_forced_device: Optional[torch.device] = None
_interrupt = threading.Event()


def _mm():
    """comfy.model_management if ComfyUI is running this process, else None (never imported standalone)."""
    if "comfy.model_management" in sys.modules:
        return sys.modules["comfy.model_management"]
    return None


def is_hosted() -> bool:
    """True inside ComfyUI (models are then offloaded between runs through its model management)."""
    return _mm() is not None


def set_device(device: str | torch.device | None) -> None:
    """Standalone override (the CLI's --device)."""
    global _forced_device
    _forced_device = torch.device(device) if device else None


def compute_device() -> torch.device:
    if _forced_device is not None:
        return _forced_device
    mm = _mm()
    if mm is not None:
        return mm.get_torch_device()
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def offload_device() -> torch.device:
    mm = _mm()
    return mm.unet_offload_device() if mm is not None else torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where IMAGE tensors live between nodes (ComfyUI keeps them on the CPU)."""
    mm = _mm()
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> fp16 on CUDA (bf16 when the GPU prefers it is left to explicit choice), fp32 elsewhere."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    if name == "fp32":
        return torch.float32
    if name == "fp16":
        return torch.float16
    if name == "bf16":
        return torch.bfloat16
    mm = _mm()
    if mm is not None:
        try:
            if mm.should_use_fp16(device=device):
                return torch.float16
        except TypeError:
            pass
        return torch.float32
    return torch.float16 if device.type == "cuda" else torch.float32


def free_memory(bytes_needed: int, device: torch.device) -> None:
    """Ask ComfyUI to unload other models so `bytes_needed` fit; empty the CUDA cache standalone."""
    mm = _mm()
    if mm is not None:
        mm.free_memory(bytes_needed, device)
    elif device.type == "cuda":
        torch.cuda.empty_cache()


def soft_empty_cache() -> None:
    mm = _mm()
    if mm is not None:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    from ..pipelines.io.memory import is_oom as torch_oom  # cuBLAS/cuDNN ALLOC_FAILED included

    mm = _mm()
    if mm is not None and isinstance(exc, getattr(mm, "OOM_EXCEPTION", ())):
        return True
    return torch_oom(exc)


def request_interrupt() -> None:
    """Standalone interruption (e.g. from a signal handler or another thread)."""
    _interrupt.set()


def clear_interrupt() -> None:
    _interrupt.clear()


def check_interrupt() -> None:
    """Raise between units of work if the user pressed Cancel (ComfyUI) or request_interrupt() was called."""
    mm = _mm()
    if mm is not None:
        # ComfyUI's own exception type, so the executor reports an interruption, not an error.
        mm.throw_exception_if_processing_interrupted()
    if _interrupt.is_set():
        _interrupt.clear()
        raise Interrupted("Processing was interrupted.")


class Progress:
    """ComfyUI's progress bar when hosted; an optional callback standalone."""

    def __init__(self, total: int, callback: Optional[Callable[[int, int], None]] = None):
        self.total = max(int(total), 1)
        self.done = 0
        self.callback = callback
        self._bar = None
        if "comfy.utils" in sys.modules:
            self._bar = sys.modules["comfy.utils"].ProgressBar(self.total)

    def update(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        if self._bar is not None:
            self._bar.update_absolute(self.done, self.total)
        if self.callback is not None:
            self.callback(self.done, self.total)


def step_hook(progress: Optional[Progress] = None) -> Callable[[int], None]:
    """A callable for pipelines' inner loops: checks interruption and advances progress."""

    def hook(n: int = 1) -> None:
        check_interrupt()
        if progress is not None:
            progress.update(n)

    return hook
