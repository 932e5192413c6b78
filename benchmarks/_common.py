"""Shared by the benchmark scripts: this checkout loaded as `facemend`, the ../shared folder, device sync, peak memory."""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
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
    """Wait for `device` (the one given, e.g. cuda:1, not the current CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakRSS:
    """Peak resident memory of this process above the level at entry, sampled by a thread every `interval` s
    (and once more at exit): `used` (bytes) after the block. For CPU runs."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())
        self.used = self.peak - self.base


class Peak:
    """Peak memory above the level at entry: the CUDA allocator's peak on a GPU, the resident memory sampled every
    2 ms on a CPU (PeakRSS). `used` after the block; `how` says which."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.how = "CUDA allocator peak"
        else:
            self.rss = PeakRSS().__enter__()
            self.how = "resident memory sampled every 2 ms"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.used = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.rss.__exit__(*exc)
            self.used = self.rss.used
