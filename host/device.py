"""Compute device, dtype, memory, progress and interruption: ComfyUI's model management when hosted,
plain torch otherwise. Nodes and the CLI go through this module only."""
from __future__ import annotations

import sys
import time
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


# Where hosted progress goes: set by nodes/ to ComfyUI's execution API (value, total, preview IMAGE or None);
# None standalone. host/ never imports ComfyUI's node API itself, so the CLI and tests run without it.
_reporter: Optional[Callable[[int, int, Optional[torch.Tensor]], None]] = None
PREVIEW_INTERVAL_S = 1.0  # previews cost a device->host copy and a PNG: at most one a second per node


def set_progress_reporter(fn: Optional[Callable[[int, int, Optional[torch.Tensor]], None]]) -> None:
    global _reporter
    _reporter = fn


class Progress:
    """ComfyUI's progress (the execution API, with preview images) when hosted; an optional callback standalone."""

    def __init__(self, total: int, callback: Optional[Callable[[int, int], None]] = None):
        self.total = max(int(total), 1)
        self.done = 0
        self.callback = callback
        self._report = _reporter if is_hosted() else None
        self._last_preview = 0.0

    def update(self, n: int = 1, preview: Optional[torch.Tensor] = None) -> None:
        """Advance by n; `preview` (IMAGE [B,H,W,3] or [B,3,H,W] in 0..1, any device) is shown on the node when
        hosted, at most once per PREVIEW_INTERVAL_S (the copy to the host is skipped otherwise)."""
        self.done = min(self.done + n, self.total)
        if self._report is not None:
            image = None
            if preview is not None and (time.monotonic() - self._last_preview >= PREVIEW_INTERVAL_S
                                        or self.done == self.total):
                image = preview_image(preview)
                self._last_preview = time.monotonic()
            self._report(self.done, self.total, image)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def wants_preview(self) -> bool:
        """True when an update now would show a preview: callers skip making one (a decode, say) otherwise."""
        return self._report is not None and time.monotonic() - self._last_preview >= PREVIEW_INTERVAL_S


def preview_image(x: torch.Tensor, max_side: int = 512) -> torch.Tensor:
    """The first image of a batch as a small IMAGE [1,H,W,3] float on the CPU, for a progress preview."""
    if x.ndim == 3:
        x = x[None]
    if x.shape[-1] not in (1, 3, 4) and x.shape[1] in (1, 3, 4):  # [B,C,H,W] -> [B,H,W,C]
        x = x.movedim(1, -1)
    img = x[:1, ..., :3].detach().float()
    h, w = img.shape[1:3]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        img = torch.nn.functional.interpolate(img.movedim(-1, 1), size=(max(1, round(h * s)), max(1, round(w * s))),
                                              mode="bilinear", antialias=True, align_corners=False).movedim(1, -1)
    return img.clamp(0, 1).cpu()


def step_hook(progress: Optional[Progress] = None) -> Callable[[int], None]:
    """A callable for pipelines' inner loops: checks interruption and advances progress."""

    def hook(n: int = 1) -> None:
        check_interrupt()
        if progress is not None:
            progress.update(n)

    return hook
