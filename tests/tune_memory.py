"""Measured peak memory of a per-image tuning call on the CPU, for the estimate in pipelines/tune/memory.py.

Each measurement runs in a fresh interpreter (one torch thread): a tiny call first loads the kernels, freed heap
goes back to the system (malloc_trim), then the kernel's own high-water mark of resident memory (VmHWM, reset
through /proc/self/clear_refs) is taken over one call with k faces in one group. The peak minus the resident
memory before the call is the growth; (growth(k) - growth(k0)) / (k - k0) is the growth per face, fixed costs
cancelled. k0 >= 2: one face runs oneDNN's ungrouped kernels, whose fixed memory differs from the grouped ones'.

    python tests/tune_memory.py zssr 64 '{"crop_size": 32, "max_iters": 4}' 2 5   # prints the JSON figures

Linux only (VmHWM, clear_refs). Test and benchmark helper.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# One thread; every heap block of 64 KiB or more mapped on its own and returned when freed (a fixed mmap threshold
# turns off glibc's adaptive one), so resident memory follows the live tensors instead of the heap's history.
ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


def supported() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM" in Path("/proc/self/status").read_text()
    except OSError:
        return False


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _tuner(mode: str, config: dict):
    from facemend.pipelines.tune import ntire_refine as NT, zssr as Z

    if mode == "zssr":
        return Z.ZSSR(Z.ZSSRConfig(**config))
    return NT.NTIRETune(NT.NTIREConfig(**config))


def _child(mode: str, size: int, config: dict, k: int) -> dict:
    import ctypes

    import torch

    sys.path.insert(0, str(HERE))
    import conftest  # noqa: F401  (loads this checkout as `facemend`)

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    x = torch.rand(k, 3, size, size, generator=torch.Generator().manual_seed(0))
    warm = {**config, "crop_size": 8}
    warm.update({"max_iters": 2} if mode == "zssr" else {"steps": 2, "batch_size": 1})
    _tuner(mode, warm)(torch.rand(1, 3, 16, 16), seed=0)          # load kernels and thread pools
    libc.malloc_trim(0)
    base = _status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                               # VmHWM := VmRSS
    tuner = _tuner(mode, {**config, "faces_per_group": k})          # all k faces in one group
    tuner(x, seed=0)
    peak = _status_kib("VmHWM") * 1024
    return {"k": k, "base": base, "peak": peak, "growth": peak - base}


def measure(mode: str, size: int, config: dict, k: int) -> dict:
    """Peak growth of one `mode` call on k random size x size faces with `config`, in a fresh interpreter."""
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(size), json.dumps(config), str(k)],
                         capture_output=True, text=True, check=True, env={**os.environ, **ENV})
    return json.loads(out.stdout.strip().splitlines()[-1])


def per_face_growth(mode: str, size: int, config: dict, k: int, k0: int = 1) -> tuple[float, dict, dict]:
    few, many = measure(mode, size, config, k0), measure(mode, size, config, k)
    return (many["growth"] - few["growth"]) / (k - k0), few, many


def estimate(mode: str, size: int, config: dict):
    sys.path.insert(0, str(HERE))
    import conftest  # noqa: F401

    from facemend.pipelines.tune import memory as M, ntire_refine as NT, zssr as Z

    if mode == "zssr":
        return M.zssr_face_cost(Z.ZSSRConfig(**config), size, size)
    return M.ntire_face_cost(NT.NTIREConfig(**config), size, size)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        mode, size, config, k = sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(_child(mode, size, config, k)))
    else:
        mode, size, config = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
        ks = [int(a) for a in sys.argv[4:]] or [2, 5]
        per, one, many = per_face_growth(mode, size, config, ks[-1], ks[0])
        est = estimate(mode, size, config)
        print(json.dumps({"mode": mode, "size": size, "config": config, "measured_per_face": per,
                          "estimated_per_face": est.group + est.batch,
                          "ratio": (est.group + est.batch) / per, "phases": est.phases,
                          "one": one, "many": many}, indent=1))
