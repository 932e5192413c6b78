"""Every stage against its reference in one command: one JSON and one Markdown table (seconds, faces/s, peak memory,
ratio reference/ours), and the README's performance section generated from them.

    python benchmarks/suite.py --quick [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--stages align_paste,restore]
                               [--out benchmarks/results] [--threads 2]
    python benchmarks/suite.py --readme benchmarks/results/suite-cpu-fp32.json   # rewrite README's section

Stages (each reuses its benchmarks/bench_*.py functions and the equivalence tests' reference loaders, so the
figures equal the standalone scripts' and the references are the ones the tests hold us to):
  detect_align_paste  RetinaFace + align + paste vs facexlib's FaceRestoreHelper (same weights, same photos);
                      plus the embedded MTCNN detector's detect time per photo (the CLI's default; no reference)
  restore             each restorer vs its official network, real-size architectures, same random weights and
                      faces, the two alternated (--restorers picks): GFPGAN v1.4 vs GFPGANv1Clean, CodeFormer
                      (spandrel_extra_arches' module), RestoreFormer and RestoreFormer++ (spandrel's architecture
                      file), GPEN-BFR-512 (ModelScope's copy of the official generator). Model FLOPs per face and
                      TFLOP/s in the note; on a GPU also % of the bf16 peak, and GFPGAN on one batch of 512 faces
                      (sub-batched to fit the free memory, reported for the 512)
  fast_preset         align -> GFPGAN -> colour fix -> paste vs GFPGANer.enhance (same detections and weights)
  color_fix           wavelet colour fix vs StableSR's formulation (tests/test_color_fix.py)
  zssr                ZSSR x2 on real faces; reference: the paper's 54 s per image per scale (published); also
                      the faces per group a batch of 512 faces would get from the free memory
  onestep             TSD-SR / OSEDiff per image at 512; reference: published times (A100-class; GPU only)
  osdface             OSDFace per 512 face vs the official infer.py (jkwang28/OSDFace at its pin, its CUDA calls
                      pointed at the CPU there) on the tests' tiny files; the real-size architecture (SD-2.1-base
                      UNet + VAE, the full VQ encoder, random weights) per face, against the published ~0.1 s (GPU)
  iqa                 NIQE, MUSIQ, MANIQA, FID features: images/s (no reference run: pyiqa's are the same nets)
  identity            RestorerID's denoiser (structure encoder + UNet, one call at CFG batch 2) vs the official
                      modules (a snapshot of YingJiacheng/RestorerID, tests/restorerid_official.py); on the CPU
                      the tests' tiny config plus a few DDIM steps vs the official sampler, on a GPU (or with
                      --real-size) the published networks with random weights
  adapt               pseudo targets vs the official SamsungLabs generator (a snapshot, tests/adapt_official.py) on
                      the same prior weights and faces, seconds per face per prior step (tiny prior on the CPU,
                      the real-size DifFace prior on a GPU or with --real-size); one fine-tuning step, ours only
--quick keeps every stage to one small case (CPU: minutes on 2 cores; GPU: the real-size one-step models).
Without ../shared, stages that need its photos or weights are reported as skipped with the path they need;
without a snapshot of the official code (identity, adapt), with where it is looked for and how to get it.
A row that fails (a reference that cannot run in --dtype, out of memory, ...) is listed with its error among the
skipped ones; the stage's other rows still run. --device cuda:N synchronises and measures that device.
Peak memory: the peak above the level before the stage (RSS sampled every 2 ms on the CPU,
torch.cuda.max_memory_allocated on a GPU), over the whole stage (both implementations) unless the row says "ours".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import conftest  # noqa: E402,F401  (loads this checkout as `facemend`)
from _common import Peak  # noqa: E402

SHARED = conftest.SHARED
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STAGES = ("detect_align_paste", "restore", "fast_preset", "color_fix", "zssr", "onestep", "osdface", "iqa", "identity",
          "adapt")
README_BEGIN, README_END = "<!-- performance:begin -->", "<!-- performance:end -->"
# Published reference figures (no code to run): ZSSR paper (Shocher et al. 2018, 54 s per image per x2 scale);
# TSD-SR (0.136 s) and OSEDiff (0.105 s) per 512 image on an A100-class GPU.
ZSSR_PAPER_S = 54.0
ONESTEP_PUBLISHED_S = {"tsdsr": 0.136, "osediff": 0.105, "osdface": 0.1}  # OSDFace: ~0.1 s per 512 face


def row(stage, case, ours_s, ref_s=None, faces=None, peak=None, reference="", note=""):
    return {"stage": stage, "case": case, "ours_s": ours_s, "reference_s": ref_s,
            "ratio": (ref_s / ours_s) if ref_s and ours_s else None,
            "faces_per_s": (faces / ours_s) if faces and ours_s else None, "faces": faces,
            "peak_mib": None if peak is None else peak / 2 ** 20, "reference": reference, "note": note}


def skipped(stage, why):
    """A part of a stage that could not run, returned among its rows; listed with the skipped stages."""
    return {"stage": stage, "why": why}


def failed(stage, case, exc):
    """A row that raised: reported with its error (listed with the skipped ones) while the stage's other rows
    run. The traceback goes to the console; CUDA memory the failed attempt held is released."""
    traceback.print_exc()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return skipped(stage, f"{case} failed: {type(exc).__name__}: {first}")


def reference_autocast(call, device, dtype):
    """Run an official network kept in float32 under autocast to `dtype`, as the official inference scripts run
    half precision: casting its weights to bf16/fp16 breaks modules that mix in float32 tensors (spandrel's
    CodeFormer multiplies a float32 one-hot matrix by the codebook)."""
    if dtype == torch.float32:
        return call

    def run(x):
        with torch.autocast(device.type, dtype=dtype):
            return call(x.float())

    return run


StagePeak = Peak  # CUDA allocator peak on a GPU, sampled RSS on the CPU (benchmarks/_common.py)


def throughput(restorer, args) -> None:
    """The throughput switches of FaceRestorer as asked on the command line (else its defaults: the layout per
    architecture and device, no compilation)."""
    restorer.set_throughput(channels_last=args.channels_last, compile=args.compile or None)


def need(*paths):
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"needs {', '.join(missing)} (the shared folder beside the checkout)")


# ------------------------------------------------------------------------------------------------------ stages

def stage_detect_align_paste(args, device, dtype):
    import cv2

    import bench_detect_align_paste as B
    from bench_mtcnn import time_detect
    from facemend.pipelines.io.images import read_image

    need(B.WEIGHTS)
    photos = B.PHOTOS[:2] if args.quick else B.PHOTOS
    ours, helper = B.load_pipelines(device)
    try:
        mtcnn = B.MTCNNDetector.load(device=device)
    except Exception as e:  # noqa: BLE001 - the package holding its weights is optional
        mtcnn = None
        rows = [skipped("detect_align_paste", f"MTCNN rows: {type(e).__name__}: {e}")]
    else:
        rows = []
    for rel in photos:
        path = SHARED / rel
        need(path)
        name = rel.split("/")[-1]
        try:
            image = read_image(str(path))[0].to(device)
            bgr = cv2.imread(str(path))
            with StagePeak(device) as peak:
                n_us, n_fx, t_us, t_fx = B.compare_photo(ours, helper, image, bgr, device, args.repeats)
        except Exception as exc:  # noqa: BLE001 - the other photos still run
            rows.append(failed("detect_align_paste", name, exc))
            continue
        for step in ("detect", "align", "paste"):
            rows.append(row("detect_align_paste", f"{name} {step}", t_us[step], t_fx[step], n_us,
                            reference="facexlib FaceRestoreHelper", note=f"{n_us}/{n_fx} faces"))
        rows.append(row("detect_align_paste", f"{name} total", sum(t_us.values()), sum(t_fx.values()), n_us,
                        peak.used, "facexlib FaceRestoreHelper", f"{image.shape[3]}x{image.shape[2]}"))
        if mtcnn is not None:  # the CLI's default detector (no reference run here: the package needs TensorFlow)
            (d, wall, cpu), = time_detect([mtcnn], image, 1 if args.quick else args.repeats)
            rows.append(row("detect_align_paste", f"{name} MTCNN detect", wall, None, d.shape[0],
                            note=f"embedded MTCNN, score > 0.9, process CPU {cpu:.3f} s"))
    return rows


def _file_restorer(save, name, device, dtype):
    """FaceMend's FaceRestorer loaded from the file `save(path)` writes (a release layout) under the name `name`."""
    import tempfile

    from facemend.pipelines.restore.restorer import FaceRestorer

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        save(path)
        return FaceRestorer.from_file(path, device=device, dtype=dtype)


def _official(loader):
    """A test's loader of an official reference; its pytest.skip (not installed) becomes an ImportError."""
    try:
        return loader()
    except pytest.skip.Exception as exc:
        raise ImportError(str(exc)) from None


def _codeformer_pair(device, dtype):
    """The official CodeFormer (spandrel_extra_arches' copy of the original module) with random weights (the
    equivalence test's initialisation) and FaceMend's FaceRestorer loaded from the same file."""
    import importlib

    from test_restore_codeformer import _randomized

    cls = importlib.import_module("spandrel_extra_arches.architectures.CodeFormer").CodeFormer
    torch.manual_seed(0)
    ref = _randomized(cls(), seed=1)
    ours = _file_restorer(lambda p: torch.save({"params_ema": ref.state_dict()}, p), "codeformer.pth", device, dtype)
    ref = ref.to(device=device).eval()    # float32, under autocast to our dtype
    half = ours.dtype != torch.float32
    return (ours, reference_autocast(lambda x: ref(x, weight=0.5)[0], device, ours.dtype),
            "official CodeFormer (spandrel_extra_arches)" + (" in fp32 + autocast" if half else ""), "w 0.5")


def _restoreformer_pair(device, dtype, plus_plus):
    """The official RestoreFormer (spandrel's copy of the release architecture; RestoreFormer++ as
    tests/test_restore_restoreformer.py builds it from those classes), full size (ch 64, 6 levels), random weights
    (the equivalence test's initialisation), and FaceMend's FaceRestorer loaded from the release checkpoint layout."""
    import importlib

    from test_restore_restoreformer import _plus_plus_reference, _save_official_ckpt, _v1_reference

    mod = importlib.import_module("spandrel.architectures.RestoreFormer.__arch.restoreformer_arch")
    ref = _plus_plus_reference(mod, seed=1) if plus_plus else _v1_reference(mod, seed=1)
    ours = _file_restorer(lambda p: _save_official_ckpt(ref, p, extra=False),
                          "RestoreFormer++.ckpt" if plus_plus else "RestoreFormer.ckpt", device, dtype)
    ref = ref.to(device=device, dtype=ours.dtype).eval()
    what = "RestoreFormer++ (head 4, attention at 16 and 32)" if plus_plus else "RestoreFormer"
    return ours, lambda x: ref(x)[0], f"official {what} (spandrel's architecture file)", ""


def _gpen_pair(device, dtype):
    """The official GPEN generator (ModelScope's copy of yangxy/GPEN with its pure-PyTorch ops, as
    tests/test_restore_gpen.py loads it) in the GPEN-BFR-512 layout (channel multiplier 2, narrow 1) with random
    weights, and FaceMend's FaceRestorer loaded from the same bare state dict."""
    from test_restore_gpen import _build_reference, _load_reference

    ref = _build_reference(_official(_load_reference), 512, 2, 1, seed=2)
    ours = _file_restorer(lambda p: torch.save(ref.state_dict(), p), "GPEN-BFR-512.pth", device, dtype)
    ref = ref.to(device=device, dtype=ours.dtype).eval()
    return ours, lambda x: ref(x)[0], "official GPEN FullGenerator (ModelScope copy, pure-PyTorch ops)", ""


PAIRS = {"codeformer": ("CodeFormer", _codeformer_pair),
         "restoreformer": ("RestoreFormer", lambda d, t: _restoreformer_pair(d, t, False)),
         "restoreformer++": ("RestoreFormer++", lambda d, t: _restoreformer_pair(d, t, True)),
         "gpen": ("GPEN-BFR-512", _gpen_pair)}
RESTORERS = ("gfpgan",) + tuple(PAIRS)


def _flops_note(net, size, s_per_face, args, device) -> str:
    """Model FLOPs per face, achieved TFLOP/s and (on a known GPU or with --peak-tflops) % of the bf16 peak."""
    flops = flops_per_face(net, size)
    if not flops:
        return ""
    achieved = flops / s_per_face / 1e12
    note = f"; {flops / 1e9:.0f} GFLOP/face, {achieved:.2f} TFLOP/s"
    peak_tflops = args.peak_tflops or (known_peak_tflops(device) if device.type == "cuda" else 0)
    if peak_tflops:
        note += f" = {100 * achieved / peak_tflops:.1f}% of {peak_tflops:.0f} TFLOP/s peak"
    return note


def _restore_pair_row(args, device, label, ours, ref_call, reference, note, batch):
    """One batch of random 512 faces through the official network (called as its own code calls it: [-1,1] in,
    raw [-1,1] out) and through FaceRestorer end to end, alternated; max |diff| on the [0,1] outputs."""
    import bench_restore as B

    faces = torch.rand(batch, 3, ours.input_size, ours.input_size,
                       generator=torch.Generator().manual_seed(batch)).to(device)

    def run_ref():
        return (ref_call(((faces - 0.5) / 0.5).to(ours.dtype)).float().clamp(-1, 1) + 1) / 2

    run_ours = lambda: ours(faces, fidelity=0.5, batch_size=batch)  # noqa: E731
    with StagePeak(device) as peak:
        ((t_ref, _), (t_us, _)), (out_ref, out_us) = B.side_by_side(run_ref, run_ours, device,
                                                                    1 if args.quick else args.repeats)
    diff = float((out_us - out_ref).abs().max())
    note = "; ".join(n for n in (note, f"max |diff| {diff:.1e}", _layout(ours)) if n)
    note += _flops_note(ours.net, ours.input_size, t_us / batch, args, device)
    return row("restore", f"{label}, batch {batch}", t_us, t_ref, batch, peak.used, reference, note)


def _layout(restorer) -> str:
    """The memory layout the restorer ran in (its per-architecture/device choice or --channels-last)."""
    cl = getattr(restorer, "channels_last", None)
    return "" if cl is None else ("channels-last" if cl else "NCHW")


def _sub_batch(per_face_bytes, batch, device) -> int:
    """Faces per sub-batch for a big batch: half of the free device memory over the measured peak per face,
    rounded down to a power of 2 (at least 1, at most the batch)."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    fit = int(0.5 * free / per_face_bytes) if per_face_bytes > 0 else batch
    return max(1, min(batch, 1 << max(0, fit.bit_length() - 1)))


BIG_BATCH = 512   # the issue's GPU target: restore at >= 30% of the bf16 peak on 512 faces


def stage_restore(args, device, dtype):
    import bench_restore as B

    batches = ([1] if device.type == "cpu" else [8]) if args.quick else ([1, 4] if device.type == "cpu" else [1, 8, 32])
    rows = []
    # One row's failure (a reference that cannot run in this dtype, out of memory) is that row's result: the
    # stage's other rows still run.
    for name in (n for n in RESTORERS if n in args.restorers and n != "gfpgan"):
        label, make = PAIRS[name]
        try:
            ours, ref_call, reference, note = make(device, dtype)
        except ImportError as exc:
            rows.append(skipped("restore", f"{label}: ImportError: {exc}"))
            continue
        except Exception as exc:  # noqa: BLE001
            rows.append(failed("restore", label, exc))
            continue
        throughput(ours, args)
        for b in batches:
            try:
                rows.append(_restore_pair_row(args, device, label, ours, ref_call, reference, note, b))
            except Exception as exc:  # noqa: BLE001
                rows.append(failed("restore", f"{label}, batch {b}", exc))
        del ours, ref_call
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "gfpgan" not in args.restorers:
        return rows
    try:
        official, ours = B.build_pair(device, dtype)
    except SystemExit as exc:   # the official GFPGAN is not installed: the other restorers' rows stay
        return rows + [skipped("restore", f"GFPGAN: {exc}")]
    except Exception as exc:  # noqa: BLE001
        return rows + [failed("restore", "GFPGAN v1.4", exc)]
    throughput(ours, args)
    per_face = 0
    # On a GPU, one batch of 512 faces after the others (sub-batched to fit: the batch before it gives the
    # memory per face), reported for all 512.
    for batch in batches + ([BIG_BATCH] if device.type == "cuda" else []):
        sub = _sub_batch(per_face, batch, device) if batch == BIG_BATCH else batch
        try:
            with StagePeak(device) as peak:
                r = B.compare(official, ours, batch, device, dtype, 1 if args.quick else args.repeats, sub)
        except Exception as exc:  # noqa: BLE001
            rows.append(failed("restore", f"GFPGAN v1.4, batch {batch}", exc))
            continue
        per_face = max(per_face, peak.used / sub)
        note = f"max |diff| {r['max_abs_diff']:.1e}; {_layout(ours)}"
        note += f"; sub-batches of {sub}" if sub < batch else ""
        note += _flops_note(ours.net, ours.input_size, r["ours_s_per_face"], args, device)
        rows.append(row("restore", f"GFPGAN v1.4, batch {batch}", r["ours_s_per_face"] * batch,
                        r["official_s_per_face"] * batch, batch, peak.used, "official GFPGANv1Clean", note))
    return rows


# Dense bf16 tensor-core peaks (vendor data sheets, SXM parts) for the "% of peak" figure; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def known_peak_tflops(device) -> float:
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)


def flops_per_face(net, size: int):
    """Model FLOPs of one face (2 x multiply-adds, torch's FlopCounterMode) on a meta-device copy: shapes only,
    no compute; None where the network cannot run on meta tensors."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    try:
        meta = copy.deepcopy(net).to("meta")
        with FlopCounterMode(display=False) as counter:
            meta(torch.empty(1, 3, size, size, device="meta"), noise="none", generator=None, fidelity=0.5)
        return counter.get_total_flops()
    except Exception:  # a FLOP figure is a bonus, never a reason to lose the timing
        return None


def stage_fast_preset(args, device, dtype):
    import bench_fast_preset as B

    need(B.DETECTOR)
    reference, ours, detector = B.load_pair(device, dtype)
    throughput(ours, args)
    photos = B.PHOTOS[:1] if args.quick else B.PHOTOS
    max_faces = (1 if device.type == "cpu" else 0) if args.quick else 0
    rows, warm = [], True
    for rel in photos:
        try:
            r = B.compare_photo(reference, ours, detector, SHARED / rel, device, 1 if args.quick else args.repeats,
                                max_faces, warm)
        except Exception as exc:  # noqa: BLE001 - the other photos still run
            rows.append(failed("fast_preset", rel.split("/")[-1], exc))
            continue
        if r is None:
            continue
        warm = False
        rows.append(row("fast_preset", f"{rel.split('/')[-1]}, {r['faces']} face(s)", r["ours_s"], r["reference_s"],
                        r["faces"], r["ours_peak"], "GFPGANer.enhance",
                        f"ours peak; reference +{r['reference_peak'] / 2**20:.0f} MiB; faces PSNR "
                        f"{r['face_psnr']:.1f} dB"))
    return rows


def stage_color_fix(args, device, dtype):
    from test_color_fix import _stablesr_wavelet_fix

    from facemend.pipelines.color.fix import color_fix

    n = 4 if args.quick else 16
    g = torch.Generator().manual_seed(0)
    target, ref = (torch.rand(n, 3, 512, 512, generator=g).to(device) for _ in range(2))

    def timed(fn):
        fn()
        best = float("inf")
        for _ in range(max(1, args.repeats)):
            sync(device)
            t = time.perf_counter()
            out = fn()
            sync(device)
            best = min(best, time.perf_counter() - t)
        return best, out

    with StagePeak(device) as peak:
        t_us, ours = timed(lambda: color_fix(target, ref, "wavelet"))
    t_ref, want = timed(lambda: _stablesr_wavelet_fix(target, ref))
    diff = float((ours - want).abs().max())
    return [row("color_fix", f"wavelet, {n} faces of 512", t_us, t_ref, n, peak.used,
                "StableSR wavelet_color_fix formulation", f"ours peak; max |diff| {diff:.1e}")]


def stage_zssr(args, device, dtype):
    import bench_zssr as B

    need(SHARED / "faces" / "clean", SHARED / "faces" / "aligned_gray_old")
    argv = ["--device", str(device), "--batch", "0"]
    if args.quick:
        argv += ["--steps", "30" if device.type == "cpu" else "300", "--limit", "1", "--only", "aligned_gray_old",
                 "--no-ensemble", "--crop", "64" if device.type == "cpu" else "128"]
    with StagePeak(device) as peak:
        s = B.main(argv)
    sec = s["seconds_per_512_face"]
    note = f"gain {s['mean_gain_db']:+.2f} dB over bicubic ({s['images']} image(s))"
    if s.get("plan_line"):  # the automatic group size a large batch gets on this device (pipelines/tune/memory.py)
        print(f"zssr: a batch of {s['plan_line']}")
        note += f"; {s['plan_faces']} faces of 256 px: {s['plan_faces_per_group']} per group"
    if args.quick:
        note += "; --quick: shortened schedule, not the paper's PSNR"
    return [row("zssr", "x2, 256 -> 512 face", sec, ZSSR_PAPER_S, 1, peak.used, "paper: 54 s per image per scale",
                note)]


def stage_onestep(args, device, dtype):
    import tempfile

    import bench_onestep as B

    rows = []
    real = device.type == "cuda"
    for backend in ("tsdsr", "osediff"):
        try:
            with tempfile.TemporaryDirectory() as folder:
                model = B.real_size_model(backend, device, dtype) if real else \
                    B.tiny_model(backend, device, dtype, folder)
                r = B.measure(model, 512, 1, device, 1 if args.quick else args.repeats, model.tiles)
                del model
        except (ImportError, FileNotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001 - the other backend still runs
            rows.append(failed("onestep", backend, exc))
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row("onestep", f"{backend} 512, {'real-size' if real else 'tiny'} random",
                        r["seconds"], ONESTEP_PUBLISHED_S[backend] if real else None, None,
                        r["peak_mib"] * 2 ** 20, "published (A100-class)" if real else "",
                        "" if real else "tiny models: scaling only, no reference" +
                        ("" if r["finite"] else "; non-finite output")))
    return rows


def _median_time(fn, repeats, device, warm=True):
    if warm:
        fn()
    walls = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        walls.append(time.perf_counter() - t0)
    return sorted(walls)[len(walls) // 2]


def stage_osdface(args, device, dtype):
    import tempfile

    from osdface_models import make_osdface, official_args, official_model, official_modules

    from facemend.pipelines.diffusion.osdface import load_osdface

    rows = []
    repeats = 1 if args.quick else args.repeats
    face = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)).to(device)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        base, own = make_osdface(folder)
        ours = load_osdface(base, own, device=device, dtype=dtype)
        with StagePeak(device) as peak:
            t_us = _median_time(lambda: ours(face, seed=0), repeats, device)
        t_ref, reference = None, ""
        if dtype == torch.float32:
            try:
                from official_code import official_dir

                odir = official_dir("jkwang28/OSDFace")
                with official_modules(odir) as (infer, lq_embed):
                    ref = official_model(infer, lq_embed, official_args(base, own, merge=True),
                                         on_cpu=device.type == "cpu")
                    lq = face * 2 - 1
                    t_ref = _median_time(lambda: ref(lq), repeats, device)
                reference = "official infer.py (merge_lora), same tiny files"
            except pytest.skip.Exception as exc:
                rows.append(skipped("osdface", f"official code: {exc}"))
        rows.append(row("osdface", "tiny files, 1 face 512, merged LoRA", t_us, t_ref, 1, peak.used, reference,
                        "tiny models: scaling only"))
        del ours
    rows.append(_osdface_real_row(args, device, dtype, face, repeats))
    return rows


def _osdface_real_row(args, device, dtype, face, repeats):
    from bench_onestep import SD21_UNET, SD21_VAE
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from facemend.pipelines.diffusion.osdface import (EmbedderConfig, EmbeddingChange, VisualEmbedder,
                                                      osdface_from_modules)

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy on the way
    try:
        with torch.device(device):
            unet, vae = UNet2DConditionModel(**SD21_UNET), AutoencoderKL(**SD21_VAE)
            emb, change = VisualEmbedder(EmbedderConfig()), EmbeddingChange()
    finally:
        torch.set_default_dtype(previous)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    model = osdface_from_modules(unet, vae, sched, emb, change, device, dtype, description="OSDFace (real size)")
    params = sum(p.numel() for p in model.parameters()) / 1e9
    with StagePeak(device) as peak:
        t = _median_time(lambda: model(face, seed=0), repeats, device, warm=device.type == "cuda")
    real_ref = device.type == "cuda"
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row("osdface", f"real-size architecture ({params:.2f} B parameters), 1 face 512, random weights", t,
               ONESTEP_PUBLISHED_S["osdface"] if real_ref else None, 1, peak.used,
               "published (GPU)" if real_ref else "", "" if real_ref else "CPU: no published CPU figure")


def stage_iqa(args, device, dtype):
    import bench_iqa as B

    x = B._faces(2 if args.quick else 8, 512).to(device)
    rows = []
    for name in (("niqe", "musiq") if args.quick else ("niqe", "musiq", "maniqa", "fid")):
        try:
            built = B.build_metric(name, device, 4 if args.quick else 20)
            if built is None:
                continue
            fn, note = built
            with StagePeak(device) as peak:
                ips = B._time(fn, x, device, 1)
        except Exception as exc:  # noqa: BLE001 - the other metrics still run
            rows.append(failed("iqa", name, exc))
            continue
        rows.append(row("iqa", name, x.shape[0] / ips, None, x.shape[0], peak.used, "", note))
    return rows


def stage_identity(args, device, dtype):
    """RestorerID's denoiser (structure encoder + UNet, one call at CFG batch 2) and, on the CPU, a few DDIM steps
    with CFG, ours vs the official modules (YingJiacheng/RestorerID @157e288, imported test-only from a snapshot
    by tests/restorerid_official.py) holding the same weights. CPU: the tests' tiny config (widths 32/64) on their
    16x16 latent (a 64x64 one costs ~2 min there: the attention is quadratic in the area). GPU (or --real-size):
    the published networks (UNet 1.02 B, structure encoder 52 M) with random weights on a 512 face's 64x64
    latent; ours in --dtype, the official in float32 under autocast to --dtype (its Inference.py's "autocast")."""
    import contextlib
    import tempfile

    import bench_identity as BI
    import bench_restore as B
    import restorerid_official as ro
    from restorerid_models import (OFFICIAL_STRUCT_ARGS, OFFICIAL_STRUCT_FULL_ARGS, OFFICIAL_UNET_ARGS,
                                   OFFICIAL_UNET_FULL_ARGS, tiny_structure_encoder, tiny_unet)

    real = device.type == "cuda" or args.real_size
    with tempfile.TemporaryDirectory() as tmp:
        mods = ro.load_official(tmp)
    if real:
        unet, enc = BI.build(True, device, dtype, vae=False)
        o_unet, o_enc = ro.official_nets(mods, unet, enc, OFFICIAL_UNET_FULL_ARGS, OFFICIAL_STRUCT_FULL_ARGS)
        o_unet, o_enc = o_unet.to(device), o_enc.to(device)
    else:
        torch.manual_seed(0)
        unet, enc = tiny_unet().to(device, dtype), tiny_structure_encoder().to(device, dtype)
        o_unet, o_enc = ro.official_nets(mods, unet, enc, OFFICIAL_UNET_ARGS, OFFICIAL_STRUCT_ARGS)
    half = dtype != torch.float32
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if half else contextlib.nullcontext
    g = torch.Generator().manual_seed(5)
    lat = 64 if real else 16    # a 512 face's latent; 16x16 (the tests' size) on the CPU: its attention is O(area^2)
    lq, x, ctx = (torch.randn(2, *shape, generator=g).to(device) for shape in ((4, lat, lat), (4, lat, lat), (81, 768)))
    t = torch.tensor([999, 999], device=device)
    what = "published size, random" if real else "tiny (widths 32/64)"
    reference = "official RestorerID @157e288 (snapshot)"
    precision = f"ours {args.dtype}, official fp32 + autocast {args.dtype}" if half else "fp32"

    def ours():
        return unet(x.to(dtype), t, ctx.to(dtype), enc(lq.to(dtype), t), 0.5).float()

    def official():
        with autocast():
            return o_unet(x, t, context=ctx, struct_cond=o_enc(lq, t), ip_scale=0.5).float()

    repeats = 1 if args.quick else args.repeats
    with StagePeak(device) as peak:
        ((t_ref, _), (t_us, _)), (want, got) = B.side_by_side(official, ours, device, repeats)
    rows = [row("identity", f"denoiser call, CFG batch 2, latent {lat}x{lat}, {what}", t_us, t_ref, None, peak.used,
                reference, f"{precision}; max |diff| {float((got - want).abs().max()):.1e} "
                           f"(output max {float(want.abs().max()):.1e})")]
    if not real:
        rows.append(_identity_sampler_row(args, mods, unet, enc, o_unet, o_enc, lq[:1], ctx[:1], device, repeats))
    return rows


def _identity_sampler_row(args, mods, unet, enc, o_unet, o_enc, lq, ctx, device, repeats, steps=4):
    """ddim_sample against the official DDIMSampler.ddim_sampling_sr_t (eta 1, CFG 4), same start and eta noise,
    the way tests/test_identity_backend.py runs the official sampler."""
    import bench_restore as B
    from test_identity_backend import _official_sample

    from facemend.pipelines.identity.sampler import ddim_sample

    g = torch.Generator().manual_seed(9)
    x_T, noises = torch.randn(lq.shape, generator=g), [torch.randn(lq.shape, generator=g) for _ in range(steps)]
    cond, uncond = ctx, torch.randn(ctx.shape, generator=g).to(device)
    mp = pytest.MonkeyPatch()
    try:
        with StagePeak(device) as peak:
            ((t_ref, _), (t_us, _)), (want, got) = B.side_by_side(
                lambda: _official_sample(mods, o_unet, o_enc, lq, cond, uncond, 0.5, steps, 4.0, x_T, noises, mp),
                lambda: ddim_sample(unet, enc, lq, cond, uncond, ip_scale=0.5, steps=steps, cfg=4.0, x_T=x_T,
                                    noise=lambda i: noises[i]),
                device, repeats)
    finally:
        mp.undo()
    lat = lq.shape[-1]
    return row("identity", f"DDIM sampler, {steps} steps with CFG 4, tiny, latent {lat}x{lat}", t_us, t_ref, None,
               peak.used, "official DDIMSampler.ddim_sampling_sr_t",
               f"max |diff| {float((got - want).abs().max()):.1e}; {t_us / steps:.3f} s/step ours")


def stage_adapt(args, device, dtype):
    """Pseudo targets (pipelines/adapt/pseudo_targets.py) vs the official SamsungLabs unsupervised-face-restoration
    generator (its p_sample_loop with the low-frequency filter, as tests/test_adapt_pseudo_targets.py runs it
    test-only from a snapshot) on the same prior weights and faces, seconds per face per prior step; then one
    fine-tuning step, ours only (GFPGAN + LPIPS-VGG, benchmarks/bench_adapt.py). CPU: the tests' tiny prior at
    32 px; GPU: the real-size DifFace prior (159.8 M, 512 px) with random weights, a few steps. fp32 (the official
    sampler's precision); the fine-tuning step on a GPU in --dtype."""
    import tempfile
    import types

    import bench_adapt as BA
    import bench_identity as BI
    import bench_restore as B
    from adapt_official import difface_unet
    from test_adapt_prior import TINY, tiny_config, tiny_official
    from test_adapt_pseudo_targets import CFG, _faces, _official_targets

    from facemend.pipelines.adapt.prior import PriorUNetConfig, load_prior_unet
    from facemend.pipelines.adapt.pseudo_targets import PseudoTargetConfig, PseudoTargetGenerator

    real, n = device.type == "cuda" or args.real_size, 2
    if real:
        cfg = PriorUNetConfig()
        kwargs = dict(TINY, image_size=cfg.image_size, model_channels=cfg.model_channels,
                      num_res_blocks=list(cfg.num_res_blocks), attention_resolutions=list(cfg.attention_resolutions),
                      channel_mult=list(cfg.channel_mult), num_head_channels=cfg.num_head_channels)
        ref = BI._init_(difface_unet()(**kwargs), seed=1).eval()
        gcfg = PseudoTargetConfig(image_size=cfg.image_size, start_step=4, reg_end_step=2, seed=CFG.seed)
    else:
        cfg, ref, gcfg = tiny_config(), tiny_official(seed=1), CFG
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "prior.pth")
        torch.save(ref.state_dict(), path)
        ours = load_prior_unet(path, device=device, config=cfg)
    ref = ref.to(device)
    faces = _faces(n, cfg.image_size).to(device)
    gen = PseudoTargetGenerator(ours, gcfg)
    steps = gcfg.start_step
    with StagePeak(device) as peak:
        ((t_ref, _), (t_us, _)), (want, got) = B.side_by_side(
            lambda: torch.cat([_official_targets(ref, faces[k:k + 1], gcfg.seed + k, gcfg) for k in range(n)]),
            lambda: gen(faces, batch_size=n), device, 1 if args.quick else args.repeats)
    # Both draw on the prior's device from generators seeded alike (the official's global one per face, ours one
    # per face), in the same order, so the targets agree to float rounding on any device.
    agree = f"max |diff| {float((got - want).abs().max()):.1e}"
    what = f"real-size prior (159.8 M) at {cfg.image_size} px" if real else f"tiny prior at {cfg.image_size} px"
    rows = [row("adapt", f"pseudo targets, s per face per step, {what}", t_us / (n * steps), t_ref / (n * steps),
                None, peak.used, "official generator (SamsungLabs, snapshot)",
                f"{n} faces x {steps} steps ({gcfg.start_step - gcfg.reg_end_step} constrained), ours batch_size "
                f"{n} ({gen_layout(gen, device)}), the official one face at a time; {agree}")]
    del ours, ref, gen
    with torch.enable_grad():
        ft = BA.bench_train(types.SimpleNamespace(real_size=real, train_steps=1 if args.quick else 3, micro_batch=1,
                                                  accumulate=1, precision=args.dtype), device)
    rows.append(row("adapt", f"fine-tuning step, GFPGAN ({ft['params_m']:.0f} M) at {ft['size']} px + LPIPS-VGG, "
                    f"{ft['faces_per_step']} face", ft["step_s"], None, ft["faces_per_step"], ft["peak_mib"] * 2 ** 20,
                    "", "ours only (no official fine-tuning run); median s per optimiser step, peak with the save"))
    return rows


def gen_layout(gen, device) -> str:
    """How the pseudo-target generator ran the prior (its device defaults unless set)."""
    cpu = device.type == "cpu"
    cl = cpu if gen.channels_last is None else gen.channels_last
    per = (1 if cpu else None) if gen.prior_batch is None else gen.prior_batch
    return (f"prior {'channels-last' if cl else 'NCHW'}, "
            f"{'the whole batch' if per is None else f'{per} face(s)'} per call")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------------ output

def machine(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        except (OSError, StopIteration):
            info["cpu"] = platform.processor()
    return info


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    m = result["machine"]
    where = m.get("gpu") or f"{m.get('cpu', 'CPU')}, {m['torch_threads']} torch threads"
    lines = [f"Measured with `benchmarks/suite.py {' '.join(result['argv'])}` on {where} "
             f"(torch {m['torch']}, {result['dtype']}, load average {fmt(m['load_average'], '.1f')} at the start; "
             f"{result['date']}). Ratio = reference seconds / ours (above 1: FaceMend is faster).", "",
             "| stage | case | ours s | reference s | ratio | faces/s | peak MiB | reference | note |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731  (a "|" in a note would split the row)
    for r in result["rows"]:
        lines.append(f"| {r['stage']} | {cell(r['case'])} | {fmt(r['ours_s'], '.3f')} | "
                     f"{fmt(r['reference_s'], '.3f')} | {fmt(r['ratio'], '.2f')} | {fmt(r['faces_per_s'], '.2f')} | "
                     f"{fmt(r['peak_mib'], '.0f')} | {cell(r['reference'])} | {cell(r['note'])} |")
    for s in result["skipped"]:
        lines.append(f"| {s['stage']} | skipped | | | | | | | {cell(s['why'])} |")
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    return "\n".join(lines) + "\n"


def write_readme(json_path: str, readme: Path) -> None:
    """Replace the text between the performance markers of the README with the table of a suite result."""
    result = json.loads(Path(json_path).read_text())
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_BEGIN} ... {README_END} markers")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(head + README_BEGIN + "\n" + markdown(result) + README_END + tail)
    os.replace(tmp, readme)


def run(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and device.index is not None:
        # --device cuda:1: what uses "the current device" (empty_cache, library handles) works on that one too.
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    stages = [s for s in (args.stages.split(",") if args.stages else STAGES) if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    args.restorers = [r for r in args.restorers.split(",") if r] if isinstance(args.restorers, str) else args.restorers
    unknown = [r for r in args.restorers if r not in RESTORERS]
    if unknown:
        raise SystemExit(f"unknown restorer(s) {unknown}; choose from {', '.join(RESTORERS)}")
    result = {"argv": sys.argv[1:], "device": str(device), "dtype": args.dtype, "quick": args.quick,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(device),
              "rows": [], "skipped": []}
    for name in stages:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            rows = globals()[f"stage_{name}"](args, device, dtype)
        except (FileNotFoundError, ImportError, SystemExit, pytest.skip.Exception) as exc:
            result["skipped"].append(skipped(name, f"{type(exc).__name__}: {exc}"))
            print(f"   skipped: {exc}", flush=True)
            continue
        except Exception as exc:  # one stage failing must not lose the others' figures
            traceback.print_exc()
            result["skipped"].append(skipped(name, f"failed: {type(exc).__name__}: {str(exc)[:200]}"))
            continue
        result["skipped"] += [r for r in rows if "why" in r]
        rows = [r for r in rows if "why" not in r]
        result["rows"] += rows
        for r in rows:
            print(f"   {r['case']:40s} ours {fmt(r['ours_s'], '.3f')} s  reference {fmt(r['reference_s'], '.3f')} s  "
                  f"ratio {fmt(r['ratio'], '.2f')}  {r['note']}", flush=True)
        print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="FaceMend's precision where it has one")
    ap.add_argument("--quick", action="store_true", help="one small case per stage")
    ap.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case (the fastest or the median is kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=None,
                    help="restorers in channels-last memory (default: FaceRestorer's choice per architecture and "
                    "device: CPU all, CUDA all but CodeFormer/RestoreFormer)")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="the device's dense bf16 peak for the restore stage's %% of peak (default: known GPUs)")
    ap.add_argument("--restorers", default=",".join(RESTORERS), help="comma-separated restorers of the restore "
                    f"stage, from {','.join(RESTORERS)}")
    ap.add_argument("--real-size", dest="real_size", action="store_true",
                    help="identity and adapt: the published architectures also on the CPU (slow; default on CUDA)")
    ap.add_argument("--compile", default="", help="torch.compile the restorers with this backend (e.g. inductor)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for suite-<device>-<dtype>.json/.md")
    ap.add_argument("--readme", metavar="JSON", help="only rewrite the README's performance section from JSON")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    if args.readme:
        write_readme(args.readme, HERE.parent / "README.md")
        return None
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"suite-{torch.device(args.device).type}-{args.dtype}{'-quick' if args.quick else ''}"
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown(result))):
        tmp = stem.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, stem.with_suffix(suffix))
    print(f"wrote {stem}.json and {stem}.md")
    return result


if __name__ == "__main__":
    main()
