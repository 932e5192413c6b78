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


def checked_schedule(config: PseudoTargetConfig) -> SpacedSchedule:
    """The respaced schedule of `config`, or ValueError saying which setting is refused (the nodes check this
    before a run; the generator again when it is made)."""
    if config.respacing.strip().lower().startswith("ddim"):
        # The official sampler runs its deterministic DDIM loop for "ddimN" and leaves out the low-frequency
        # constraint there: not the paper's pseudo targets, so not offered rather than run differently.
        raise ValueError(f"respacing {config.respacing!r}: the official generator switches to DDIM without the "
                         "low-frequency constraint for ddimN, which FaceMend does not offer; use a plain step "
                         "count such as \"250\" (official) or sections such as \"10,15,20\"")
    try:
        schedule = SpacedSchedule(config.respacing)
    except ValueError as exc:
        raise ValueError(f"respacing {config.respacing!r}: {exc} (expected e.g. \"250\" or \"10,15,20\")") from exc
    config.validate(schedule.num_steps)
    return schedule


class PseudoTargetGenerator:
    """channels_last: the prior's weights and inputs in NHWC memory. Default: on the CPU only, where oneDNN's
    convolutions then run without reordering every input and output (measured 20-25% faster at 512 px); CUDA's
    GroupNorm works on NCHW only and would copy every activation there. The prior module is switched to the
    layout in place (a memory layout, no change of values).
    prior_batch: faces per network call within a batch (the loop's other steps always run on the whole batch).
    Default: 1 on the CPU, where a larger call is no faster per face (measured 3-25% slower: more page faults and
    parallel regions) and the official generator calls it face by face too; the whole batch elsewhere."""

    def __init__(self, unet: PriorUNet, config: PseudoTargetConfig = PseudoTargetConfig(),
                 channels_last: Optional[bool] = None, prior_batch: Optional[int] = None):
        self.unet = unet
        self.config = config
        self.channels_last = channels_last
        self.prior_batch = prior_batch
        self.schedule = checked_schedule(config)
        self._lowpass: dict = {}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def num_model_calls(self) -> int:
        return self.config.start_step

    @torch.no_grad()
    def __call__(self, restored: torch.Tensor, batch_size: int = 1, seed: Optional[int] = None,
                 callback: Optional[Callable[[int], None]] = None,
                 on_step: Optional[Callable[..., None]] = None,
                 on_batch: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        """restored: [N,3,H,W] RGB in [0,1] (the restorer's outputs on the user's faces). Returns targets of the
        same shape in [0,1], float32, on the input's device.
        batch_size: faces sampled together (their network calls grouped by `prior_batch`).
        callback(n): after every denoising step (n = faces in the batch), for progress and interruption.
        on_step(i, x_before, x_after, noised_ref): after every constrained step (the constraint test uses it).
        on_batch(targets): each finished batch's targets ([b,3,H,W] in [0,1]), e.g. for a live preview."""
        seed = self.config.seed if seed is None else int(seed)
        n, _, h, w = restored.shape
        out = torch.empty((n, 3, h, w), dtype=torch.float32, device=restored.device)
        device = self.device
        cpu = device.type == "cpu"
        channels_last = cpu if self.channels_last is None else bool(self.channels_last)
        self._set_layout(channels_last)
        prior_batch = (1 if cpu else n) if self.prior_batch is None else max(1, int(self.prior_batch))
        bs = max(1, int(batch_size))
        for start in range(0, n, bs):
            chunk = restored[start:start + bs].to(device, torch.float32)
            gens = [torch.Generator(device=device).manual_seed(seed + start + k) for k in range(chunk.shape[0])]
            done = self._run(chunk, gens, channels_last, prior_batch, callback, on_step)
            out[start:start + chunk.shape[0]] = done.to(out.device)
            if on_batch is not None:
                on_batch(done)
        return out

    def _set_layout(self, channels_last: bool) -> None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        w = self.unet.input_blocks[0][0].weight
        if not w.is_contiguous(memory_format=fmt):
            # In the weights' own mode: ComfyUI loads models in inference mode, and a layout change made outside it
            # (the adapt node trains outside it) left inference storage under normal tensors, which the next
            # adapt run could not read (found in a real ComfyUI: a second run failed).
            with torch.inference_mode(w.is_inference()):
                self.unet.to(memory_format=fmt)

    def _filter(self, size: int, device: torch.device) -> LowPass:
        key = (size, self.config.down_factor, str(device))
        if key not in self._lowpass:
            self._lowpass = {key: LowPass(size, size, self.config.down_factor, device=device)}
        return self._lowpass[key]

    def _prior(self, x: torch.Tensor, t: torch.Tensor, channels_last: bool, prior_batch: int) -> torch.Tensor:
        """The network on x in groups of `prior_batch` faces; the output back in the loop's NCHW layout."""
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        b = x.shape[0]
        if prior_batch >= b:
            out = self.unet(x, t)
        else:
            out = torch.cat([self.unet(x[j:j + prior_batch], t[j:j + prior_batch]) for j in range(0, b, prior_batch)])
        return out.contiguous()

    def _run(self, im: torch.Tensor, gens, channels_last: bool, prior_batch: int, callback, on_step) -> torch.Tensor:
        c = self.config
        s = c.image_size
        h, w = im.shape[-2:]
        im = im.clamp(0.0, 1.0)
        if (h, w) != (s, s):
            im = F.interpolate(im, size=(s, s), mode="bicubic", align_corners=False, antialias=True)
        x_ref = ((im - 0.5) / 0.5).contiguous()
        sched = self.schedule
        b = im.shape[0]
        noise = torch.empty_like(x_ref)

        def draw() -> torch.Tensor:
            # Each face from its own generator, in the official order; normal_ on a contiguous face is the
            # official torch.randn of that shape. The buffer is refilled: every draw is used before the next.
            for k, g in enumerate(gens):
                noise[k].normal_(generator=g)
            return noise

        timesteps = sched.model_timesteps(im.device)          # one upload; a step's is a view of it
        x = sched.q_sample(x_ref, c.start_step, draw())
        lowpass = self._filter(s, im.device) if c.apply_filter else None
        for i in range(c.start_step - 1, -1, -1):
            model_out = self._prior(x, timesteps[i:i + 1].expand(b), channels_last, prior_batch)
            # The official step draws its noise at i = 0 too, but nothing uses it and nothing is drawn after.
            x = sched.p_sample(model_out, x, i, draw() if i else None, clip_denoised=c.clip_denoised)
            if lowpass is not None and i >= c.reg_end_step:
                ref_t = sched.q_sample(x_ref, i - 1, draw())
                before = x
                # x - P(x) + P(ref_t) as x + P(ref_t - x): P is linear, one filter instead of two (float rounding
                # only, and on the smaller difference).
                x = x + lowpass(ref_t - x)
                if on_step is not None:
                    on_step(i, before, x, ref_t)
            if callback is not None:
                callback(b)
        target = (x * 0.5 + 0.5).clamp(0.0, 1.0)
        if (h, w) != (s, s):
            target = F.interpolate(target, size=(h, w), mode="bicubic", align_corners=False,
                                   antialias=True).clamp(0.0, 1.0)
        return target
