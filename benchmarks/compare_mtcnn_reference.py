"""Compare FaceMend's torch MTCNN with the original `mtcnn` package (TensorFlow) on real photos.

The reference needs TensorFlow, which the project environment does not have: keep it in a separate
virtual environment and point --reference-python at it, e.g.

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu mtcnn==1.0.0 pillow
    .venv/bin/python benchmarks/compare_mtcnn_reference.py --reference-python /tmp/tfvenv/bin/python

The script re-runs itself under that interpreter with --dump-reference (which imports only numpy, PIL and
mtcnn) and compares the saved detections with ours, face by face (matched by IoU). Both sides see exactly the
same RGB uint8 pixels (PIL, EXIF rotation applied, alpha dropped). Prints per image: face counts, and for
matched faces the largest box / landmark / score differences in pixels. --numpy-ties orders exactly equal
scores the way numpy does on this machine (as the package does), which removes the few remaining differences.
Timings are single runs after a warm-up, on whatever load the machine has: use bench_mtcnn.py for speed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.environ.get("FACEMEND_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))


def default_images() -> list[str]:
    faces = os.path.join(SHARED, "faces")
    files = [os.path.join(faces, "clean", "t1_six_faces.jpg")]
    files += sorted(glob.glob(os.path.join(faces, "whole_lq_real", "*.*")))
    files += [os.path.join(faces, "clean", "astronaut.png"), os.path.join(faces, "clean", "ffhq_00000000.png"),
              os.path.join(faces, "stress", "crowd_many_tiny_faces.jpg")]
    files += sorted(glob.glob(os.path.join(faces, "aligned_lq_real", "*.png")))[:6]
    return [f for f in files if os.path.isfile(f)]


def read_rgb(path: str) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def dump_reference(paths: list[str], out: str, threshold_onet: float, min_face_size: float) -> None:
    """Runs under the TensorFlow interpreter: the original package, rows [x1,y1,x2,y2,score,(x,y)*5]."""
    from mtcnn import MTCNN

    det = MTCNN()
    arrays, times = {}, {}
    for i, p in enumerate(paths):
        img = read_rgb(p)
        det.detect_faces(img)  # warm-up (graph tracing) per size
        t = time.perf_counter()
        r = det.detect_faces(img, box_format="xyxy", output_type="numpy", threshold_onet=threshold_onet,
                             min_face_size=min_face_size)
        times[p] = time.perf_counter() - t
        r = np.asarray(r, dtype=np.float64).reshape(-1, 16)
        pts = np.stack([r[:, 6:11], r[:, 11:16]], axis=2).reshape(-1, 10)
        arrays[f"d{i}"] = np.concatenate([r[:, 1:6], pts], axis=1)
    np.savez(out, paths=np.asarray(paths), times=json.dumps(times), **arrays)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def match(ref: np.ndarray, ours: np.ndarray, min_iou: float = 0.5):
    pairs = []
    if len(ref) and len(ours):
        iou = box_iou(ref, ours)
        while True:
            i, j = np.unravel_index(np.argmax(iou), iou.shape)
            if iou[i, j] < min_iou:
                break
            pairs.append((i, j))
            iou[i, :] = -1
            iou[:, j] = -1
    return pairs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*", help="image files (default: shared photos)")
    ap.add_argument("--reference-python", default=os.environ.get("MTCNN_REFERENCE_PYTHON", "/tmp/tfvenv/bin/python"))
    ap.add_argument("--threshold", type=float, default=0.8, help="O-Net threshold on both sides (package default 0.8)")
    ap.add_argument("--min-face-size", type=float, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--numpy-ties", action="store_true",
                    help="order exactly equal scores like numpy's argsort (as the package does on this machine) "
                         "instead of FaceMend's deterministic rule; shows that all remaining differences are ties")
    ap.add_argument("--dump-reference", help=argparse.SUPPRESS)
    args = ap.parse_args()
    paths = args.images or default_images()
    if args.dump_reference:
        dump_reference(paths, args.dump_reference, args.threshold, args.min_face_size)
        return 0
    if not paths:
        print("no images found (set FACEMEND_SHARED or pass files)")
        return 1
    if not os.path.isfile(args.reference_python):
        print(f"reference interpreter {args.reference_python} not found; see the module docstring")
        return 1

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ref.npz")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
        subprocess.run([args.reference_python, os.path.abspath(__file__), "--dump-reference", out,
                        "--threshold", str(args.threshold), "--min-face-size", str(args.min_face_size), *paths],
                       check=True, env=env)
        ref = np.load(out)
        ref_dets = [ref[f"d{i}"] for i in range(len(paths))]
        ref_times = json.loads(str(ref["times"]))

    import torch

    sys.path.insert(0, os.path.dirname(ROOT))
    import importlib.util

    if "facemend" not in sys.modules:
        spec = importlib.util.spec_from_file_location("facemend", os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["facemend"] = mod
        spec.loader.exec_module(mod)
    from facemend.pipelines.face.mtcnn import MTCNNDetector

    det = MTCNNDetector.load(device=args.device)
    if args.numpy_ties:
        import facemend.pipelines.face.mtcnn as detect_mtcnn

        detect_mtcnn.NUMPY_TIE_ORDER = True
    worst = {"box": 0.0, "lmk": 0.0, "score": 0.0}
    total_ref = total_ours = total_matched = total_moved = 0
    box_diffs = []
    print(f"{'image':42s} {'size':>10s} {'ref':>4s} {'ours':>4s} {'match':>5s} {'box max':>8s} {'lmk max':>8s} "
          f"{'score':>8s} {'t ref':>6s} {'t ours':>6s}")
    for p, r in zip(paths, ref_dets):
        img = torch.from_numpy(read_rgb(p).copy()).permute(2, 0, 1)[None].float().div(255).to(args.device)
        det.detect(img, score_threshold=args.threshold, min_face_size=args.min_face_size)
        t = time.perf_counter()
        o = det.detect(img, score_threshold=args.threshold, min_face_size=args.min_face_size)[0].cpu().double().numpy()
        t_ours = time.perf_counter() - t
        pairs = match(r, o)
        per_face = [np.abs(r[i, :4] - o[j, :4]).max() for i, j in pairs]
        box_diffs += per_face
        moved = sum(d > 0.01 for d in per_face)
        total_moved += moved
        db = max([np.abs(r[i, :4] - o[j, :4]).max() for i, j in pairs], default=0.0)
        dl = max([np.abs(r[i, 5:] - o[j, 5:]).max() for i, j in pairs], default=0.0)
        ds = max([abs(r[i, 4] - o[j, 4]) for i, j in pairs], default=0.0)
        worst = {"box": max(worst["box"], db), "lmk": max(worst["lmk"], dl), "score": max(worst["score"], ds)}
        total_ref, total_ours, total_matched = total_ref + len(r), total_ours + len(o), total_matched + len(pairs)
        name = os.path.relpath(p, os.path.join(SHARED, "faces")) if p.startswith(SHARED) else p
        print(f"{name[-42:]:42s} {img.shape[3]:>4d}x{img.shape[2]:<5d} {len(r):4d} {len(o):4d} {len(pairs):5d} "
              f"{db:8.4f} {dl:8.4f} {ds:8.2e} {ref_times[p]:6.2f} {t_ours:6.2f}"
              + (f"  ({moved} moved > 0.01 px)" if moved else ""))
        for i in sorted(set(range(len(r))) - {i for i, _ in pairs}):
            print(f"    only in reference: box {np.round(r[i, :4], 1).tolist()} score {r[i, 4]:.4f}")
        for j in sorted(set(range(len(o))) - {j for _, j in pairs}):
            print(f"    only in ours:      box {np.round(o[j, :4], 1).tolist()} score {o[j, 4]:.4f}")
    print(f"total faces: reference {total_ref}, ours {total_ours}, matched {total_matched}; "
          f"worst matched differences: box {worst['box']:.4f} px, landmarks {worst['lmk']:.4f} px, "
          f"score {worst['score']:.2e}")
    if box_diffs:
        d = np.asarray(box_diffs)
        print(f"matched faces with box difference <= 0.001 px: {(d <= 1e-3).sum()}, <= 0.01 px: {(d <= 1e-2).sum()}, "
              f"> 0.01 px: {(d > 1e-2).sum()} (median {np.median(d):.2e} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
