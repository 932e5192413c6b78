"""Speed of the embedded MTCNN detector (pipelines/face/mtcnn.py), optionally next to the original package.

    .venv/bin/python benchmarks/bench_mtcnn.py [--device cuda] [--threads 1] [--reference-python /tmp/tfvenv/bin/python]

Prints, per image (t1_six_faces.jpg, whole_lq_real/00.jpg by default): size, faces found, and the median wall
time of `detect` over --repeats runs after one warm-up, plus a batch of --batch copies; with
--reference-python (an interpreter with tensorflow + mtcnn, see compare_mtcnn_reference.py) also the original
package's `detect_faces` time on the same pixels. CPU figures depend heavily on other load on the machine:
the script prints the load average and the thread count it ran with, and the process CPU time next to the
wall time (on a busy machine the CPU time with --threads 1 is the steadier figure).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.environ.get("FACEMEND_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
DEFAULT_IMAGES = [os.path.join(SHARED, "faces", "clean", "t1_six_faces.jpg"),
                  os.path.join(SHARED, "faces", "whole_lq_real", "00.jpg")]

_REFERENCE_SNIPPET = r"""
import json, statistics, sys, time
import numpy as np
from PIL import Image, ImageOps
from mtcnn import MTCNN
det = MTCNN()
out = {}
repeats, thr = int(sys.argv[1]), float(sys.argv[2])
for p in sys.argv[3:]:
    with Image.open(p) as im:
        img = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    det.detect_faces(img, threshold_onet=thr)
    ts, cs = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        r = det.detect_faces(img, threshold_onet=thr)
        ts.append(time.perf_counter() - t); cs.append(time.process_time() - c)
    out[p] = [statistics.median(ts), len(r), statistics.median(cs)]
print("RESULT " + json.dumps(out))
"""


def _load_facemend():
    if "facemend" not in sys.modules:
        spec = importlib.util.spec_from_file_location("facemend", os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["facemend"] = mod
        spec.loader.exec_module(mod)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*", default=DEFAULT_IMAGES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.9, help="score threshold (the package's threshold_onet)")
    ap.add_argument("--batch", type=int, default=4, help="also time a batch of this many copies (0: skip)")
    ap.add_argument("--reference-python", default=None,
                    help="interpreter with tensorflow + mtcnn to time the original package")
    args = ap.parse_args()

    import torch

    _load_facemend()
    from facemend.pipelines.face.mtcnn import MTCNNDetector
    from facemend.pipelines.io.images import read_image

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
          f"cpu count {os.cpu_count()}, load average {load[0]}")
    t = time.perf_counter()
    det = MTCNNDetector.load(device=args.device, dtype=getattr(torch, args.dtype))
    print(f"load: {time.perf_counter() - t:.3f} s")

    ref = {}
    if args.reference_python:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
        run = subprocess.run([args.reference_python, "-c", _REFERENCE_SNIPPET, str(args.repeats), str(args.threshold),
                              *args.images],
                             capture_output=True, text=True, env=env)
        line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
        if run.returncode or not line:
            print("reference failed:", run.stderr[-2000:])
        else:
            ref = json.loads(line[0][7:])

    for path in args.images:
        if not os.path.isfile(path):
            print(f"{path}: missing, skipped")
            continue
        img = read_image(path)[0].to(args.device)
        det.detect(img, score_threshold=args.threshold)  # warm-up
        times, cpu = [], []
        for _ in range(args.repeats):
            _sync(args.device)
            t, c = time.perf_counter(), time.process_time()
            d = det.detect(img, score_threshold=args.threshold)
            _sync(args.device)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        line = (f"{os.path.basename(path):24s} {img.shape[3]}x{img.shape[2]}: {d[0].shape[0]} faces, "
                f"ours {statistics.median(times) * 1000:7.1f} ms (min {min(times) * 1000:.1f}, "
                f"process CPU {statistics.median(cpu) * 1000:.0f} ms)")
        if args.batch > 1:
            batch = img.expand(args.batch, -1, -1, -1).contiguous()
            det.detect(batch, score_threshold=args.threshold)
            _sync(args.device)
            t = time.perf_counter()
            det.detect(batch, score_threshold=args.threshold)
            _sync(args.device)
            line += f", batch of {args.batch}: {(time.perf_counter() - t) * 1000 / args.batch:.1f} ms/image"
        if path in ref:
            line += (f"; original package (TensorFlow CPU) {ref[path][0] * 1000:.1f} ms "
                     f"(process CPU {ref[path][2] * 1000:.0f} ms), {ref[path][1]} faces")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
