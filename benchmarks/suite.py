"""Every stage against its reference in one command: one JSON and one Markdown table (seconds, faces/s, peak memory,
ratio reference/ours), and the README's performance section generated from them.

    python benchmarks/suite.py --quick [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--stages align_paste,restore]
                               [--out benchmarks/results] [--threads 2]
    python benchmarks/suite.py --readme benchmarks/results/suite-cpu-fp32.json   # rewrite README's section

Stages (each reuses its benchmarks/bench_*.py functions, so the figures equal the standalone scripts'):
  detect_align_paste  RetinaFace + align + paste vs facexlib's FaceRestoreHelper (same weights, same photos)
  restore             GFPGAN v1.4 vs the official GFPGANv1Clean, CodeFormer vs the official module (same random
                      weights; --restorers picks)
  fast_preset         align -> GFPGAN -> colour fix -> paste vs GFPGANer.enhance (same detections and weights)
  color_fix           wavelet colour fix vs StableSR's formulation (tests/test_color_fix.py)
  zssr                ZSSR x2 on real faces; reference: the paper's 54 s per image per scale (published); also
                      the faces per group a batch of 512 faces would get from the free memory
  onestep             TSD-SR / OSEDiff per image at 512; reference: published times (A100-class; GPU only)
  iqa                 NIQE, MUSIQ, MANIQA, FID features: images/s (no reference run: pyiqa's are the same nets)
--quick keeps every stage to one small case (CPU: minutes on 2 cores; GPU: the real-size one-step models).
Without ../shared, stages that need its photos or weights are reported as skipped with the path they need.
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

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import conftest  # noqa: E402,F401  (loads this checkout as `facemend`)
from _common import Peak  # noqa: E402

SHARED = conftest.SHARED
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STAGES = ("detect_align_paste", "restore", "fast_preset", "color_fix", "zssr", "onestep", "iqa")
README_BEGIN, README_END = "<!-- performance:begin -->", "<!-- performance:end -->"
# Published reference figures (no code to run): ZSSR paper (Shocher et al. 2018, 54 s per image per x2 scale);
# TSD-SR (0.136 s) and OSEDiff (0.105 s) per 512 image on an A100-class GPU.
ZSSR_PAPER_S = 54.0
ONESTEP_PUBLISHED_S = {"tsdsr": 0.136, "osediff": 0.105}


def row(stage, case, ours_s, ref_s=None, faces=None, peak=None, reference="", note=""):
    return {"stage": stage, "case": case, "ours_s": ours_s, "reference_s": ref_s,
            "ratio": (ref_s / ours_s) if ref_s and ours_s else None,
            "faces_per_s": (faces / ours_s) if faces and ours_s else None, "faces": faces,
            "peak_mib": None if peak is None else peak / 2 ** 20, "reference": reference, "note": note}


StagePeak = Peak  # CUDA allocator peak on a GPU, sampled RSS on the CPU (benchmarks/_common.py)


def throughput(restorer, args) -> None:
    """The GPU throughput switches of FaceRestorer as asked on the command line (channels-last by default on CUDA)."""
    channels_last = args.channels_last if args.channels_last is not None else torch.device(args.device).type == "cuda"
    restorer.set_throughput(channels_last=channels_last, compile=args.compile or None)


def need(*paths):
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"needs {', '.join(missing)} (the shared folder beside the checkout)")


# ------------------------------------------------------------------------------------------------------ stages

def stage_detect_align_paste(args, device, dtype):
    import cv2

    import bench_detect_align_paste as B
    from facemend.pipelines.io.images import read_image

    need(B.WEIGHTS)
    photos = B.PHOTOS[:2] if args.quick else B.PHOTOS
    ours, helper = B.load_pipelines(device)
    rows = []
    for rel in photos:
        path = SHARED / rel
        need(path)
        image = read_image(str(path))[0].to(device)
        bgr = cv2.imread(str(path))
        with StagePeak(device) as peak:
            n_us, n_fx, t_us, t_fx = B.compare_photo(ours, helper, image, bgr, device, args.repeats)
        name = rel.split("/")[-1]
        for step in ("detect", "align", "paste"):
            rows.append(row("detect_align_paste", f"{name} {step}", t_us[step], t_fx[step], n_us,
                            reference="facexlib FaceRestoreHelper", note=f"{n_us}/{n_fx} faces"))
        rows.append(row("detect_align_paste", f"{name} total", sum(t_us.values()), sum(t_fx.values()), n_us,
                        peak.used, "facexlib FaceRestoreHelper", f"{image.shape[3]}x{image.shape[2]}"))
    return rows


def _codeformer_pair(device, dtype):
    """The official CodeFormer (spandrel_extra_arches' copy of the original module) with random weights (the
    equivalence test's initialisation) and FaceMend's FaceRestorer loaded from the same file."""
    import importlib
    import tempfile

    from test_restore_codeformer import _randomized

    from facemend.pipelines.restore.restorer import FaceRestorer

    cls = importlib.import_module("spandrel_extra_arches.architectures.CodeFormer").CodeFormer
    torch.manual_seed(0)
    ref = _randomized(cls(), seed=1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "codeformer.pth")
        torch.save({"params_ema": ref.state_dict()}, path)
        ours = FaceRestorer.from_file(path, device=device, dtype=dtype)
    return ref.to(device=device, dtype=ours.dtype).eval(), ours


def _restore_codeformer(args, device, dtype, batch):
    import bench_restore as B

    ref, ours = _codeformer_pair(device, dtype)
    throughput(ours, args)
    faces = torch.rand(batch, 3, 512, 512, generator=torch.Generator().manual_seed(batch)).to(device)

    def run_ref():
        out = ref(((faces - 0.5) / 0.5).to(ours.dtype), weight=0.5)[0]
        return (out.float().clamp(-1, 1) + 1) / 2

    run_ours = lambda: ours(faces, fidelity=0.5, batch_size=batch)  # noqa: E731
    with StagePeak(device) as peak:
        t_ref, _ = B._time(run_ref, device, 1 if args.quick else args.repeats)
        t_us, _ = B._time(run_ours, device, 1 if args.quick else args.repeats)
    diff = float((run_ours() - run_ref()).abs().max())
    return row("restore", f"CodeFormer, batch {batch}", t_us, t_ref, batch, peak.used,
               "official CodeFormer (spandrel_extra_arches)", f"w 0.5; max |diff| {diff:.1e}")


def stage_restore(args, device, dtype):
    import bench_restore as B

    batches = ([1] if device.type == "cpu" else [8]) if args.quick else ([1, 4] if device.type == "cpu" else [1, 8, 32])
    rows = []
    if "codeformer" in args.restorers:
        try:
            rows += [_restore_codeformer(args, device, dtype, b) for b in batches]
        except ImportError as exc:
            print(f"   CodeFormer skipped: {exc}")
    if "gfpgan" not in args.restorers:
        return rows
    official, ours = B.build_pair(device, dtype)
    throughput(ours, args)
    flops = flops_per_face(ours.net, ours.input_size)
    peak_tflops = args.peak_tflops or (known_peak_tflops(device) if device.type == "cuda" else 0)
    for batch in batches:
        with StagePeak(device) as peak:
            r = B.compare(official, ours, batch, device, dtype, 1 if args.quick else args.repeats)
        note = f"max |diff| {r['max_abs_diff']:.1e}"
        if flops:
            achieved = flops / r["ours_s_per_face"] / 1e12
            note += f"; {flops / 1e9:.0f} GFLOP/face, {achieved:.2f} TFLOP/s"
            if peak_tflops:
                note += f" = {100 * achieved / peak_tflops:.1f}% of {peak_tflops:.0f} TFLOP/s peak"
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
        r = B.compare_photo(reference, ours, detector, SHARED / rel, device, 1 if args.quick else args.repeats,
                            max_faces, warm)
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
        with tempfile.TemporaryDirectory() as folder:
            model = B.real_size_model(backend, device, dtype) if real else B.tiny_model(backend, device, dtype, folder)
            r = B.measure(model, 512, 1, device, 1 if args.quick else args.repeats, model.tiles)
            del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row("onestep", f"{backend} 512, {'real-size' if real else 'tiny'} random",
                        r["seconds"], ONESTEP_PUBLISHED_S[backend] if real else None, None,
                        r["peak_mib"] * 2 ** 20, "published (A100-class)" if real else "",
                        "" if real else "tiny models: scaling only, no reference" +
                        ("" if r["finite"] else "; non-finite output")))
    return rows


def stage_iqa(args, device, dtype):
    import bench_iqa as B

    x = B._faces(2 if args.quick else 8, 512).to(device)
    rows = []
    for name in (("niqe", "musiq") if args.quick else ("niqe", "musiq", "maniqa", "fid")):
        built = B.build_metric(name, device, 4 if args.quick else 20)
        if built is None:
            continue
        fn, note = built
        with StagePeak(device) as peak:
            ips = B._time(fn, x, device, 1)
        rows.append(row("iqa", name, x.shape[0] / ips, None, x.shape[0], peak.used, "", note))
    return rows


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
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    stages = [s for s in (args.stages.split(",") if args.stages else STAGES) if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    result = {"argv": sys.argv[1:], "device": str(device), "dtype": args.dtype, "quick": args.quick,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(device),
              "rows": [], "skipped": []}
    for name in stages:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            rows = globals()[f"stage_{name}"](args, device, dtype)
        except (FileNotFoundError, ImportError, SystemExit) as exc:
            result["skipped"].append({"stage": name, "why": f"{type(exc).__name__}: {exc}"})
            print(f"   skipped: {exc}", flush=True)
            continue
        except Exception as exc:  # one stage failing must not lose the others' figures
            traceback.print_exc()
            result["skipped"].append({"stage": name, "why": f"failed: {type(exc).__name__}: {str(exc)[:200]}"})
            continue
        result["rows"] += rows
        for r in rows:
            print(f"   {r['case']:40s} ours {fmt(r['ours_s'], '.3f')} s  reference {fmt(r['reference_s'], '.3f')} s  "
                  f"ratio {fmt(r['ratio'], '.2f')}  {r['note']}", flush=True)
        print(f"   ({time.perf_counter() - t:.0f} s)", flush=True)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="FaceMend's precision where it has one")
    ap.add_argument("--quick", action="store_true", help="one small case per stage")
    ap.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case (the fastest or the median is kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=None,
                    help="restorers in channels-last memory (default: on CUDA only)")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="the device's dense bf16 peak for the restore stage's %% of peak (default: known GPUs)")
    ap.add_argument("--restorers", default="gfpgan,codeformer", help="restorers of the restore stage")
    ap.add_argument("--compile", default="", help="torch.compile the restorers with this backend (e.g. inductor)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for suite-<device>-<dtype>.json/.md")
    ap.add_argument("--readme", metavar="JSON", help="only rewrite the README's performance section from JSON")
    args = ap.parse_args(argv)
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
