"""Speed of the embedded MTCNN detector (pipelines/face/mtcnn.py), optionally next to an older checkout of it and
next to the original package.

    .venv/bin/python benchmarks/bench_mtcnn.py [--device cuda] [--threads 1] [--repeats 3] [--baseline DIR]
                                               [--reference-python /tmp/tfvenv/bin/python] [images ...]

Prints, per image (by default the four photos of the detect/align/paste benchmark: t1_six_faces.jpg,
whole_lq_real/00.jpg, stress/crowd_many_tiny_faces.jpg, stress/phone_photo_large.jpg): size, faces found, and
the fastest of --repeats runs of `detect` after one warm-up, as wall time and as process CPU time (on a busy
machine the CPU time with --threads 1 is the steadier figure; other load only ever adds time, hence the
minimum); with --batch N also a batch of N copies. --baseline DIR times the MTCNNDetector of another checkout
(e.g. `git worktree add /tmp/base main`) on the same pixels, runs alternating with ours, and says whether its
detections are identical. With --reference-python (an interpreter with tensorflow + mtcnn, see
compare_mtcnn_reference.py) also the original package's `detect_faces` time. `time_detect` is what
benchmarks/suite.py's detect_align_paste stage uses for its MTCNN rows.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.environ.get("FACEMEND_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
DEFAULT_IMAGES = [os.path.join(SHARED, "faces", *rel.split("/")) for rel in (
    "clean/t1_six_faces.jpg", "whole_lq_real/00.jpg", "stress/crowd_many_tiny_faces.jpg",
    "stress/phone_photo_large.jpg")]

_REFERENCE_SNIPPET = r"""
import json, sys, time
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
    out[p] = [min(ts), len(r), min(cs)]
print("RESULT " + json.dumps(out))
"""


def _load_facemend(root: str = ROOT, name: str = "facemend"):
    """A checkout loaded as package `name` (this one as `facemend`; --baseline as `facemend_baseline`)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_detect(detectors, image, repeats: int = 3, threshold: float = 0.9):
    """Each detector's `detect(image)`: one warm-up, then `repeats` rounds running the detectors in turn (so that
    other load falls on all alike). Returns per detector (detections of image 0, fastest wall s, fastest
    process CPU s)."""
    out = []
    for det in detectors:
        det.detect(image, score_threshold=threshold)
        out.append([None, float("inf"), float("inf")])
    for _ in range(max(1, repeats)):
        for det, res in zip(detectors, out):
            _sync(image.device)
            t, c = time.perf_counter(), time.process_time()
            d = det.detect(image, score_threshold=threshold)
            _sync(image.device)
            res[0], res[1], res[2] = d[0], min(res[1], time.perf_counter() - t), min(res[2], time.process_time() - c)
    return [tuple(r) for r in out]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*", default=DEFAULT_IMAGES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per image (the fastest is reported)")
    ap.add_argument("--threshold", type=float, default=0.9, help="score threshold (the package's threshold_onet)")
    ap.add_argument("--batch", type=int, default=0, help="also time a batch of this many copies (0: skip)")
    ap.add_argument("--baseline", default=None, help="another checkout whose MTCNN detector is timed alongside")
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

    base = None
    if args.baseline:
        mod = _load_facemend(os.path.abspath(args.baseline), "facemend_baseline")
        base = importlib.import_module(mod.__name__ + ".pipelines.face.mtcnn").MTCNNDetector.load(
            device=args.device, dtype=getattr(torch, args.dtype))
    print(f"fastest of {args.repeats} runs after a warm-up; s = wall seconds, cpu = process CPU seconds")
    for path in args.images:
        if not os.path.isfile(path):
            print(f"{path}: missing, skipped")
            continue
        img = read_image(path)[0].to(args.device)
        timed = time_detect([det] + ([base] if base is not None else []), img, args.repeats, args.threshold)
        d, wall, cpu = timed[0]
        line = (f"{os.path.basename(path):26s} {img.shape[3]:5d}x{img.shape[2]:<5d} {d.shape[0]:4d} faces: "
                f"ours {wall:7.3f} s (cpu {cpu:7.3f} s)")
        if base is not None:
            bd, bwall, bcpu = timed[1]
            same = bd.shape == d.shape and torch.equal(bd.cpu(), d.cpu())
            line += (f"; baseline {bwall:7.3f} s (cpu {bcpu:7.3f} s), {bcpu / cpu:4.2f}x by cpu, "
                     f"detections {'identical' if same else 'DIFFERENT'}")
        if args.batch > 1:
            batch = img.expand(args.batch, -1, -1, -1).contiguous()
            det.detect(batch, score_threshold=args.threshold)
            _sync(args.device)
            t = time.perf_counter()
            det.detect(batch, score_threshold=args.threshold)
            _sync(args.device)
            line += f", batch of {args.batch}: {(time.perf_counter() - t) / args.batch:.3f} s/image"
        if path in ref:
            line += (f"; original package (TensorFlow CPU) {ref[path][0]:.3f} s "
                     f"(process CPU {ref[path][2]:.3f} s), {ref[path][1]} faces")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
