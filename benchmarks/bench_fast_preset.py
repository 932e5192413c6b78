"""Whole photos through the `fast` preset (align -> GFPGAN v1.4 -> wavelet colour fix -> paste-back) vs GFPGAN's
own reference pipeline GFPGANer.enhance, with the same restorer weights and the same faces.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_fast_preset.py [--device cuda] [--dtype fp16]
        [--photos faces/clean/t1_six_faces.jpg ...] [--max-faces 0] [--repeats 1] [--weights GFPGANv1.4.pth]

- Weights: one file for both, random-init GFPGAN v1.4 (the official class's own initialisation, seed 0; its
  noise strengths start at 0, so the stochastic noise of the official network does not make the outputs differ)
  saved as {'params_ema': ...} like the release; or a real file with --weights.
- Faces: the real RetinaFace (../shared/models/facedetection/retinaface_mobilenet0.25_1mb.pth) runs once per
  photo through FaceMend's loader; both pipelines get its landmarks. GFPGANer's FaceRestoreHelper is built with
  its detector/parser constructors replaced by no-ops (nothing is fetched) and `get_face_landmarks_5` replaced by
  one that returns those landmarks; its paste uses the plain feathered mask (use_parse=False: the ParseNet mask
  is a paste-back option of its own). Detection time is reported apart, not in either pipeline's time.
- GFPGANer (gfpgan/utils.py from the installed wheel) is loaded without basicsr: benchmarks/_basicsr_shim.py
  reproduces the two basicsr helpers it uses, and its network is the official GFPGANv1Clean loaded as in
  tests/test_restore_gfpgan.py. upscale=1 (FaceMend pastes at the input size).
- "ours" is the fast preset's face path on the same detections: BGR uint8 -> tensor on the device, align_faces,
  FaceRestorer (automatic batch size: 8 faces a call on a GPU, 1 on a CPU), wavelet colour fix against the
  input crops, paste_faces, back to a BGR uint8 array. Times are wall seconds (median of --repeats after a
  warm-up on the first photo); peak memory is the peak RSS above the baseline before each run (CPU; sampled
  every 2 ms) or torch.cuda.max_memory_allocated (GPU).
- Same output: PSNR of the restored faces (FaceRestorer on GFPGANer's own crops vs GFPGANer's restored faces,
  uint8), and of the whole pasted photos, without colour fix (the same restoration and paste, different
  alignment fit: facexlib uses cv2 LMEDS, FaceMend least squares; different feather masks) and with it (the
  preset).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import conftest  # noqa: E402,F401  (loads this checkout as `facemend`)

from facemend.pipelines.face.align import align_faces, detect_faces  # noqa: E402
from facemend.pipelines.color.fix import color_fix  # noqa: E402
from facemend.pipelines.face.retinaface import RetinaFaceDetector  # noqa: E402
from facemend.pipelines.face.detection import select_faces  # noqa: E402
from facemend.pipelines.face.paste import paste_faces  # noqa: E402
from facemend.pipelines.restore.restorer import FaceRestorer  # noqa: E402
from _common import PeakRSS  # noqa: E402

SHARED = conftest.SHARED
DETECTOR = SHARED / "models/facedetection/retinaface_mobilenet0.25_1mb.pth"
PHOTOS = ["faces/clean/t1_six_faces.jpg", "faces/whole_lq_real/00.jpg", "faces/whole_lq_real/01.jpg"]
THRESHOLD = 0.97                                   # facexlib's FaceRestoreHelper threshold
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
V14 = dict(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
           num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)


# ---------------------------------------------------------------------------------------------------- reference

def load_gfpganer():
    """GFPGANer class from the gfpgan wheel, with the basicsr shim and the official clean architecture."""
    import pytest

    from test_restore_gfpgan import _load_official_arch

    try:
        clean_cls = _load_official_arch()
    except pytest.skip.Exception as exc:
        sys.exit(f"reference unavailable: {exc}")
    import _basicsr_shim as shim
    import facexlib.utils.face_restoration_helper as frh

    # Nothing may be fetched: the helper's detector and parser are never used here.
    frh.init_detection_model = lambda *a, **k: None
    frh.init_parsing_model = lambda *a, **k: None

    gfpgan_dir = list(importlib.util.find_spec("gfpgan").submodule_search_locations)[0]
    mods = {n: types.ModuleType(n) for n in (
        "basicsr", "basicsr.utils", "basicsr.utils.download_util", "gfpgan", "gfpgan.archs",
        "gfpgan.archs.gfpgan_bilinear_arch", "gfpgan.archs.gfpganv1_arch", "gfpgan.archs.gfpganv1_clean_arch")}
    mods["basicsr.utils"].img2tensor = shim.img2tensor
    mods["basicsr.utils"].tensor2img = shim.tensor2img
    mods["basicsr.utils.download_util"].load_file_from_url = shim.load_file_from_url
    mods["gfpgan.archs.gfpgan_bilinear_arch"].GFPGANBilinear = None        # arch='clean' only
    mods["gfpgan.archs.gfpganv1_arch"].GFPGANv1 = None
    mods["gfpgan.archs.gfpganv1_clean_arch"].GFPGANv1Clean = clean_cls
    saved = {n: sys.modules.get(n) for n in mods}
    sys.modules.update(mods)
    try:
        spec = importlib.util.spec_from_file_location("_bench_gfpgan_utils", os.path.join(gfpgan_dir, "utils.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old
    return module.GFPGANer, clean_cls


def make_gfpganer(cls, weights: str, device):
    g = cls(model_path=weights, upscale=1, arch="clean", channel_multiplier=2, device=device)
    g.face_helper.use_parse = False
    return g


def inject_landmarks(helper, dets: np.ndarray) -> None:
    """helper.get_face_landmarks_5 returns the given detections (rows: box 4, score, 5 landmarks) instead."""
    def get_face_landmarks_5(*_args, **_kwargs):
        helper.all_landmarks_5 = [row[5:15].reshape(5, 2).astype(np.float32) for row in dets]
        helper.det_faces = [row[:5].astype(np.float32) for row in dets]
        return len(dets)

    helper.get_face_landmarks_5 = get_face_landmarks_5


# ---------------------------------------------------------------------------------------------------- ours

def run_ours(restorer, bgr: np.ndarray, dets: torch.Tensor, device, color: str = "wavelet") -> np.ndarray:
    image = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).to(device).permute(2, 0, 1)[None].float() / 255
    crops, alignment = align_faces(image, [dets], 512)
    restored = restorer(crops)  # the preset's automatic batch size (1 on a CPU, 8 on a GPU)
    restored = color_fix(restored, crops, color)
    out, _ = paste_faces(image, restored, alignment)
    return (out[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).flip(-1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------- measuring

def measure(fn, device, repeats: int):
    times, mem, out = [], 0, None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            t = time.perf_counter()
            out = fn()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
            mem = max(mem, torch.cuda.max_memory_allocated(device) - base)
        else:
            with PeakRSS() as p:
                t = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t)
            mem = max(mem, p.used)
    return statistics.median(times), mem, out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def compare_photo(reference, ours, detector, path, device, repeats: int = 1, max_faces: int = 0, warm: bool = True):
    """GFPGANer.enhance and the fast preset on one photo with the same detections; None when the photo is missing
    or has no face. Times: median of `repeats` (after a warm-up of both when `warm`); peaks: see measure()."""
    import cv2

    if not Path(path).exists():
        print(f"{path}: missing, skipped")
        return None
    bgr = cv2.imread(str(path))
    image = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).to(device).permute(2, 0, 1)[None].float() / 255
    t = time.perf_counter()
    dets = detect_faces(image, detector, THRESHOLD)
    dets = select_faces(dets[0], image.shape[-2:], min_score=THRESHOLD)
    t_det = time.perf_counter() - t
    if max_faces:
        dets = dets[:max_faces]
    n = int(dets.shape[0])
    if n == 0:
        print(f"{path}: no face at threshold {THRESHOLD}, skipped")
        return None
    inject_landmarks(reference.face_helper, dets.cpu().numpy())
    run_ref = lambda: reference.enhance(bgr, has_aligned=False, paste_back=True)  # noqa: E731
    run_us = lambda: run_ours(ours, bgr, dets, device)  # noqa: E731
    if warm:
        run_ref(), run_us()
    t_ref, m_ref, (ref_crops, ref_faces, ref_img) = measure(run_ref, device, repeats)
    t_us, m_us, our_img = measure(run_us, device, repeats)
    # Same restoration: our restorer on GFPGANer's own crops vs its restored faces (uint8 BGR).
    crops = torch.from_numpy(np.stack(ref_crops)[..., ::-1].copy()).to(device).permute(0, 3, 1, 2).float() / 255
    faces = (ours(crops) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).flip(-1).cpu().numpy()
    plain = run_ours(ours, bgr, dets, device, color="none")
    return {"shape": bgr.shape, "faces": n, "detect_s": t_det, "reference_s": t_ref, "ours_s": t_us,
            "reference_peak": m_ref, "ours_peak": m_us, "face_psnr": psnr(faces, np.stack(ref_faces)),
            "face_max": int(np.abs(faces.astype(int) - np.stack(ref_faces).astype(int)).max()),
            "photo_psnr_plain": psnr(plain, ref_img), "photo_psnr": psnr(our_img, ref_img)}


def load_pair(device, dtype, weights=None):
    """(GFPGANer, FaceMend FaceRestorer, RetinaFace detector) on the same weights (random seeded v1.4 or a file)."""
    GFPGANer, clean_cls = load_gfpganer()
    if weights is None:
        torch.manual_seed(0)
        weights = os.path.join(tempfile.mkdtemp(), "GFPGANv1.4-random.pth")
        torch.save({"params_ema": clean_cls(**V14).state_dict()}, weights)
    reference = make_gfpganer(GFPGANer, weights, device)
    ours = FaceRestorer.from_file(weights, device=device, dtype=dtype)
    detector = RetinaFaceDetector.from_file(str(DETECTOR), device=device)
    return reference, ours, detector


# ---------------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="FaceMend's precision (GFPGANer: fp32)")
    ap.add_argument("--photos", nargs="+", default=PHOTOS, help="paths relative to ../shared")
    ap.add_argument("--max-faces", type=int, default=0, help="use at most this many faces per photo (0: all)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--weights", default=None, help="a real GFPGANv1.4.pth (default: random-init v1.4)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not DETECTOR.exists():
        sys.exit(f"needs {DETECTOR}")

    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    reference, ours, detector = load_pair(device, DTYPES[args.dtype], args.weights)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, FaceMend {ours.dtype}, "
          f"load average {os.getloadavg()[0]:.2f}")

    rows, warm = [], True
    for rel in args.photos:
        r = compare_photo(reference, ours, detector, SHARED / rel, device, args.repeats, args.max_faces, warm)
        if r is None:
            continue
        warm = False
        rows.append((rel, r["shape"], r["faces"], r["detect_s"], r["reference_s"], r["ours_s"], r["reference_peak"],
                     r["ours_peak"], r["face_psnr"], r["face_max"], r["photo_psnr_plain"], r["photo_psnr"]))
        r = rows[-1]
        bgr_shape, n, t_det, t_ref, t_us, m_ref, m_us = r[1], r[2], r[3], r[4], r[5], r[6], r[7]
        print(f"{rel}: {bgr_shape[1]}x{bgr_shape[0]}, {n} faces (detection {t_det:.2f} s, shared)\n"
              f"  GFPGANer.enhance  {t_ref:7.2f} s/image {t_ref / n:6.2f} s/face  peak +{m_ref / 2**20:7.0f} MiB\n"
              f"  FaceMend fast     {t_us:7.2f} s/image {t_us / n:6.2f} s/face  peak +{m_us / 2**20:7.0f} MiB"
              f"   -> {t_ref / t_us:.2f}x faster, {m_ref / max(m_us, 1):.2f}x less memory\n"
              f"  same output: restored faces PSNR {r[8]:.1f} dB (max |diff| {r[9]}/255); whole photo PSNR "
              f"{r[10]:.1f} dB without colour fix, {r[11]:.1f} dB with the preset's wavelet fix", flush=True)
    if rows:
        faces = sum(r[2] for r in rows)
        t_ref, t_us = sum(r[4] for r in rows), sum(r[5] for r in rows)
        print(f"\nall photos: {len(rows)} images, {faces} faces; GFPGANer {t_ref / faces:.2f} s/face, "
              f"FaceMend {t_us / faces:.2f} s/face, ratio {t_ref / t_us:.2f}x")


if __name__ == "__main__":
    main()
