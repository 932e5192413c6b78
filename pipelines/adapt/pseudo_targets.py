"""Pseudo targets for adapting a restorer without ground truth (Kuai et al., WACV 2025).

The generator of SamsungLabs/unsupervised-face-restoration (`generate_pseudo_targets.py` ->
`DifIRSampler.sample_func_ir_aligned` -> `GaussianDiffusion.p_sample_loop_progressive`), for the "general" mode
whose reference is the current restorer's output:

    x_ref = 2 * clamp(restored, 0, 1) - 1                       (512x512; other sizes are resized in and out)
    x = q_sample(x_ref, start_step)                             (respaced index; 150 of 250 by default)
    for i = start_step - 1 ... 0:                               (starts one below start_step, as the official loop)
        x = p_sample(prior, x, i, clip_denoised)                (no noise at i = 0)
        if filter and i >= reg_end_step:                        (90 by default: 60 constrained steps)
            x = x - up(down(x)) + up(down(q_sample(x_ref, i - 1)))   (fresh noise every time)
    target = clamp((x + 1) / 2, 0, 1)

Random numbers: the official script draws every tensor from one global generator, image after image. Here each
face has its own generator seeded with `seed + index`, drawing in the official order (start noise, then per step
the sampling noise and the constraint noise), so a face's target does not depend on the batch it is in, and
face 0 with seed s equals the official run after `torch.manual_seed(s)` on the same device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .lowpass import LowPass
from .prior import PriorUNet
from .schedule import SpacedSchedule

OFFICIAL_SEED = 20000   # 10000 + (rank + 1) * 10000 on one GPU


@dataclass(frozen=True)
class PseudoTargetConfig:
    """The official defaults of scripts/generate_targets_*.sh."""
    start_step: int = 150          # --started_timesteps (respaced index)
    reg_end_step: int = 90         # --reg_end_timesteps: the constraint runs while i >= this
    down_factor: int = 8           # --down_N: 16 for SwinIR-like restorers, 8 for CodeFormer-like (general)
    apply_filter: bool = True      # --apply_filter
    respacing: str = "250"         # --timestep_respacing
    clip_denoised: bool = True
    image_size: int = 512          # the prior's training size
    seed: int = OFFICIAL_SEED

    def validate(self, num_steps: int) -> None:
        if not 0 < self.start_step < num_steps:
            raise ValueError(f"start_step must be in 1..{num_steps - 1} (respaced steps), got {self.start_step}")
        if self.apply_filter and not 1 <= self.reg_end_step:
            # The official loop would index the schedule at -1 (the noisiest step) for i = 0.
            raise ValueError(f"reg_end_step must be >= 1 when the low-frequency constraint is on, got "
                             f"{self.reg_end_step}")
        if self.down_factor < 1 or self.image_size % self.down_factor:
            raise ValueError(f"down_factor {self.down_factor} must divide the image size {self.image_size}")


class PseudoTargetGenerator:
    def __init__(self, unet: PriorUNet, config: PseudoTargetConfig = PseudoTargetConfig()):
        self.unet = unet
        self.config = config
        try:
            self.schedule = SpacedSchedule(config.respacing)
        except ValueError as exc:
            raise ValueError(f"respacing {config.respacing!r}: {exc} (expected e.g. \"250\" or \"ddim50\")") from exc
        config.validate(self.schedule.num_steps)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def num_model_calls(self) -> int:
        return self.config.start_step

    @torch.no_grad()
    def __call__(self, restored: torch.Tensor, batch_size: int = 1, seed: Optional[int] = None,
                 callback: Optional[Callable[[int], None]] = None,
                 on_step: Optional[Callable[..., None]] = None) -> torch.Tensor:
        """restored: [N,3,H,W] RGB in [0,1] (the restorer's outputs on the user's faces). Returns targets of the
        same shape in [0,1], float32, on the input's device.
        callback(n): after every denoising step (n = faces in the batch), for progress and interruption.
        on_step(i, x_before, x_after, noised_ref): after every constrained step (the constraint test uses it)."""
        seed = self.config.seed if seed is None else int(seed)
        n, _, h, w = restored.shape
        out = torch.empty((n, 3, h, w), dtype=torch.float32, device=restored.device)
        bs = max(1, int(batch_size))
        for start in range(0, n, bs):
            chunk = restored[start:start + bs].to(self.device, torch.float32)
            gens = [torch.Generator(device=self.device).manual_seed(seed + start + k) for k in range(chunk.shape[0])]
            out[start:start + chunk.shape[0]] = self._run(chunk, gens, callback, on_step).to(out.device)
        return out

    def _noise(self, gens, like: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.randn(like.shape[1:], generator=g, device=like.device, dtype=like.dtype)[None]
                          for g in gens])

    def _run(self, im: torch.Tensor, gens, callback, on_step) -> torch.Tensor:
        c = self.config
        s = c.image_size
        h, w = im.shape[-2:]
        im = im.clamp(0.0, 1.0)
        if (h, w) != (s, s):
            im = F.interpolate(im, size=(s, s), mode="bicubic", align_corners=False, antialias=True)
        x_ref = (im - 0.5) / 0.5
        sched = self.schedule
        b = im.shape[0]
        t0 = torch.full((b,), c.start_step, device=im.device, dtype=torch.long)
        x = sched.q_sample(x_ref, t0, self._noise(gens, x_ref))
        lowpass = LowPass(s, s, c.down_factor, device=im.device) if c.apply_filter else None
        for i in range(c.start_step - 1, -1, -1):
            t = torch.full((b,), i, device=im.device, dtype=torch.long)
            model_out = self.unet(x, sched.model_timesteps(t))
            x, _ = sched.p_sample(model_out, x, t, self._noise(gens, x), clip_denoised=c.clip_denoised)
            if lowpass is not None and i >= c.reg_end_step:
                ref_t = sched.q_sample(x_ref, t - 1, self._noise(gens, x_ref))
                before = x
                x = x - lowpass(x) + lowpass(ref_t)
                if on_step is not None:
                    on_step(i, before, x, ref_t)
            if callback is not None:
                callback(b)
        target = (x * 0.5 + 0.5).clamp(0.0, 1.0)
        if (h, w) != (s, s):
            target = F.interpolate(target, size=(h, w), mode="bicubic", align_corners=False,
                                   antialias=True).clamp(0.0, 1.0)
        return target
