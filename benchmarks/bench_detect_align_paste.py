"""Detect + align + paste-back: FaceMend vs facexlib's FaceRestoreHelper with the same RetinaFace weights.

Both run on the same photos with the real RetinaFace MobileNet-0.25 checkpoint of ../shared/models (facexlib's
mobile0.25 network, its prior boxes patched to that checkpoint's anchors so both decode it correctly). The
"restored" faces are the untouched crops, so the paste is measured on its own. facexlib is measured without and
(on photos with few faces) with its ParseNet paste mask; its LeakyReLUs get slope 0 (the 1MB net uses ReLU) (random ParseNet weights: same cost as the real ones).
Also prints how many faces each detector finds at each detection scale.

    .venv/bin/python benchmarks/bench_detect_align_paste.py [--device cuda] [--parse-max-faces 6] [--repeats 3]
                                                            [--skip-scales]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import conftest  # noqa: E402,F401  (loads this checkout as `facemend`)

from facemend.pipelines.face.align import align_faces, detect_faces  # noqa: E402
from facemend.pipelines.face.mtcnn import MTCNNDetector  # noqa: E402
from facemend.pipelines.face.retinaface import RetinaFaceDetector  # noqa: E402
from facemend.pipelines.face.detection import select_faces  # noqa: E402
from facemend.pipelines.io.images import read_image  # noqa: E402
from facemend.pipelines.face.paste import paste_faces  # noqa: E402

SHARED = conftest.SHARED
PHOTOS = ["faces/clean/t1_six_faces.jpg", "faces/whole_lq_real/00.jpg", "faces/stress/crowd_many_tiny_faces.jpg",
          "faces/stress/phone_photo_large.jpg"]
WEIGHTS = SHARED / "models/facedetection/retinaface_mobilenet0.25_1mb.pth"
ANCHORS_1MB = [[10, 20], [32, 64], [128, 256]]
THRESHOLD = 0.97  # facexlib's FaceRestoreHelper threshold; used for both


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def facexlib_helper(device, use_parse):
    from facexlib.utils.face_restoration_helper import FaceRestoreHelper
    from facexlib.parsing.parsenet import ParseNet

    root = tempfile.mkdtemp()
    os.symlink(WEIGHTS, os.path.join(root, "detection_mobilenet0.25_Final.pth"))
    torch.manual_seed(0)
    torch.save(ParseNet(in_size=512, out_size=512, parsing_ch=19).state_dict(), os.path.join(root, "parsing_parsenet.pth"))
    helper = FaceRestoreHelper(1, face_size=512, det_model="retinaface_mobile0.25", use_parse=use_parse,
                               device=device, model_rootpath=root)
    helper.face_det.cfg["min_sizes"] = ANCHORS_1MB
    for m in helper.face_det.modules():  # the 1MB training uses plain ReLU where facexlib has LeakyReLU(0.1)
        if isinstance(m, torch.nn.LeakyReLU):
            m.negative_slope = 0.0
    return helper


def run_facexlib(helper, bgr, device):
    helper.clean_all()
    helper.read_image(bgr)
    times = {}
    n, times["detect"] = timed(lambda: helper.get_face_landmarks_5(), device)
    _, times["align"] = timed(lambda: helper.align_warp_face(), device)
    for face in helper.cropped_faces:
        helper.add_restored_face(face)
    def paste():
        helper.get_inverse_affine(None)
        return helper.paste_faces_to_input_image()
    out, times["paste"] = timed(paste, device)
    return n, times, out


def run_ours(det, image, device):
    times = {}
    dets, times["detect"] = timed(lambda: detect_faces(image, det, THRESHOLD), device)
    dets = [select_faces(d, image.shape[-2:], min_score=THRESHOLD) for d in dets]
    (crops, alignment), times["align"] = timed(lambda: align_faces(image, dets, 512), device)
    (out, _), times["paste"] = timed(lambda: paste_faces(image, crops, alignment), device)
    return len(alignment), times, out


def compare_photo(ours, helper, image, bgr, device, repeats: int = 1):
    """Both pipelines on one photo, alternating, `repeats` times: per step the fastest run (other load on the
    machine only ever adds time). Returns (faces ours, faces facexlib, times ours, times facexlib)."""
    best_us, best_fx = {}, {}
    for _ in range(max(1, repeats)):
        n_us, t_us, _ = run_ours(ours, image, device)
        n_fx, t_fx, _ = run_facexlib(helper, bgr, device)
        for best, t in ((best_us, t_us), (best_fx, t_fx)):
            for k, v in t.items():
                best[k] = min(best.get(k, v), v)
    return n_us, n_fx, best_us, best_fx


def load_pipelines(device):
    """FaceMend's RetinaFace and facexlib's FaceRestoreHelper (plain paste) on the same weights, warmed up."""
    import cv2

    ours = RetinaFaceDetector.from_file(str(WEIGHTS), device=device)
    fx_plain = facexlib_helper(device, False)
    warm = read_image(str(SHARED / PHOTOS[0]))[0].to(device)
    run_ours(ours, warm, device)
    run_facexlib(fx_plain, cv2.imread(str(SHARED / PHOTOS[0])), device)
    return ours, fx_plain


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parse-max-faces", type=int, default=6, help="run facexlib's parsing paste only up to this many faces")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs per photo; the fastest of each step")
    ap.add_argument("--skip-scales", action="store_true", help="skip the faces-per-detection-scale table")
    args = ap.parse_args()
    device = torch.device(args.device)
    if not WEIGHTS.exists():
        sys.exit(f"needs {WEIGHTS}")
    import cv2

    torch.set_grad_enabled(False)
    ours, fx_plain = load_pipelines(device)
    fx_parse = facexlib_helper(device, True) if args.parse_max_faces > 0 else None
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; threshold {THRESHOLD}; "
          f"fastest of {args.repeats} alternating runs; load average {os.getloadavg()[0]:.2f}")
    header = f"{'photo':34s} {'size':>10s} {'faces us/fx':>11s} {'step':>7s} {'ours s':>8s} {'facexlib s':>10s} {'ratio':>6s}"
    print(header)
    for rel in PHOTOS:
        path = SHARED / rel
        if not path.exists():
            print(f"{rel}: missing, skipped")
            continue
        image = read_image(str(path))[0].to(device)
        bgr = cv2.imread(str(path))
        n_us, n_fx, t_us, t_fx = compare_photo(ours, fx_plain, image, bgr, device, args.repeats)
        size = f"{image.shape[3]}x{image.shape[2]}"
        for step in ("detect", "align", "paste"):
            print(f"{rel.split('/')[-1]:34s} {size:>10s} {f'{n_us}/{n_fx}':>11s} {step:>7s} {t_us[step]:8.3f} "
                  f"{t_fx[step]:10.3f} {t_fx[step] / max(t_us[step], 1e-9):6.1f}x")
        tot_us, tot_fx = sum(t_us.values()), sum(t_fx.values())
        print(f"{'':34s} {'':>10s} {'':>11s} {'total':>7s} {tot_us:8.3f} {tot_fx:10.3f} {tot_fx / tot_us:6.1f}x")
        if fx_parse is not None and n_fx <= args.parse_max_faces:
            _, t_fp, _ = run_facexlib(fx_parse, bgr, device)
            print(f"{'':34s} {'':>10s} {'':>11s} {'paste+parse (facexlib)':>30s} {t_fp['paste']:8.3f} s "
                  f"= {t_fp['paste'] / max(n_fx, 1):.2f} s/face; ours {t_fp['paste'] / t_us['paste']:.0f}x faster")
    if args.skip_scales:
        return
    mtcnn = MTCNNDetector.load(device=device)
    print("\nfaces found per detection scale (longer side; full = no resize), threshold 0.8 / 0.97:")
    for rel in PHOTOS:
        path = SHARED / rel
        if not path.exists():
            continue
        image = read_image(str(path))[0].to(device)
        row = []
        for side in (640, 1024, 1600, 0):
            counts = []
            for det in (ours, mtcnn):
                for thr in (0.8, 0.97):
                    found = detect_faces(image, det, thr, side)[0]
                    counts.append(int((found[:, 4] >= thr).sum()))
            row.append(f"{side or 'full'}: RetinaFace-1mb {counts[0]}/{counts[1]}, MTCNN {counts[2]}/{counts[3]}")
        print(f"  {rel.split('/')[-1]:30s} " + " | ".join(row))


if __name__ == "__main__":
    main()
