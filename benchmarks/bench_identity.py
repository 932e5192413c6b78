"""RestorerID speed and peak memory per 512 face: VAE encode (posterior sample) + structure encoder and UNet on
every DDIM step with CFG (batch 2B) + VAE decode, through pipelines/identity (the code the node runs). The text
and ID contexts are random [B, 81, 768] tensors (the CLIP encoders run once per reference, not per step).

    .venv/bin/python benchmarks/bench_identity.py [--real-size] [--steps 2] [--batch 1] [--device cuda]
                                                  [--dtype fp32 fp16 bf16] [--threads 2]

Default: a narrow configuration with RestorerID's structure (SD VAE levels, 4-level UNet with attention at
ds 1/2/4, SPADE + IDBalance everywhere, 4-level structure encoder) but 1/10 the widths: scaling figures, not
real speed. --real-size builds the published architecture (UNet 1.02 B, structure encoder 52 M, SD VAE 84 M)
with random weights straight on the device. Seconds per face at 50 steps are extrapolated from the measured
per-step time plus the measured VAE time. Peak memory: torch.cuda.max_memory_allocated on CUDA, else the
peak resident set size above the level before the run (sampled every 5 ms).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import load_facemend, sync  # noqa: E402
from _common import PeakRSS  # noqa: E402

load_facemend()
from facemend.pipelines.identity.layers import FP32GroupNorm  # noqa: E402
from facemend.pipelines.identity.sampler import ddim_sample  # noqa: E402
from facemend.pipelines.identity.structure_encoder import StructureEncoder, StructureEncoderConfig  # noqa: E402
from facemend.pipelines.identity.unet import RestorerIDUNet, UNetConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SMALL_UNET = UNetConfig(model_channels=32, struct_channels=32, lora_rank=16)
SMALL_STRUCT = StructureEncoderConfig(model_channels=32, out_channels=32)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
SMALL_VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1)


def _init_(module, seed=0):
    """Random weights that keep every path alive: normalisation scales 1 (found by module type: the UNet's norms are
    named `in_layers.0`, `out.0`, ...), other 1-D parameters 0, the rest N(0, 1 / fan_in)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    norm_scales = {id(m.weight) for m in module.modules()
                   if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None}
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.copy_(torch.ones(p.shape) if id(p) in norm_scales else torch.zeros(p.shape))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return module


def build(real: bool, device, dtype, vae: bool = True):
    """(UNet, structure encoder[, SD VAE]) with random weights, built on the meta device and filled on the CPU."""
    with torch.device("meta"):
        nets = [RestorerIDUNet(UNetConfig() if real else SMALL_UNET),
                StructureEncoder(StructureEncoderConfig() if real else SMALL_STRUCT)]
        if vae:
            from diffusers import AutoencoderKL

            nets.append(AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                                      **(SD_VAE if real else SMALL_VAE)))
    metas, nets = nets, []
    for i, m in enumerate(metas):
        m = _init_(m.to_empty(device="cpu"), seed=i).to(device, dtype).eval().requires_grad_(False)
        nets.append(m)
    for m in nets[2].modules() if vae else ():
        if type(m) is torch.nn.GroupNorm:
            m.__class__ = FP32GroupNorm
    return nets


def run(args):
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    for name in args.dtype:
        dtype = DTYPES[name]
        unet, struct, vae = build(args.real_size, device, dtype)
        params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in
                  (("unet", unet), ("struct", struct), ("vae", vae))}
        b = args.batch
        x = torch.rand(b, 3, args.size, args.size, device=device)
        ctx = torch.randn(b, 81, 768, device=device) * 0.5
        g = torch.Generator().manual_seed(0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        with PeakRSS() as rss, torch.no_grad():
            sync(device)
            c0 = time.process_time()
            t0 = time.perf_counter()
            dist = vae.encode((2 * x - 1).to(dtype)).latent_dist
            z = 0.18215 * (dist.mean.float() + dist.std.float() * torch.randn(dist.mean.shape, generator=g).to(device))
            sync(device)
            t1 = time.perf_counter()
            lat = ddim_sample(unet, struct, z, ctx, ctx, ip_scale=0.5, steps=args.steps, cfg=4.0, generator=g)
            sync(device)
            t2 = time.perf_counter()
            out = vae.decode((lat / 0.18215).to(dtype)).sample.float()
            sync(device)
            t3 = time.perf_counter()
            cpu = time.process_time() - c0
        peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else rss.used
        per_step = (t2 - t1) / args.steps
        vae_s = (t1 - t0) + (t3 - t2)
        per_face50 = (vae_s + 50 * per_step) / b
        print(f"{'real-size' if args.real_size else 'narrow'} {name} {device.type} threads={args.threads} "
              f"batch={b} size={args.size} params(M)={ {k: round(v, 1) for k, v in params.items()} }: "
              f"VAE enc+dec {vae_s:.2f} s, {per_step:.2f} s/step (CFG, batch {2 * b}), "
              f"=> {per_face50:.1f} s/face at 50 steps; process CPU time {cpu:.1f} s for the wall {t3 - t0:.1f} s "
              f"(a contended machine shows here); peak memory {peak / 2 ** 30:.2f} GiB; "
              f"finite={bool(torch.isfinite(out).all())}")
        del unet, struct, vae


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--real-size", action="store_true")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=2)
    run(p.parse_args())


if __name__ == "__main__":
    main()
