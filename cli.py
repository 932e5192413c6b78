"""Command line and Python API without ComfyUI: `python -m facemend restore|demo ...`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .host import device as dev
from .host import model_paths
from .pipelines.detectors import EMBEDDED_MTCNN, load_detector
from .pipelines.errors import FaceMendError
from .pipelines.image_io import list_images, read_image, side_by_side, write_image
from .pipelines.presets import PRESETS, FaceRestorePipeline


def build_pipeline(preset: str = "demo", detector: str = EMBEDDED_MTCNN, device=None, restorer: str | None = None,
                   precision: str = "auto", onestep_base: str | None = None, onestep_lora: str | None = None,
                   **options) -> FaceRestorePipeline:
    """The Python API: a ready pipeline for `preset`, models resolved through the model search path.
    `restorer` overrides the preset's restorer file (a name in facerestore_models/ or a path); `onestep_base` /
    `onestep_lora` the ntire preset's SD3 folder (in diffusers/) and TSD-SR folder (in onestep_sr/)."""
    if preset not in PRESETS:
        raise FaceMendError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    device = torch.device(device) if device else dev.compute_device()
    if detector in (EMBEDDED_MTCNN, "mtcnn"):
        det = load_detector(EMBEDDED_MTCNN, device=device)
    else:
        det = load_detector(detector, model_paths.find_file("facedetection", detector), device=device)
    stages = []
    if preset in ("fast", "ntire"):
        from .pipelines.restore import FaceRestorer

        name = restorer or PRESETS[preset].needs[0][1]
        net = FaceRestorer.from_file(model_paths.find_file("facerestore_models", name), device=device,
                                     dtype=dev.resolve_dtype(precision, device))
        stages.append(("restore", lambda faces: net(faces)))
    if preset == "ntire":
        stages.append(("onestep_sr", _onestep_stage(device, precision, onestep_base, onestep_lora)))
        options.setdefault("color_reference", "restore")  # AIIA: wavelet fix against the GFPGAN output
    return FaceRestorePipeline(detector=det, face_stages=stages, **options)


def _onestep_stage(device, precision, base=None, lora=None, seed=0):
    """TSD-SR at scale 1 on the face crops (the NTIRE 2025 AIIA setting: 512 crops, one tile, fp16 on GPU)."""
    from .pipelines.onestep_backends import load_tsdsr

    spec = dict((folder, name) for folder, name in PRESETS["ntire"].needs[1:])
    base = base or spec["diffusers"]
    lora = lora or spec["onestep_sr"]
    base_dir = model_paths.find_dir("diffusers", base) or model_paths.expected_path("diffusers", base)
    lora_dir = model_paths.find_dir("onestep_sr", lora) or model_paths.expected_path("onestep_sr", lora)
    model = load_tsdsr(base_dir, lora_dir, device=device, dtype=dev.resolve_dtype(precision, device))

    def stage(faces):
        return model(faces, scale=1, seed=seed, is_oom=dev.is_oom)

    return stage


def restore_files(inputs: list[str], out_dir: str, pipeline: FaceRestorePipeline, device=None,
                  suffix: str = "", log=print) -> list[dict]:
    """Restore each image file (one at a time: photos differ in size) into out_dir as PNG.
    Each output is written to a temporary name and renamed, so an interrupted run leaves no half file."""
    device = torch.device(device) if device else dev.compute_device()
    os.makedirs(out_dir, exist_ok=True)
    reports = []
    for path in inputs:
        dev.check_interrupt()
        image, alpha = read_image(path)
        t = time.perf_counter()
        out, report = pipeline(image.to(device))
        report.update(input=path, seconds=round(time.perf_counter() - t, 3))
        name = os.path.splitext(os.path.basename(path))[0] + suffix + ".png"
        target = os.path.join(out_dir, name)
        tmp = target + ".part.png"
        write_image(tmp, out.cpu(), alpha)
        os.replace(tmp, target)
        report["output"] = target
        log(f"{path}: {sum(report['faces'])} face(s), {report['seconds']:.2f} s -> {target}")
        reports.append(report)
    return reports


def degrade(image: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The demo's documented degradation of a clean [1,3,H,W] image: Gaussian blur (sigma 2.0), x4 bicubic
    downscale, Gaussian noise (sigma 8/255, seeded), JPEG quality 35, x4 bicubic upscale back."""
    import io

    import numpy as np
    from PIL import Image
    import torch.nn.functional as F

    from .pipelines.image_io import to_uint8_array

    h, w = image.shape[-2:]
    r = 6
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-x ** 2 / (2 * 2.0 ** 2))
    g = g / g.sum()
    blurred = F.conv2d(F.pad(image, (r, r, r, r), mode="reflect"), (g[:, None] * g[None, :]).expand(3, 1, -1, -1),
                       groups=3)
    small = F.interpolate(blurred, size=(h // 4, w // 4), mode="bicubic", align_corners=False)
    gen = torch.Generator().manual_seed(seed)
    noisy = (small + torch.randn(small.shape, generator=gen) * (8 / 255)).clamp(0, 1)
    buf = io.BytesIO()
    Image.fromarray(to_uint8_array(noisy)).save(buf, format="JPEG", quality=35)
    jpeg = torch.from_numpy(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy())
    jpeg = jpeg.permute(2, 0, 1)[None].float() / 255
    return F.interpolate(jpeg, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def demo_image() -> torch.Tensor:
    """scikit-image's astronaut (NASA, public domain), shipped inside the scikit-image wheel."""
    try:
        from skimage import data
    except ImportError as exc:
        raise FaceMendError("the demo needs scikit-image for its public-domain test photo: pip install -e .[demo]") from exc
    return torch.from_numpy(data.astronaut().copy()).permute(2, 0, 1)[None].float() / 255


def run_demo(out_dir: str = "demo_output", device=None, log=print) -> dict:
    device = torch.device(device) if device else dev.compute_device()
    clean = demo_image()
    degraded = degrade(clean)
    os.makedirs(out_dir, exist_ok=True)
    write_image(os.path.join(out_dir, "astronaut_degraded.png"), degraded)
    pipeline = build_pipeline("demo", device=device)
    t = time.perf_counter()
    restored, report = pipeline(degraded.to(device))
    seconds = time.perf_counter() - t
    restored = restored.cpu()
    write_image(os.path.join(out_dir, "astronaut_restored.png"), restored)
    write_image(os.path.join(out_dir, "astronaut_before_after.png"), side_by_side(degraded, restored))
    psnr_in = _psnr(degraded, clean)
    psnr_out = _psnr(restored, clean)
    summary = {"faces": sum(report["faces"]), "seconds": round(seconds, 2), "device": str(device),
               "psnr_degraded_db": round(psnr_in, 2), "psnr_restored_db": round(psnr_out, 2),
               "outputs": sorted(os.listdir(out_dir)), "timings_s": report["timings_s"]}
    log(f"demo: {summary['faces']} face(s) in {seconds:.2f} s on {device}; PSNR vs the clean photo "
        f"{psnr_in:.2f} dB -> {psnr_out:.2f} dB; wrote {', '.join(summary['outputs'])} to {out_dir}/")
    return summary


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).mean())
    return 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facemend", description=__doc__)
    parser.add_argument("--models-dir", action="append", default=[],
                        help="a ComfyUI-style models folder (repeatable); also $FACEMEND_MODELS_DIR")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_restore = sub.add_parser("restore", help="restore an image file or every image of a folder")
    p_restore.add_argument("inputs", nargs="+", help="image files or folders")
    p_restore.add_argument("-o", "--out", default="restored", help="output folder (default: restored/)")
    p_restore.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p_restore.add_argument("--detector", default=EMBEDDED_MTCNN,
                           help="'mtcnn' (embedded) or a RetinaFace file name in models/facedetection/")
    p_restore.add_argument("--selection", default="all", choices=["all", "largest", "center"])
    p_restore.add_argument("--restorer", default=None, help="restorer file in models/facerestore_models/ "
                           "(preset fast; default GFPGANv1.4.pth)")
    p_restore.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p_restore.add_argument("--onestep-base", default=None, help="preset ntire: SD3-medium diffusers folder in "
                           "models/diffusers/ (default stable-diffusion-3-medium-diffusers)")
    p_restore.add_argument("--onestep-lora", default=None, help="preset ntire: TSD-SR folder in models/onestep_sr/ "
                           "(default tsdsr)")
    p_restore.add_argument("--report", default=None, help="write a JSON report here")
    p_demo = sub.add_parser("demo", help="degrade and restore a public-domain photo (no downloads)")
    p_demo.add_argument("-o", "--out", default="demo_output")
    sub.add_parser("presets", help="list the presets")
    args = parser.parse_args(argv)

    if args.models_dir:
        model_paths.set_models_dirs(args.models_dir)
    if args.device:
        dev.set_device(args.device)
    try:
        if args.command == "presets":
            for spec in PRESETS.values():
                print(f"{spec.name}: {spec.description}")
        elif args.command == "demo":
            run_demo(args.out)
        else:
            files = []
            for item in args.inputs:
                files += list_images(item) if os.path.isdir(item) else [item]
            if not files:
                raise FaceMendError(f"no images found in {', '.join(args.inputs)}")
            pipeline = build_pipeline(args.preset, args.detector, restorer=args.restorer, precision=args.precision,
                                      selection=args.selection, onestep_base=args.onestep_base,
                                      onestep_lora=args.onestep_lora)
            reports = restore_files(files, args.out, pipeline)
            if args.report:
                with open(args.report, "w") as f:
                    json.dump(reports, f, indent=1)
    except FaceMendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished outputs are complete, the one in progress was not written", file=sys.stderr)
        return 130
    return 0
