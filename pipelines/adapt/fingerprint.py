"""Content fingerprints that tie cached pseudo targets and training checkpoints to what produced them."""
from __future__ import annotations

import hashlib

import torch


def _update(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def tensors_fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for t in tensors:
        _update(h, t)
    return h.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a network's state (names, dtypes, shapes, bytes): two files with the same weights agree, a new
    prior or restorer file does not (whatever its name or path)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        _update(h, t)
    return h.hexdigest()
