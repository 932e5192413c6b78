"""Out of memory, shared by every stage: recognising it, and running work in chunks that halve when it happens.

Pure torch (a host converts the final error to its own type: host/models.py)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

# Allocation failures that libraries report as plain RuntimeErrors: cuBLAS (CUBLAS_STATUS_ALLOC_FAILED) and cuDNN
# (CUDNN_STATUS_ALLOC_FAILED) when the caching allocator left them nothing, and the allocator's own message.
OOM_MARKERS = ("out of memory", "alloc_failed")


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error of any device: torch's OutOfMemoryError, a MemoryError (ours included), or
    a RuntimeError whose message is an allocation failure."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MARKERS)


# Kernels that index in 32 bits refuse outputs of 2**31 elements or more: e.g. CUDA's channels-last bilinear upsampling
# in GFPGAN at 128 faces of 512 px ("upsample_bilinear2d_nhwc only supports output tensors with less than INT_MAX
# elements": gpu_check on an H200, 2026-12-04). Fewer items per call is the remedy, as for out of memory.
INDEX_LIMIT_MARKERS = ("int_max", "32-bit index", "canuse32bitindexmath")


def too_large_for_kernel(exc: BaseException) -> bool:
    """True for a kernel's refusal of a tensor too large for 32-bit indexing."""
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in INDEX_LIMIT_MARKERS)


def needs_smaller_chunk(exc: BaseException) -> bool:
    """Out of memory, or a tensor too large for a kernel: either way the same work in smaller chunks can run."""
    return is_oom(exc) or too_large_for_kernel(exc)


def empty_cache(device: Optional[torch.device] = None) -> None:
    """Give the CUDA allocator's cached blocks back (after a failed attempt, before a smaller one)."""
    if (device is None or torch.device(device).type == "cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_halving(n: int, chunk: int, run: Callable[[int, int], object], *, device=None,
                is_oom: Callable[[BaseException], bool] = needs_smaller_chunk,
                on_retry: Optional[Callable[[int, str], None]] = None) -> list:
    """[run(start, stop) for consecutive chunks of at most `chunk` of n items]. A chunk that runs out of memory is
    run again (also one too large for a kernel's 32-bit indexing) with half as many items (the later chunks keep the smaller size), down to one; then the error
    propagates. The cache is emptied only once the failed attempt's exception is gone, with the traceback frames
    that hold its tensors: inside the except block they would still be alive. on_retry(new_chunk, error line)."""
    out, start, k = [], 0, max(1, int(chunk))
    while start < n:
        stop = min(start + k, n)
        try:
            out.append(run(start, stop))
            start = stop
            continue
        except Exception as exc:  # noqa: BLE001 - only out of memory is retried, the rest re-raised
            if k == 1 or not is_oom(exc):
                raise
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        k = max(1, k // 2)  # here, out of the except block, the failed attempt's tensors are released
        empty_cache(device)
        if on_retry is not None:
            on_retry(k, why)
    return out
