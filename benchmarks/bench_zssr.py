"""ZSSR x2 on real faces: PSNR of bicubic vs ZSSR per image, the gain, and the speed.

Every image of ../shared/faces/clean and ../shared/faces/aligned_gray_old is taken as ground truth, shrunk x2
with bicubic (antialiased, a = -0.5: MATLAB's imresize kernel), and brought back x2 by (a) bicubic and (b) ZSSR.
PSNR is over RGB in [0,1] with a 2-pixel border left out. Then the first 8 512x512 faces are tuned again as
one batch (8 grouped networks) for the batched speed, with the faces per group the memory allows (or
--faces-per-group), and the peak memory per face measured against the estimate (pipelines/tune/memory.py).
The faces per group a batch of --plan-faces 256 px faces would get on this device is printed first.

    python benchmarks/bench_zssr.py                      # paper config (plateau policy, up to 3000 steps)
    python benchmarks/bench_zssr.py --steps 300 --crop 64 # compressed policy, CPU-sized
    python benchmarks/bench_zssr.py --device cuda

Run from the repository root (loads this checkout as `facemend`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SHARED, Peak, load_facemend as _load_facemend, sync as _sync  # noqa: E402,F401


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=0,
                    help="max iterations per x2 step; 0 = the paper's 3000 with its plateau policy. With a "
                         "smaller number the policy's windows are scaled to it (ZSSRConfig.scaled_policy) unless "
                         "--policy paper")
    ap.add_argument("--policy", choices=("scaled", "paper"), default="scaled")
    ap.add_argument("--crop", type=int, default=128, help="training crop size (paper: 128)")
    ap.add_argument("--bp", type=int, default=10, help="back-projection iterations (paper: 10)")
    ap.add_argument("--no-ensemble", action="store_true", help="skip the 8-transform self-ensemble")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    ap.add_argument("--only", nargs="*", default=[], help="only images whose path contains one of these")
    ap.add_argument("--batch", type=int, default=8, help="faces in the batched speed run (0 = skip it)")
    ap.add_argument("--faces-per-group", type=int, default=0,
                    help="faces tuned at once in the batched run (0 = as many as fit in the free memory)")
    ap.add_argument("--plan-faces", type=int, default=512,
                    help="print the faces per group a batch of this many 256 px faces would get (0 = skip)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    _load_facemend()
    from facemend.pipelines.tune import engine as E, memory as M, zssr as Z
    from facemend.pipelines.io.images import list_images, read_image

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    folders = [SHARED / "faces" / "clean", SHARED / "faces" / "aligned_gray_old"]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        sys.exit(f"needs {missing} (the shared faces folder beside the checkout)")
    paths = [p for f in folders for p in list_images(str(f))]
    if args.only:
        paths = [p for p in paths if any(o in p for o in args.only)]
    if args.limit:
        paths = paths[: args.limit]

    base = Z.ZSSRConfig(crop_size=args.crop, back_projection_iters=args.bp, self_ensemble=not args.no_ensemble,
                        faces_per_group=args.faces_per_group)
    if args.steps and args.steps < base.max_iters:
        cfg = base.scaled_policy(args.steps) if args.policy == "scaled" else \
            Z.ZSSRConfig(**{**base.__dict__, "max_iters": args.steps})
    else:
        cfg = base
    print(f"device {device}, torch threads {torch.get_num_threads()}, config: max_iters {cfg.max_iters}, "
          f"crop {cfg.crop_size}, policy {args.policy if args.steps else 'paper'} (min_iters {cfg.min_iters}, "
          f"check every {cfg.lr_policy_check_every}, test every {cfg.run_test_every}, slope range "
          f"{cfg.lr_slope_range}), back-projection {cfg.back_projection_iters}, self-ensemble {cfg.self_ensemble}")
    summary_plan = {}
    if args.plan_faces:
        plan = group_plan(Z, M, cfg, args.plan_faces, 256, device)
        print(f"a batch of {args.plan_faces} faces of 256 px: {plan.line()}")
        summary_plan = {"plan_faces": args.plan_faces, "plan_faces_per_group": plan.faces_per_group,
                        "plan_line": f"{args.plan_faces} faces of 256 px: {plan.line()}"}
    print(f"{'image':34s} {'size':>9s} {'bicubic':>8s} {'bic+BP':>8s} {'ZSSR':>8s} {'gain':>7s} {'iters':>6s} "
          f"{'sec':>7s}")
    rows = []
    hr_512 = []
    for path in paths:
        gt = read_image(path)[0].to(device)
        lr = E.downscale(gt, 2).clamp(0, 1)
        bic = E.bicubic_upscale(lr, 2)[..., : gt.shape[-2], : gt.shape[-1]]
        _sync(device)
        t0 = time.perf_counter()
        out, report = Z.ZSSR(cfg, scale=2)(lr, seed=args.seed)
        _sync(device)
        sec = time.perf_counter() - t0
        out = out[..., : gt.shape[-2], : gt.shape[-1]]
        p_bic = float(E.psnr(bic, gt, 2)[0])
        # back-projection alone (no network): what the learned residual adds on top of it
        p_bp = float(E.psnr(E.back_projection(E.bicubic_upscale(lr, 2), lr, cfg.back_projection_iters)
                            [..., : gt.shape[-2], : gt.shape[-1]], gt, 2)[0])
        p_z = float(E.psnr(out, gt, 2)[0])
        iters = report["stages"][0]["iterations"][0]
        rows.append({"image": os.path.relpath(path, SHARED / "faces"), "size": list(gt.shape[-2:]),
                     "psnr_bicubic": p_bic, "psnr_bicubic_bp": p_bp, "psnr_zssr": p_z, "gain_db": p_z - p_bic,
                     "iterations": iters, "seconds": sec})
        if tuple(gt.shape[-2:]) == (512, 512):
            hr_512.append(gt)
        print(f"{rows[-1]['image'][:34]:34s} {gt.shape[-1]:4d}x{gt.shape[-2]:<4d} {p_bic:8.2f} {p_bp:8.2f} "
              f"{p_z:8.2f} {p_z - p_bic:+7.2f} {iters:6d} {sec:7.1f}", flush=True)
    gains = [r["gain_db"] for r in rows]
    sec_512 = [r["seconds"] for r in rows if tuple(r["size"]) == (512, 512)]
    summary = {"images": len(rows), "mean_gain_db": statistics.mean(gains), "min_gain_db": min(gains),
               "mean_psnr_bicubic": statistics.mean(r["psnr_bicubic"] for r in rows),
               "mean_gain_bp_only_db": statistics.mean(r["psnr_bicubic_bp"] - r["psnr_bicubic"] for r in rows),
               "mean_psnr_zssr": statistics.mean(r["psnr_zssr"] for r in rows),
               "seconds_per_512_face": statistics.mean(sec_512) if sec_512 else None, **summary_plan}
    print(f"mean gain {summary['mean_gain_db']:+.3f} dB over {len(rows)} images (min {summary['min_gain_db']:+.3f}); "
          f"mean PSNR bicubic {summary['mean_psnr_bicubic']:.2f} -> ZSSR {summary['mean_psnr_zssr']:.2f}; "
          f"back-projection alone {summary['mean_gain_bp_only_db']:+.3f} dB")
    if sec_512:
        print(f"seconds per 512 face (256 -> 512), one at a time: {summary['seconds_per_512_face']:.1f}")

    if args.batch and len(hr_512) >= 1:
        batch = torch.cat((hr_512 * args.batch)[: args.batch])
        lr = E.downscale(batch, 2).clamp(0, 1)
        _sync(device)
        with Peak(device) as peak:
            t0 = time.perf_counter()
            out, report = Z.ZSSR(cfg, scale=2)(lr, seed=args.seed)
            _sync(device)
            sec = time.perf_counter() - t0
        gain = (E.psnr(out, batch, 2) - E.psnr(E.bicubic_upscale(lr, 2), batch, 2)).mean().item()
        groups = report["groups"]
        k = groups["faces_per_group"]
        est = groups["bytes_per_face"] * k + groups["bytes_per_face_of_batch"] * len(batch)
        summary.update(batched_faces=len(batch), batched_seconds=sec, batched_seconds_per_face=sec / len(batch),
                       batched_mean_gain_db=gain, faces_per_group=k, groups=groups["groups"],
                       group_line=groups["line"], estimated_peak_bytes=est, measured_peak_bytes=peak.used)
        print(groups["line"])
        print(f"{len(batch)} faces batched (grouped networks): {sec:.1f} s, {sec / len(batch):.1f} s per face, "
              f"mean gain {gain:+.3f} dB; peak memory {peak.used / 2 ** 20:.0f} MiB measured "
              f"({peak.how}), {est / 2 ** 20:.0f} MiB estimated for {k} face(s) per group")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": cfg.__dict__, "device": str(device),
                                               "threads": torch.get_num_threads(), "rows": rows,
                                               "summary": summary}, indent=1))
    return summary


def group_plan(Z, M, cfg, faces: int, side: int, device):
    """The faces per group `faces` side x side faces would get on `device` now (nothing is allocated)."""
    cost = Z.ZSSR(cfg).face_cost(side, side, device)
    try:
        return M.plan_groups(faces, cost, device, cfg.faces_per_group, "ZSSR")
    except M.NotEnoughMemory as exc:
        return M.GroupPlan(faces, 1, cost, None, 0, f"does not fit: {exc}", "ZSSR")


if __name__ == "__main__":
    main()
