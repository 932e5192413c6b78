"""CPU/GPU timing of FaceMend's RetinaFace against facexlib's detect_faces, same weights, same photos.

Uses the real Face-Detector-1MB checkpoint (../shared/models/facedetection/retinaface_mobilenet0.25_1mb.pth).
facexlib cannot decode that training as shipped, so its mobile0.25 net is patched to it: the 1MB anchors
(min_sizes [[10,20],[32,64],[128,256]]) and plain ReLU instead of LeakyReLU(0.1) (Face-Detector-1MB's net).
Both then give the same detections (checked and printed).

    python benchmarks/bench_retinaface.py [--device cpu|cuda] [--repeat 5] [--threads N]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "models" / "facedetection" / "retinaface_mobilenet0.25_1mb.pth"
IMAGES = [SHARED / "faces" / "clean" / "t1_six_faces.jpg", SHARED / "faces" / "whole_lq_real" / "00.jpg"]


def _import_checkout():
    if "facemend" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "facemend", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["facemend"] = mod
        spec.loader.exec_module(mod)
    from facemend.pipelines.face.retinaface import RetinaFaceDetector

    return RetinaFaceDetector


def _facexlib_1mb(device: str):
    from facexlib.detection.retinaface import RetinaFace

    net = RetinaFace(network_name="mobile0.25", half=False, phase="test", device=device)
    sd = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    net.load_state_dict({k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}, strict=True)
    net.cfg["min_sizes"] = [[10, 20], [32, 64], [128, 256]]
    for m in net.modules():
        if isinstance(m, torch.nn.LeakyReLU):
            m.negative_slope = 0.0
    return net.to(device).eval()


def _time(fn, repeat: int, device: str) -> float:
    fn()  # warm-up (allocations, cudnn/oneDNN kernel choice, prior-box cache)
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--threshold", type=float, default=0.8)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import cv2

    RetinaFaceDetector = _import_checkout()
    ours = RetinaFaceDetector.from_file(str(WEIGHTS), device=args.device)
    ref = _facexlib_1mb(args.device)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.repeat} runs after one warm-up; anchors: {ours.anchors}")
    print(f"{'image':<22}{'size':>11}{'faces':>7}{'facexlib s':>12}{'ours s':>10}{'speed-up':>10}  max |diff| px")
    for path in IMAGES:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        rgb = torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1]).astype(np.float32) / 255.0)
        rgb = rgb.permute(2, 0, 1)[None].contiguous().to(args.device)

        def run_ref():
            with torch.inference_mode():
                return ref.detect_faces(bgr, conf_threshold=args.threshold, nms_threshold=0.4)

        def run_ours():
            return ours.detect(rgb, score_threshold=args.threshold, nms_threshold=0.4)[0]

        want, got = run_ref(), run_ours().cpu().numpy()
        diff = float(np.abs(want - got).max()) if want.shape == got.shape else float("nan")
        t_ref, t_ours = _time(run_ref, args.repeat, args.device), _time(run_ours, args.repeat, args.device)
        h, w = bgr.shape[:2]
        print(f"{path.name:<22}{f'{w}x{h}':>11}{f'{len(got)}/{len(want)}':>7}{t_ref:>12.4f}{t_ours:>10.4f}"
              f"{t_ref / t_ours:>9.2f}x  {diff:.2e}")


if __name__ == "__main__":
    main()
