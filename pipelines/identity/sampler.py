"""RestorerID's DDIM sampler, exactly as the official inference computes it (reference A.1 step 4, 13).

Two timestep grids are used at once (an inherited quirk that the weights were sampled with):
  * the networks receive t = space_timesteps(1000, steps), i.e. round(i * 999 / (steps - 1)) accumulated as the
    official loop does: [0, 20, 41, ..., 979, 999] for 50 steps;
  * the DDIM update uses alpha-bar at the 'uniform' grid without the usual +1: k * (1000 // steps), k < steps:
    [0, 20, ..., 980]; alpha_prev(k) is alpha-bar at the previous grid point, and alpha-bar(0) for k = 0.
So the first step runs the networks at t=999 with alpha-bar(980), and the last step (alpha_t = alpha_prev,
sigma 0) leaves x unchanged. eta=1 draws fresh noise on every step (also the last, where it is multiplied by 0).
Each step runs the structure encoder on the LQ latent at the current t, and the UNet on [uncond; cond] with the
same ID scale in both halves; e = e_u + cfg (e_c - e_u). cfg == 1 runs the conditional branch only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

NUM_TRAIN_TIMESTEPS = 1000
LINEAR_START, LINEAR_END = 0.00085, 0.0120


def alphas_cumprod(n: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """SD's scaled-linear schedule, float64: betas = linspace(sqrt(0.00085), sqrt(0.012), n)^2."""
    betas = torch.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


def spaced_timesteps(num_timesteps: int, count: int) -> list[int]:
    """The official `space_timesteps(num_timesteps, [count])`, sorted (the stride is accumulated in floats
    and rounded with Python's round, as there)."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {count}")
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    out, cur = [], 0.0
    for _ in range(count):
        out.append(round(cur))
        cur += stride
    return sorted(set(out))


@dataclass(frozen=True)
class DDIMPlan:
    timesteps: list            # what the networks see, in sampling order (descending)
    alphas: torch.Tensor       # alpha-bar_t per step, float64, sampling order
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor

    def __len__(self):
        return len(self.timesteps)


def ddim_plan(steps: int, eta: float = 1.0) -> DDIMPlan:
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be between 1 and {NUM_TRAIN_TIMESTEPS}, got {steps}")
    ac = alphas_cumprod()
    c = NUM_TRAIN_TIMESTEPS // steps
    grid = [k * c for k in range(steps)]
    a = ac[grid]
    a_prev = torch.cat([ac[:1], ac[grid[:-1]]])
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    model_t = spaced_timesteps(NUM_TRAIN_TIMESTEPS, steps)
    if len(model_t) != steps:
        raise ValueError(f"{steps} steps give {len(model_t)} distinct timesteps")
    return DDIMPlan(list(reversed(model_t)), a.flip(0), a_prev.flip(0), sigma.flip(0))


def _as_scale(ip_scale, n: int, device) -> float | torch.Tensor:
    if isinstance(ip_scale, torch.Tensor):
        s = ip_scale.reshape(-1).float().to(device)
        if s.numel() == 1:
            return float(s)
        if s.numel() != n:
            raise ValueError(f"one ID scale per face expected ({n}), got {s.numel()}")
        return s
    return float(ip_scale)


@torch.no_grad()
def ddim_sample(unet, encoder, lq_latent: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor],
                ip_scale=1.0, steps: int = 50, cfg: float = 4.0, eta: float = 1.0,
                x_T: Optional[torch.Tensor] = None, noise: Optional[Callable[[int], torch.Tensor]] = None,
                generator: Optional[torch.Generator] = None, hook: Optional[Callable[[int], None]] = None
                ) -> torch.Tensor:
    """Sample latents [B,4,h,w] for the LQ latents `lq_latent` (already scaled by 0.18215).

    cond / uncond: [B, 77 + n_id, 768] contexts. ip_scale: a float or one value per face ([B]).
    x_T: the start noise (default: drawn from `generator`); noise(i): the eta noise of step i (default: drawn).
    Random draws happen on the CPU generator in the official order (x_T, then one draw per step), so a seed gives
    the same result on every device. hook(1) is called after each step (progress + interruption).
    """
    plan = ddim_plan(steps, eta)
    b = lq_latent.shape[0]
    device = lq_latent.device
    dtype = torch.float64 if lq_latent.dtype == torch.float64 else torch.float32  # float64: tests' reference run

    def draw():
        return torch.randn(lq_latent.shape, generator=generator, dtype=dtype).to(device)

    x = (x_T if x_T is not None else draw()).to(device, dtype)
    lq = lq_latent.to(dtype)
    guided = uncond is not None and cfg != 1.0
    scale = _as_scale(ip_scale, b, device)
    if guided:
        lq_in = torch.cat([lq, lq])
        ctx = torch.cat([uncond, cond]).to(device)
        scale_in = torch.cat([scale, scale]) if isinstance(scale, torch.Tensor) else scale
    else:
        lq_in, ctx, scale_in = lq, cond.to(device), scale
    # everything a step needs, prepared before the loop: one upload of the timesteps, coefficients as floats
    all_t = torch.tensor(plan.timesteps, device=device, dtype=torch.long)
    coefs = list(zip(plan.alphas.tolist(), plan.alphas_prev.tolist(), plan.sigmas.tolist()))
    for i in range(len(plan)):
        ts = all_t[i:i + 1].expand(lq_in.shape[0])
        struct = encoder(lq_in, ts)
        x_in = torch.cat([x, x]) if guided else x
        e = unet(x_in, ts, ctx, struct, scale_in).to(dtype)
        if guided:
            e_u, e_c = e.chunk(2)
            e = e_u + cfg * (e_c - e_u)
        a_t, a_prev, sigma = coefs[i]
        pred_x0 = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
        eps_noise = (noise(i) if noise is not None else draw()).to(device, dtype)
        x = a_prev ** 0.5 * pred_x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * e + sigma * eps_noise
        if hook is not None:
            hook(1)
    return x
