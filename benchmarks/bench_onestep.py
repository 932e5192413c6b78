"""One-step diffusion SR speed and peak memory: seconds per image at 512 (one tile) and 2048 (tiled), TSD-SR and
OSEDiff, through the same OneStepSR code the node runs.

    .venv/bin/python benchmarks/bench_onestep.py [--backend tsdsr osediff] [--sizes 512 2048] [--repeats 2]
                                                 [--device cuda] [--dtype fp32 fp16 bf16] [--real-size]
                                                 [--scale 1] [--threads 1]

Default: the tiny random models of the tests (tests/onestep_models.py) on the CPU, loaded through the real
loaders from files in the official layouts: scaling figures (how time and memory grow with the image and the
tile count), not real-model speed. --real-size builds the real architectures with random weights instead
(SD3-medium transformer 2.03 B parameters + SD3 VAE 84 M; SD2.1-base UNet 866 M + VAE 84 M; configs below are
the published ones), straight on the device, for GPU figures (fp16 vs bf16 vs fp32). Random weights may give
non-finite outputs in fp16; that is printed, the timing is still the real compute.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the peak resident set size above the level
before the call (sampled every 5 ms). Median wall time over --repeats after one warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import conftest  # noqa: E402,F401  (loads this checkout as `facemend`)
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import PeakRSS  # noqa: E402

from facemend.pipelines.diffusion.refiner import TileSettings  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Published configs (diffusers config.json of stabilityai/stable-diffusion-3-medium-diffusers and
# stabilityai/stable-diffusion-2-1-base).
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                       num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD3_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
               scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
SD21_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SD21_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                scaling_factor=0.18215)


def real_size_model(backend: str, device, dtype):
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of 2 B parameters on the way
    try:
        return _build_real(backend, device, dtype)
    finally:
        torch.set_default_dtype(previous)


def _build_real(backend, device, dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, SD3Transformer2DModel, UNet2DConditionModel

    from facemend.pipelines.diffusion.backends import osediff_from_modules, tsdsr_from_modules

    with torch.device(device):
        if backend == "tsdsr":
            tr = SD3Transformer2DModel(**SD3_TRANSFORMER)
            vae = AutoencoderKL(**SD3_VAE)
            prompt = torch.randn(1, 333, 4096, dtype=torch.float32) * 0.1  # the official embeddings' shapes
            pooled = torch.randn(1, 2048, dtype=torch.float32) * 0.1
            return tsdsr_from_modules(tr, vae, prompt, pooled, device, dtype, "TSD-SR (real size, random)")
        unet = UNet2DConditionModel(**SD21_UNET)
        vae = AutoencoderKL(**SD21_VAE)
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              prediction_type="epsilon", steps_offset=1)
        embeds = torch.randn(1, 77, 1024, dtype=torch.float32) * 0.1
        return osediff_from_modules(unet, vae, sched, embeds, device, dtype,
                                    "OSEDiff (real size, random)")


def tiny_model(backend: str, device, dtype, folder: str):
    from onestep_models import make_osediff, make_tsdsr

    from facemend.pipelines.diffusion.backends import load_osediff, load_tsdsr

    if backend == "tsdsr":
        base, lora = make_tsdsr(folder)
        return load_tsdsr(base, lora, device=device, dtype=dtype)
    base, pkl = make_osediff(folder)
    return load_osediff(base, pkl, device=device, dtype=dtype)


def measure(model, size: int, scale: int, device, repeats: int, tiles: TileSettings) -> dict:
    lr = size // scale
    x = torch.rand(1, 3, lr, lr, generator=torch.Generator().manual_seed(0)).to(device)
    n_tiles = model.count_tiles(lr, lr, scale, tiles)

    def run():
        out = model(x, scale=scale, seed=0, tiles=tiles)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    out = run()  # warm-up
    walls = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for _ in range(repeats):
        t0 = time.perf_counter()
        if device.type == "cuda":
            out = run()
        else:
            with PeakRSS() as rss:
                out = run()
        walls.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else rss.used
    return {"seconds": statistics.median(walls), "peak_mib": peak / 2 ** 20, "tiles": n_tiles,
            "finite": bool(torch.isfinite(out).all()), "out": tuple(out.shape[-2:])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", nargs="+", default=["tsdsr", "osediff"], choices=["tsdsr", "osediff"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 2048], help="output sizes (square)")
    ap.add_argument("--scale", type=int, default=1, choices=[1, 2, 4], help="input = size / scale")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES),
                    help="default: fp32 on the CPU, fp16 bf16 fp32 on CUDA")
    ap.add_argument("--real-size", action="store_true", help="real architectures with random weights")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae-tile", type=int, default=0, help="VAE tile in pixels (default: the model's, 1024)")
    ap.add_argument("--latent-tile", type=int, default=0, help="denoiser tile in latent pixels (default: model's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = args.dtype or (["fp16", "bf16", "fp32"] if device.type == "cuda" else ["fp32"])
    kind = "real-size random" if args.real_size else "tiny random (scaling only)"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} CPU thread(s)"
    print(f"one-step SR, {kind} models, {gpu}, torch {torch.__version__}, scale x{args.scale}, "
          f"VAE tile {args.vae_tile or 'default'}, latent tile {args.latent_tile or 'default'}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'backend':8} {'dtype':5} {'output':>9} {'tiles':>5} {'s/image':>9} {'peak MiB':>9}  finite")
    for backend in args.backend:
        for name in dtypes:
            with tempfile.TemporaryDirectory() as folder:
                if args.real_size:
                    model = real_size_model(backend, device, DTYPES[name])
                else:
                    model = tiny_model(backend, device, DTYPES[name], folder)
                tiles = model.tiles
                if args.vae_tile:
                    tiles = replace(tiles, encoder_tile=args.vae_tile, decoder_tile=args.vae_tile // model.vae_factor)
                if args.latent_tile:
                    tiles = replace(tiles, latent_tile=args.latent_tile)
                for size in args.sizes:
                    r = measure(model, size, args.scale, device, args.repeats, tiles)
                    print(f"{backend:8} {name:5} {r['out'][0]:>4}x{r['out'][1]:<4} {r['tiles']:>5} "
                          f"{r['seconds']:>9.3f} {r['peak_mib']:>9.0f}  {r['finite']}", flush=True)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
