"""GFPGAN v1.4 restorer speed: FaceMend's FaceRestorer vs the official GFPGANv1Clean, seconds per 512 face.

    .venv/bin/python benchmarks/bench_restore.py [--batch 1 4] [--repeats 3] [--device cuda] [--dtype fp16]
                                                 [--weights GFPGANv1.4.pth] [--threads 2]

Both networks get the same weights (random, seeded, in the exact v1.4 layout, or a real file with --weights) and
the same faces. "official" is the network GFPGANer builds (official `GFPGANv1Clean` from the gfpgan wheel,
loaded without basicsr like tests/test_restore_gfpgan.py does), called the way GFPGANer calls it
(`net(x, return_rgb=False)`, fresh noise), with a batch of faces where GFPGANer itself loops one face at a time;
"ours" is `FaceRestorer.__call__` end to end (normalisation, network, de-normalisation, float output) with
batch_size = the batch. Prints the median wall time per face over --repeats runs after one warm-up (the
two alternated), the process CPU time, the ratio official/ours, and the max |difference| of the outputs (stored
noise for that check).
CPU timings move with other load on the machine: the load average is printed next to them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import conftest  # noqa: E402,F401  (loads this checkout as `facemend`)

from facemend.pipelines.restore.restorer import FaceRestorer  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _official_class():
    import pytest

    from test_restore_gfpgan import _load_official_arch

    try:
        return _load_official_arch()
    except pytest.skip.Exception as exc:
        sys.exit(f"official reference unavailable: {exc}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(run_a, run_b, device, repeats: int):
    """Each once to warm up, then a and b alternately `repeats` times (load on the machine hits both alike):
    ([(median wall s, median process CPU s) of a, the same of b], [last output of a, last output of b])."""
    outs = [run_a(), run_b()]
    _sync(device)
    times = ([], []), ([], [])
    for _ in range(max(1, repeats)):
        for k, fn in enumerate((run_a, run_b)):
            c0, t0 = time.process_time(), time.perf_counter()
            outs[k] = fn()
            _sync(device)
            times[k][0].append(time.perf_counter() - t0)
            times[k][1].append(time.process_time() - c0)
    return [(statistics.median(w), statistics.median(c)) for w, c in times], outs


def build_pair(device, dtype, weights=None):
    """(official GFPGANv1Clean, FaceMend FaceRestorer) with the same weights (random seeded v1.4, or a file)."""
    official_cls = _official_class()
    official = official_cls(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                            fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1,
                            sft_half=True)
    if weights:
        ours = FaceRestorer.from_file(weights, device=device, dtype=dtype)
        official.load_state_dict(ours.net.state_dict(), strict=True)
    else:
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "GFPGANv1.4-random.pth")
            torch.save({"params_ema": official.state_dict()}, path)
            ours = FaceRestorer.from_file(path, device=device, dtype=dtype)
    official = official.eval().to(device=device, dtype=dtype).requires_grad_(False)
    return official, ours


def compare(official, ours, batch: int, device, dtype, repeats: int, sub_batch: int = 0) -> dict:
    """Seconds per face (median wall and process CPU, the two alternated) of both on one batch of 512 faces, run
    in sub-batches of `sub_batch` faces (0: the whole batch at once), and the max |difference| (stored noise) on
    the first sub-batch."""
    sub = sub_batch or batch
    g = torch.Generator().manual_seed(batch)
    faces = torch.rand(batch, 3, 512, 512, generator=g).to(device)

    def official_01(x, **kw):
        with torch.inference_mode():
            out = official(((x - 0.5) / 0.5).to(dtype), return_rgb=False, **kw)[0]
            return (out.float().clamp(-1, 1) + 1) / 2

    def run_official():
        return [official_01(chunk) for chunk in faces.split(sub)]

    def run_ours():
        return ours(faces, batch_size=sub, seed=0)

    ((t_off, c_off), (t_ours, c_ours)), _ = side_by_side(run_official, run_ours, device, repeats)
    first = faces[:sub]
    diff = (ours(first, batch_size=sub, noise="stored") - official_01(first, randomize_noise=False)).abs().max().item()
    return {"batch": batch, "official_s_per_face": t_off / batch, "ours_s_per_face": t_ours / batch,
            "official_cpu_s_per_face": c_off / batch, "ours_cpu_s_per_face": c_ours / batch, "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--weights", default=None, help="a real GFPGANv1.3/1.4 file (default: random v1.4 weights)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    official, ours = build_pair(device, dtype, args.weights)

    print(f"device {device}, dtype {args.dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}, weights {'file ' + args.weights if args.weights else 'random'}")
    print(f"{'batch':>5} {'official s/face':>16} {'ours s/face':>12} {'official/ours':>14} "
          f"{'cpu s/face off/ours':>20} {'max|diff|':>10}")
    for b in args.batch:
        r = compare(official, ours, b, device, dtype, args.repeats)
        print(f"{b:>5} {r['official_s_per_face']:>16.3f} {r['ours_s_per_face']:>12.3f} "
              f"{r['official_s_per_face'] / r['ours_s_per_face']:>14.2f} "
              f"{r['official_cpu_s_per_face']:>9.2f}/{r['ours_cpu_s_per_face']:<10.2f} {r['max_abs_diff']:>10.2e}",
              flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
