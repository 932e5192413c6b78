"""Images per second of each IQA metric (and ID / FID feature extraction) on real 512x512 faces.

NIQE uses the real pristine parameters (../shared/models/iqa); pyiqa's MUSIQ / MANIQA / CLIP-IQA and the FID
Inception run with random weights of the real architectures (speed does not depend on the weight values).
MANIQA scores 20 crops of 224 per image (pyiqa's default), so it is by far the slowest on a CPU; --maniqa-crops
lowers that for a quick look (the printed figure says so). ArcFace is not timed: no real-architecture ONNX file
exists offline (a tiny stand-in would say nothing).

    python benchmarks/bench_iqa.py                        # CPU, batch 4, all metrics that can be built
    python benchmarks/bench_iqa.py --device cuda --batch 16
    python benchmarks/bench_iqa.py --metrics niqe,musiq --threads 2

Run from the repository root (loads this checkout as `facemend`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SHARED, load_facemend as _load_facemend, sync as _sync  # noqa: E402,F401


def _faces(n, size):
    from facemend.pipelines.io.images import list_images, read_image
    import torch.nn.functional as F

    files = list_images(str(SHARED / "faces" / "aligned_lq_real"))[:n]
    if not files:
        raise SystemExit(f"needs {SHARED}/faces/aligned_lq_real")
    imgs = [F.interpolate(read_image(f)[0], size=(size, size), mode="bilinear", antialias=True) for f in files]
    return torch.cat(imgs).clamp(0, 1)


def _time(fn, x, device, repeats):
    with torch.no_grad():
        fn(x[:1])  # warm-up (cuDNN autotune, lazy init)
        _sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            fn(x)
        _sync(device)
    return repeats * x.shape[0] / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    ap.add_argument("--metrics", default="niqe,musiq,maniqa,clipiqa,fid")
    ap.add_argument("--maniqa-crops", type=int, default=20, help="MANIQA test crops per image (pyiqa: 20)")
    args = ap.parse_args(argv)
    _load_facemend()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x = _faces(args.batch, args.size).to(device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"batch {x.shape[0]} x {args.size}x{args.size}, torch {torch.__version__}")
    print(f"{'metric':<10} {'images/s':>10}  note")
    for name in [m for m in args.metrics.split(",") if m]:
        try:
            built = build_metric(name, device, args.maniqa_crops)
            if built is None:
                print(f"{name:<10} {'-':>10}  skipped: needs openai-clip")
                continue
            fn, note = built
            ips = _time(fn, x, device, args.repeats)
            print(f"{name:<10} {ips:>10.3f}  {note}")
        except Exception as exc:  # report and go on with the other metrics
            print(f"{name:<10} {'-':>10}  failed: {type(exc).__name__}: {str(exc)[:120]}")


def build_metric(name, device, maniqa_crops: int = 20):
    """(score function images -> scores, note) for one metric; None where its package is missing."""
    from facemend.pipelines.quality import metrics as M
    from facemend.pipelines.quality.niqe import NIQE

    note = ""
    if name == "niqe":
        fn = NIQE.from_file(str(SHARED / "models" / "iqa" / "niqe_pris_params.npz"), device=device)
        note = "pyiqa variant, float64"
    elif name == "fid":
        from torchvision.models.inception import Inception3
        from facemend.pipelines.quality.fid import FIDInception, _local_weights

        sd = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
        with _local_weights(sd) as pfi:
            net = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
        fn = FIDInception(net.to(device)).features
        note = "pool3 features at 299"
    elif name == "clipiqa":
        try:
            import clip  # noqa: F401
        except Exception:
            return None
        raise SystemExit("clipiqa timing needs an RN50 file; not available offline")
    else:
        net = M.build_pyiqa_net(name).eval().to(device)
        if name == "maniqa":
            net.test_sample = maniqa_crops
            note = f"{maniqa_crops} crops of 224 per image"
        fn = M.IQAMetric(M.SPECS[name], net, module=net).score
    return fn, note


if __name__ == "__main__":
    main()
