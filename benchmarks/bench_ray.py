"""`restore --engine ray` against the local CLI on the same photos and preset: seconds, faces/s and the ratio, with
1 and 2 actors; peak memory per process (the driver and every Ray worker process); the overhead per image on tiny
inputs (no face: decode, the trip through Ray Data, the write).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ray.py [--preset fast] [--copies 3] [--actors 1 2]
        [--batch-faces 4] [--narrow 0.25] [--tiny 40] [--device cuda]

- Photos: the small real photos of ../shared/faces/whole_lq_real (01, 03, 04, 05: 1 to 5 faces), --copies times.
- Weights: a random-init GFPGAN v1.4 architecture (`--narrow` of its width, default 0.25: a CPU run in minutes)
  saved as {'params_ema': ...} like the release, or a real file with --weights.
- Local: the CLI's restore in this process (CPU: torch on OMP_NUM_THREADS threads). Ray: a local Ray started
  here (num_cpus = the machine's), the same CLI options through restore_on_ray; the first run of each
  configuration pays for starting the actors (loading the models), which is part of the time, as for a user.
- On a GPU machine, --device cuda and --actors N puts one actor per GPU (--gpus-per-actor 1).
- Memory: peak RSS of each process, sampled every 50 ms (psutil) over the driver and its Ray child processes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SHARED, load_facemend  # noqa: E402

load_facemend()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from facemend.cli import build_parser, main  # noqa: E402
from facemend.cli_files import plan_outputs  # noqa: E402
from facemend.pipelines.io.images import list_images  # noqa: E402
from facemend.scale import ray_engine  # noqa: E402

SMALL = ["01.jpg", "03.jpg", "04.jpg", "05.jpg"]


class PeakPerProcess:
    """Peak RSS of this process and of every descendant (Ray's raylet, workers, actors), by process name."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.psutil, self.interval, self.peaks = psutil, interval, {}

    def _sample(self):
        me = self.psutil.Process()
        for p in [me] + me.children(recursive=True):
            try:
                name = "driver" if p.pid == me.pid else (p.cmdline() or [p.name()])[0]
                if name.startswith("ray::IDLE") or p.memory_info().rss < 64 * 2 ** 20:
                    continue  # idle pooled workers and Ray's small helpers
                name = "actor" if "RestoreActor" in name else name
                key = (p.pid, name)
                self.peaks[key] = max(self.peaks.get(key, 0), p.memory_info().rss)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass

    def __enter__(self):
        self._stop = threading.Event()
        self._t = threading.Thread(target=lambda: [self._sample() for _ in iter(
            lambda: self._stop.wait(self.interval), True)], daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()

    def line(self, top: int = 4) -> str:
        big = sorted(self.peaks.items(), key=lambda kv: -kv[1])[:top]
        return ", ".join(f"{name[:30]} {rss / 2 ** 20:.0f} MiB" for (_, name), rss in big)


def weights(root: Path, narrow: float) -> Path:
    from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean

    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(narrow=narrow))
    path = root / "facerestore_models" / "bench_gfpgan.pth"
    path.parent.mkdir(parents=True)
    torch.save({"params_ema": net.state_dict()}, path)
    return path


def faces_in(report) -> int:
    return sum(sum(r.get("faces", [])) for r in report)


def run_local(folder, out, argv):
    import json

    report = out.parent / (out.name + ".json")
    with PeakPerProcess() as mem:
        t = time.perf_counter()
        assert main([*argv[:2], "restore", str(folder), "-o", str(out), "--no-progress", "--report", str(report),
                     *argv[2:]]) == 0
        seconds = time.perf_counter() - t
    return seconds, faces_in(json.loads(report.read_text())), mem


def run_ray(folder, out, argv, actors, batch_faces, gpus):
    from facemend.host import model_paths

    args = build_parser().parse_args([*argv[:2], "restore", "x", *argv[2:]])
    model_paths.set_models_dirs(args.models_dir + getattr(args, "sub_models_dir", []))
    pairs = plan_outputs(list_images(str(folder)), str(out))
    with PeakPerProcess() as mem:
        t = time.perf_counter()
        report = ray_engine.restore_on_ray(pairs, ray_engine.pipeline_options(args), actors=actors,
                                           batch_faces=batch_faces, gpus_per_actor=gpus, progress=False)
        seconds = time.perf_counter() - t
    assert not [r for r in report if "error" in r], report
    return seconds, faces_in(report), mem


def main_bench():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast", choices=["fast", "demo"])
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-faces", type=int, default=4)
    ap.add_argument("--narrow", type=float, default=0.25)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--tune-steps", type=int, default=20, help="demo preset")
    ap.add_argument("--tiny", type=int, default=40, help="tiny inputs for the per-image overhead (0: skip)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    link = work / "pkg"
    link.mkdir()
    os.symlink(ROOT, link / "facemend")  # Ray workers import this checkout as `facemend`
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    folder = work / "in"
    folder.mkdir()
    for k in range(a.copies):
        for name in SMALL:
            shutil.copy(SHARED / "faces" / "whole_lq_real" / name, folder / f"c{k}_{name}")
    argv = ["--device", a.device]
    if a.preset == "fast":
        w = Path(a.weights) if a.weights else weights(work / "models", a.narrow)
        argv = ["--device", a.device, "--preset", "fast", "--restorer", str(w.resolve())]
    else:
        argv += ["--preset", "demo", "--tune-steps", str(a.tune_steps)]
    gpus = 1 if a.device.startswith("cuda") else 0
    print(f"# {a.preset} preset, {len(os.listdir(folder))} photos, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, device {a.device}")
    local_s, faces, mem = run_local(folder, work / "local", argv)
    print(f"local CLI        : {local_s:7.2f} s, {faces / local_s:6.2f} faces/s; peak {mem.line(1)}")
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        for n in a.actors:
            s, f, mem = run_ray(folder, work / f"ray{n}", argv, n, a.batch_faces, gpus)
            assert f == faces
            print(f"ray, {n} actor(s)  : {s:7.2f} s, {f / s:6.2f} faces/s, {local_s / s:.2f}x the local CLI; "
                  f"peaks: {mem.line(2 + n)}")
        if a.tiny:
            # Per image: the slope between N and 4N tiny inputs (the start of the actors and of the local
            # pipeline, paid once a run, is the intercept).
            per = {}
            for n in (a.tiny, 4 * a.tiny):
                tiny = work / f"tiny{n}"
                tiny.mkdir()
                for k in range(n):
                    Image.new("RGB", (48, 32), (k % 256, 120, 150)).save(tiny / f"t{k}.png")
                per[n] = (run_local(tiny, work / f"tiny{n}_local", argv)[0],
                          run_ray(tiny, work / f"tiny{n}_ray", argv, 1, a.batch_faces, gpus)[0])
            n1, n2 = a.tiny, 4 * a.tiny
            slope = [(per[n2][i] - per[n1][i]) / (n2 - n1) for i in (0, 1)]
            start = [per[n1][i] - slope[i] * n1 for i in (0, 1)]
            print(f"tiny inputs (48x32, no face; {n1} and {n2}): per image local {1000 * slope[0]:.1f} ms, ray "
                  f"{1000 * slope[1]:.1f} ms (overhead {1000 * (slope[1] - slope[0]):.1f} ms/image); start of a run "
                  f"local {start[0]:.1f} s, ray {start[1]:.1f} s (actors loading the pipeline, the driver's check)")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main_bench()
