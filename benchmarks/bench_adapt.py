"""Adaptation speed and peak memory: seconds per prior step (and so per face of pseudo targets, 150 steps at the
official settings) and per fine-tuning step, through the same code the nodes run.

    python benchmarks/bench_adapt.py [--real-size] [--device cuda] [--prior-steps 2]
                                                   [--train-steps 2] [--micro-batch 1] [--accumulate 1]
                                                   [--precision fp32] [--threads 2] [--part prior|train|both]

Default: the tests' tiny configs on the CPU (prior: 32 px, 3 levels; GFPGAN: 32 px, narrow 0.125; LPIPS-VGG at
32 px), for scaling figures. --real-size: the real architectures with random weights (the 159.8 M-parameter
DifFace prior at 512 px; GFPGAN v1.4 at 512 px, 84 M parameters; LPIPS-VGG-16 at 512 px).
Peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the peak resident set size above the level
before the part (sampled every 5 ms). Times are medians over the measured steps after one warm-up step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import Peak, load_facemend, sync  # noqa: E402

load_facemend()

from facemend.pipelines.adapt.finetune import FinetuneConfig, Finetuner  # noqa: E402
from facemend.pipelines.adapt.prior import PriorUNet, PriorUNetConfig  # noqa: E402
from facemend.pipelines.adapt.pseudo_targets import PseudoTargetConfig, PseudoTargetGenerator  # noqa: E402
from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean  # noqa: E402
from facemend.pipelines.restore.restorer import FaceRestorer  # noqa: E402

TINY_PRIOR = PriorUNetConfig(image_size=32, model_channels=32, num_res_blocks=(1, 2, 1), attention_resolutions=(16, 8),
                             channel_mult=(1, 1, 2), num_head_channels=16)


def bench_prior(args, device):
    cfg = PriorUNetConfig() if args.real_size else TINY_PRIOR
    net = PriorUNet(cfg).eval().requires_grad_(False).to(device)
    size = cfg.image_size
    gcfg = PseudoTargetConfig(image_size=size, down_factor=16 if size >= 64 else 4,
                              start_step=args.prior_steps + 1, reg_end_step=1)
    gen = PseudoTargetGenerator(net, gcfg)
    faces = torch.rand(args.faces, 3, size, size, device=device)
    times = []
    last = [time.perf_counter()]

    def cb(n):
        sync(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    with Peak(device) as mem:
        last[0] = time.perf_counter()
        gen(faces, batch_size=args.faces, callback=cb)
    step = statistics.median(times[1:] or times)
    per_face = step * 150 / args.faces
    print(f"prior {'real 159.8M' if args.real_size else 'tiny'} at {size}px, batch {args.faces}, {device}: "
          f"{step:.3f} s per step ({len(times)} steps), so {per_face:.1f} s per face at the official 150 steps; "
          f"peak +{mem.used / 2 ** 20:.0f} MiB")


def bench_train(args, device) -> dict:
    """Seconds per optimiser step of the fine-tuning (GFPGAN + LPIPS-VGG, the Finetuner the node runs), printed and
    returned."""
    import torchvision

    from facemend.pipelines.adapt.perceptual import load_lpips_vgg

    size = 512 if args.real_size else 32
    gcfg = GFPGANConfig() if args.real_size else GFPGANConfig(out_size=32, num_style_feat=64, narrow=0.125)
    tmp = tempfile.mkdtemp()
    torch.save({"params_ema": GFPGANv1Clean(gcfg).state_dict()}, os.path.join(tmp, "g.pth"))
    restorer = FaceRestorer.from_file(os.path.join(tmp, "g.pth"), device=device)
    feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, os.path.join(tmp, "vgg.pth"))
    lpips_net = load_lpips_vgg(os.path.join(tmp, "vgg.pth"), device=device)
    cfg = FinetuneConfig(steps=args.train_steps + 1, micro_batch=args.micro_batch, accumulate=args.accumulate,
                         checkpoint_every=10 ** 6, precision=args.precision)
    faces = torch.rand(max(4, args.micro_batch), 3, size, size)
    targets = torch.rand_like(faces)
    times = []
    last = [0.0]

    def hook(n):
        sync(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    with Peak(device) as mem:
        last[0] = time.perf_counter()
        Finetuner(restorer, lpips_net, cfg).run(faces, targets, "bench", os.path.join(tmp, "out.safetensors"),
                                                os.path.join(tmp, "work"), hook=hook)
    step = statistics.median(times[1:] or times)
    n_params = sum(p.numel() for p in restorer.net.parameters()) / 1e6
    faces_per_step = args.micro_batch * args.accumulate
    print(f"fine-tune GFPGAN ({n_params:.1f}M params) at {size}px + LPIPS-VGG, micro-batch {args.micro_batch} x "
          f"{args.accumulate}, {args.precision}, {device}: {step:.2f} s per optimiser step "
          f"({step / faces_per_step:.2f} s per face); peak +{mem.used / 2 ** 20:.0f} MiB (includes the final save)")
    return {"step_s": step, "faces_per_step": faces_per_step, "size": size, "params_m": n_params,
            "peak_mib": mem.used / 2 ** 20}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real-size", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prior-steps", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--faces", type=int, default=1, help="faces per prior call")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--part", default="both", choices=["prior", "train", "both"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part in ("prior", "both"):
        bench_prior(args, device)
    if args.part in ("train", "both"):
        bench_train(args, device)


if __name__ == "__main__":
    main()
