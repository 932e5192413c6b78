"""Fine-tuning a face restorer on (user's face, pseudo target) pairs (Kuai et al., WACV 2025, B.2 of the spec).

The official SwinIR recipe (SamsungLabs/unsupervised-face-restoration configs/main/swinir_gan.yaml, trainer.py),
applied to our restorer networks (GFPGAN first):

    loss = 1.0 * L1(mean) + 0.1 * LPIPS-VGG (summed over the micro-batch, as the official code does)
           [+ 0.1 * GAN (vanilla, BCE-with-logits) - optional, off by default here]
    GAN: Real-ESRGAN's UNetDiscriminatorSN from scratch, AdamW(2e-5) constant; D loss = BCE(D(real), 1) +
    BCE(D(fake), 0) per micro-batch, unweighted; "real" = a folder of clean faces if given, else the pseudo
    targets (the official fallback when no GAN data folder is configured). The official loop leaves D trainable
    during G's adversarial loss after the first micro-batch (it re-freezes D only once per step); here D is frozen
    for G's loss every time, as intended.
    AdamW(lr 2e-5, weight decay 0, betas 0.9/0.999); cosine annealing over all steps down to 5e-6;
    batch 16 as 4 micro-batches of 4 (gradient accumulation); a checkpoint every 2500 steps.

Differences, on purpose: the restorer's input and output are in [-1, 1] as in their own inference (the official
SwinIR works in [0, 1]); L1 is taken on that [-1, 1] output against 2*target-1 and divided by 2 so that its
value is the [0,1] L1 of the official code. Micro-batches are drawn with a generator seeded by (seed, step), so a
run resumed from a checkpoint continues exactly as the uninterrupted run would have.

Files (nothing of the user's is overwritten; every file is written to a temporary name and renamed):
    <work_dir>/step_XXXXXX.pt        training state every `checkpoint_every` steps (kept: earlier ones stay)
    <work_dir>/<name>.loss.png       loss curve      <work_dir>/<name>.log.json   settings, losses, timings
    <output_path>                    the adapted restorer (.safetensors); refused if it exists
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..io.errors import FaceMendError
from .fingerprint import tensors_fingerprint

# Architectures fine-tuned (and tested) end to end here. CodeFormer's official fine-tuning uses code-level losses
# instead, and RestoreFormer would need a straight-through quantiser: not offered yet.
TRAINABLE = ("GFPGANv1Clean", "GPEN")


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 20000               # optimiser steps (official: 20 000)
    lr: float = 2e-5
    lr_min: float = 5e-6             # cosine annealing floor (official eta_min)
    weight_decay: float = 0.0
    micro_batch: int = 4
    accumulate: int = 4              # micro-batches per optimiser step (official batch 16 = 4 x 4)
    l1_weight: float = 1.0
    lpips_weight: float = 0.1
    lpips_sum: bool = True           # official: LPIPS summed over the micro-batch, L1 averaged
    gan_weight: float = 0.0          # official 0.1 when the GAN is on
    d_lr: float = 2e-5               # discriminator AdamW learning rate (constant)
    d_num_feat: int = 64
    checkpoint_every: int = 2500
    seed: int = 0
    precision: str = "fp32"          # fp32 | bf16 | fp16: autocast on CUDA (CPU always fp32)

    def validate(self) -> None:
        if self.steps < 1 or self.micro_batch < 1 or self.accumulate < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, micro_batch, accumulate and checkpoint_every must be >= 1")
        if self.lr <= 0 or self.lr_min < 0 or self.lr_min > self.lr:
            raise ValueError(f"need 0 <= lr_min <= lr and lr > 0, got lr={self.lr}, lr_min={self.lr_min}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")


class AlreadyExists(FaceMendError, FileExistsError):
    """The output model file exists: FaceMend never overwrites it."""


def cosine_lr(cfg: FinetuneConfig, step: int) -> float:
    """CosineAnnealingLR(T_max=steps, eta_min=lr_min) at `step` (closed form)."""
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * step / cfg.steps)) / 2


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_new_safetensors(state_dict: dict, path: str, metadata: Optional[dict] = None) -> None:
    """Write `path` only if it does not exist (temporary file, then a hard link that fails on an existing name)."""
    from safetensors.torch import save_file

    if os.path.exists(path):
        raise AlreadyExists(f"{path} exists; FaceMend never overwrites a model file. Choose another name.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    try:
        os.link(tmp, path)
    except FileExistsError as exc:
        raise AlreadyExists(f"{path} appeared while saving; it was left as it is.") from exc
    except OSError:            # file systems without hard links: rename unless the name was taken meanwhile
        if os.path.exists(path):
            raise AlreadyExists(f"{path} appeared while saving; it was left as it is.")
        os.replace(tmp, path)
        return
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _checkpoints(work_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(work_dir):
        return []
    found = []
    for f in os.listdir(work_dir):
        m = re.fullmatch(r"step_(\d{6,})\.pt", f)
        if m:
            found.append((int(m.group(1)), os.path.join(work_dir, f)))
    return sorted(found)


def plot_losses(losses: list[float], path: str, title: str = "") -> None:
    """A small loss-curve PNG (PIL only): per-step loss in grey, running mean in blue."""
    from PIL import Image, ImageDraw

    w, h, m = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m // 2, w - m // 2, h - m], outline="black")
    if losses:
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-8
        n = len(losses)

        def pt(i, v):
            x = m + (w - 1.5 * m) * (i / max(n - 1, 1))
            y = (h - m) - (h - 1.5 * m) * (v - lo) / (hi - lo)
            return (x, y)

        d.line([pt(i, v) for i, v in enumerate(losses)], fill=(170, 170, 170), width=1)
        k = max(1, n // 20)
        run = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(n)]
        d.line([pt(i, v) for i, v in enumerate(run)], fill=(30, 80, 200), width=2)
        d.text((m + 4, m // 2 + 4), f"{hi:.4g}", fill="black")
        d.text((m + 4, h - m - 14), f"{lo:.4g}", fill="black")
        d.text((w - 3 * m, h - m + 6), f"step {n}", fill="black")
    d.text((m, 4), title or "training loss", fill="black")
    tmp = f"{path}.tmp{os.getpid()}.png"
    img.save(tmp)
    os.replace(tmp, path)


@dataclass
class FinetuneResult:
    output_path: str
    log_path: str
    plot_path: str
    losses: list = field(default_factory=list)
    resumed_from: int = 0
    seconds_per_step: float = 0.0
    peak_memory_bytes: int = 0


class Finetuner:
    """Fine-tunes a copy of a FaceRestorer's network; the restorer passed in is left untouched."""

    def __init__(self, restorer, lpips_net: Optional[torch.nn.Module], config: FinetuneConfig = FinetuneConfig()):
        config.validate()
        if restorer.arch not in TRAINABLE:
            raise FaceMendError(f"Fine-tuning supports {', '.join(TRAINABLE)} so far; {restorer.name} is "
                                f"{restorer.spec.family}.")
        if config.lpips_weight > 0 and lpips_net is None:
            raise ValueError("lpips_weight > 0 needs the LPIPS network (load_lpips_vgg)")
        import copy

        self.restorer = restorer
        self.config = config
        self.device = restorer.device
        self.net = copy.deepcopy(restorer.net).float().to(self.device)
        self.lpips = lpips_net.to(self.device) if lpips_net is not None else None
        self.disc = None
        if config.gan_weight > 0:
            from .discriminator import UNetDiscriminatorSN

            with torch.random.fork_rng(devices=[]):        # seeded initial weights, global RNG untouched
                torch.manual_seed(config.seed)
                self.disc = UNetDiscriminatorSN(3, config.d_num_feat).to(self.device)

    # ---------------------------------------------------------------- data
    def _prepare(self, faces: torch.Tensor) -> torch.Tensor:
        s = self.restorer.input_size
        faces = faces.float().clamp(0, 1)
        if faces.shape[-2:] != (s, s):
            faces = F.interpolate(faces, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return faces.cpu()

    def _autocast(self):
        c = self.config
        if self.device.type != "cuda" or c.precision == "fp32":
            return torch.autocast(device_type="cpu", enabled=False)
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if c.precision == "bf16" else torch.float16)

    def _bce(self, images: torch.Tensor, real: bool) -> torch.Tensor:
        with self._autocast():
            logits = self.disc(images).float()
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))

    def loss_terms(self, x01: torch.Tensor, y01: torch.Tensor, generator: torch.Generator,
                   keep_output: bool = False) -> dict:
        """Generator losses of one micro-batch (x: inputs, y: pseudo targets, both [B,3,S,S] in [0,1] on the
        device); with keep_output the network output ([-1, 1]) is returned as "output"."""
        c = self.config
        with self._autocast():
            out = self.net((x01 - 0.5) / 0.5, noise="random", generator=generator).float()
        target = y01 * 2 - 1
        terms = {"l1": (out - target).abs().mean() / 2}
        if c.lpips_weight > 0:
            lp = self.lpips(out, target, normalize=False)
            terms["lpips"] = lp.sum() if c.lpips_sum else lp.mean()
        total = c.l1_weight * terms["l1"] + c.lpips_weight * terms.get("lpips", torch.zeros((), device=out.device))
        if self.disc is not None:
            self.disc.requires_grad_(False)
            terms["gan"] = self._bce((out + 1) / 2, real=True)  # the official discriminator sees [0, 1]
            total = total + c.gan_weight * terms["gan"]
        terms["total"] = total
        if keep_output:
            terms["output"] = out
        return terms

    def render(self, faces: torch.Tensor) -> torch.Tensor:
        """What the network being trained restores now on `faces` ([B,3,H,W] in [0,1]): the restorer's own inference
        (eval mode, seed 0) with the current weights, as the saved model will run. Training is left as it was: its
        random streams are its own generators, and the network goes back to train mode."""
        import copy

        current = copy.copy(self.restorer)  # the restorer's call with the trained float32 network in it
        current.net, current._compiled, current.dtype = self.net, None, torch.float32
        was_training = self.net.training
        self.net.eval()
        try:
            return current(faces.to(self.device), seed=0)
        finally:
            self.net.train(was_training)

    # ---------------------------------------------------------------- training
    def run(self, inputs: torch.Tensor, targets: torch.Tensor, name: str, output_path: str, work_dir: str,
            hook: Optional[Callable[[int], None]] = None, log: Callable[[str], None] = lambda s: None,
            gan_real: Optional[torch.Tensor] = None,
            on_checkpoint: Optional[Callable[[int, Callable], None]] = None) -> FinetuneResult:
        """Train on inputs[i] -> targets[i] ([N,3,H,W] in [0,1]); resume from the newest checkpoint in work_dir.
        gan_real: clean faces for the discriminator's "real" side (default: the pseudo targets).
        hook(1) is called after every optimiser step (progress; raise there to interrupt: the newest checkpoint
        stays and a later call resumes from it). on_checkpoint(step, render) after each checkpoint is saved:
        render(faces) is what the network restores at that step (self.render), e.g. for a live preview."""
        c = self.config
        if inputs.shape != targets.shape or inputs.ndim != 4 or inputs.shape[0] == 0:
            raise ValueError(f"need matching non-empty [N,3,H,W] inputs and targets, got {tuple(inputs.shape)} "
                             f"and {tuple(targets.shape)}")
        if os.path.exists(output_path):
            raise AlreadyExists(f"{output_path} exists; FaceMend never overwrites a model file. Choose another name.")
        os.makedirs(work_dir, exist_ok=True)
        xs, ys = self._prepare(inputs), self._prepare(targets)
        n = xs.shape[0]
        params = [p for p in self.net.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.999))
        opt_d = None
        if self.disc is not None:
            opt_d = torch.optim.AdamW(self.disc.parameters(), lr=c.d_lr, weight_decay=c.weight_decay,
                                      betas=(0.9, 0.999))
            reals = self._prepare(gan_real) if gan_real is not None else ys
        scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and c.precision == "fp16")
        history: list[dict] = []
        start = 0
        # what this run trains on: a resumed run must continue on exactly these pairs
        data = tensors_fingerprint(inputs.float(), targets.float(), *(() if gan_real is None else (gan_real.float(),)))
        ckpts = _checkpoints(work_dir)
        if ckpts:
            step0, path = ckpts[-1]
            state = torch.load(path, map_location="cpu", weights_only=True)
            saved = json.loads(state["config"])
            if saved != asdict(c) or state["name"] != name or int(state["num_faces"]) != n:
                raise FaceMendError(
                    f"{work_dir} holds a run with other settings or data ({os.path.basename(path)}: {saved}, "
                    f"{state['num_faces']} faces); use another work folder or the same settings to resume.")
            if state.get("data") != data:
                raise FaceMendError(
                    f"{work_dir} holds a run on other (face, pseudo target) pairs ({os.path.basename(path)} was "
                    "trained on other faces, targets or GAN real faces, or written by an older FaceMend that did "
                    "not record them); use another work folder, or delete it to start over.")
            self.net.load_state_dict(state["net"])
            opt.load_state_dict(state["optimizer"])
            if self.disc is not None:
                self.disc.load_state_dict(state["disc"])
                opt_d.load_state_dict(state["optimizer_d"])
            history = json.loads(state["history"])
            start = step0
            log(f"resuming from {os.path.basename(path)} (step {step0} of {c.steps})")
        self.net.train()
        if self.disc is not None:
            self.disc.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        for step in range(start, c.steps):
            for g in opt.param_groups:
                g["lr"] = cosine_lr(c, step)
            gen = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
            opt.zero_grad(set_to_none=True)
            if opt_d is not None:
                opt_d.zero_grad(set_to_none=True)
            sums: dict = {}
            for _ in range(c.accumulate):
                idx = torch.randint(0, n, (min(c.micro_batch, n),), generator=gen)
                x = xs[idx].to(self.device)
                y = ys[idx].to(self.device)
                terms = self.loss_terms(x, y, gen, keep_output=True)
                out = terms.pop("output")
                scaler.scale(terms["total"] / c.accumulate).backward()
                if self.disc is not None:
                    self.disc.requires_grad_(True)
                    ridx = torch.randint(0, reals.shape[0], (min(c.micro_batch, reals.shape[0]),), generator=gen)
                    terms["d_real"] = self._bce(reals[ridx].to(self.device), real=True)
                    scaler.scale(terms["d_real"] / c.accumulate).backward()
                    terms["d_fake"] = self._bce((out.detach() + 1) / 2, real=False)
                    scaler.scale(terms["d_fake"] / c.accumulate).backward()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / c.accumulate
            scaler.step(opt)
            if opt_d is not None:
                scaler.step(opt_d)
            scaler.update()
            if not all(math.isfinite(v) for v in sums.values()):
                raise FaceMendError(f"the loss became {sums} at step {step + 1}; lower the learning rate "
                                    f"(precision {c.precision}).")
            sums["lr"] = opt.param_groups[0]["lr"]
            history.append(sums)
            done = step + 1
            if done % c.checkpoint_every == 0 or done == c.steps:
                state = {"net": self.net.state_dict(), "optimizer": opt.state_dict(),
                         "config": json.dumps(asdict(c)), "history": json.dumps(history), "name": name,
                         "num_faces": n, "step": done, "data": data}
                if self.disc is not None:
                    state.update(disc=self.disc.state_dict(), optimizer_d=opt_d.state_dict())
                _atomic_save(state, os.path.join(work_dir, f"step_{done:06d}.pt"))
                if on_checkpoint is not None:
                    on_checkpoint(done, self.render)
            if hook is not None:
                hook(1)
        elapsed = time.perf_counter() - t0
        self.net.eval().requires_grad_(False)
        peak = int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else 0
        sps = elapsed / max(c.steps - start, 1)
        meta = {"facemend_adapt": json.dumps({"name": name, "base": self.restorer.name, "config": asdict(c)}),
                "arch": self.restorer.arch}
        save_new_safetensors(self.net.state_dict(), output_path, metadata=meta)
        losses = [h["total"] for h in history]
        plot_path = os.path.join(work_dir, f"{name}.loss.png")
        what = "L1 + LPIPS" + (" + GAN" if self.disc is not None else "")
        plot_losses(losses, plot_path, title=f"{name}: {what}, {c.steps} steps (base {self.restorer.name})")
        log_path = os.path.join(work_dir, f"{name}.log.json")
        tmp = f"{log_path}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"name": name, "base": self.restorer.name, "arch": self.restorer.arch, "output": output_path,
                       "config": asdict(c), "num_faces": n, "resumed_from": start, "seconds_per_step": sps,
                       "device": str(self.device), "peak_cuda_memory_bytes": peak, "history": history}, fh, indent=1)
        os.replace(tmp, log_path)
        return FinetuneResult(output_path, log_path, plot_path, losses, start, sps, peak)
