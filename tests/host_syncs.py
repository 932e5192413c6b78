"""Counting, on a CPU, what would make the host wait for a GPU (torch.cuda.set_sync_debug_mode needs CUDA).

Inputs are passed as `on_device(t)`: a `DeviceTensor`, a CPU tensor subclass standing for a tensor on the compute
device, whose op results stay DeviceTensors. While `HostSyncs` is active it counts
- reads: values of a DeviceTensor read into Python or copied to the host (float(), int(), bool(), .item(),
  .tolist(), .numpy(), .cpu()) - each waits for the device's queue;
- uploads: a plain (host) tensor moved with .to(device) / .to(tensor) - a blocking host-to-device copy on a GPU
  (pageable memory: the stream is synchronised) - and torch.tensor(..., device=...).
"""
from __future__ import annotations

import contextlib

import torch

_READS = ("__float__", "__int__", "__bool__", "__index__", "item", "tolist", "numpy", "cpu")


class DeviceTensor(torch.Tensor):
    """A CPU tensor standing for a tensor on the compute device."""


def on_device(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(DeviceTensor)


def _names_device(args, kwargs) -> bool:
    if "device" in kwargs and kwargs["device"] is not None:
        return True
    return any(isinstance(a, (torch.device, str, torch.Tensor)) and not isinstance(a, torch.dtype) for a in args)


class HostSyncs(contextlib.AbstractContextManager):
    def __init__(self):
        self.counts: dict = {}
        self._saved: dict = {}
        self._inside = 0

    def _count(self, what):
        self.counts[what] = self.counts.get(what, 0) + 1

    @property
    def reads(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "upload")

    @property
    def uploads(self) -> int:
        return self.counts.get("upload", 0)

    def __enter__(self):
        for name in _READS:
            orig = getattr(torch.Tensor, name)
            self._saved[(torch.Tensor, name)] = orig

            def read(t, *a, _orig=orig, _name=name, **k):
                if isinstance(t, DeviceTensor) and not self._inside:
                    self._count(_name)
                self._inside += 1          # the subclass dispatch calls the method again: count once
                try:
                    return _orig(t, *a, **k)
                finally:
                    self._inside -= 1

            setattr(torch.Tensor, name, read)
        to = torch.Tensor.to
        self._saved[(torch.Tensor, "to")] = to

        def to_(t, *a, **k):
            if not isinstance(t, DeviceTensor) and _names_device(a, k):
                self._count("upload")
            return to(t, *a, **k)

        torch.Tensor.to = to_
        tensor = torch.tensor
        self._saved[(torch, "tensor")] = tensor

        def tensor_(*a, **k):
            if k.get("device") is not None:
                self._count("upload")
            return tensor(*a, **k)

        torch.tensor = tensor_
        return self

    def __exit__(self, *exc):
        for (owner, name), orig in self._saved.items():
            setattr(owner, name, orig)
        return False
