"""The iDDPM noise schedule of the prior: linear betas over 1000 steps, respaced (default 250 steps), with
learned-range variances; the arithmetic of guided-diffusion's GaussianDiffusion / SpacedDiffusion.

Coefficients are computed in float64 (numpy) and cast to float32 per use, like the official `_extract_into_tensor`,
so that one step here is the official step bit for bit on the same device.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def linear_betas(num_steps: int = 1000) -> np.ndarray:
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def space_timesteps(num_steps: int, section_counts) -> list[int]:
    """Original timesteps kept by a respacing such as "250" or "10,15,20" (evenly strided per section, rounded)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[4:])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == want:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot create exactly {want} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_steps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


class SpacedSchedule:
    """The respaced diffusion process; indices are respaced steps 0..num_steps-1."""

    def __init__(self, respacing: str = "250", original_steps: int = 1000):
        base = linear_betas(original_steps)
        base_cum = np.cumprod(1.0 - base)
        self.timestep_map = space_timesteps(original_steps, respacing)
        last, betas = 1.0, []
        for i in self.timestep_map:
            betas.append(1 - base_cum[i] / last)
            last = base_cum[i]
        b = np.array(betas, dtype=np.float64)
        self.betas = b
        self.num_steps = len(b)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod = ac
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        self.posterior_log_variance_clipped = np.log(np.append(post_var[1], post_var[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)
        self.log_betas = np.log(b)

    def coef(self, name: str, i: int) -> float:
        """Coefficient `name` at respaced step i, rounded to float32 as the official `_extract_into_tensor` does
        (float64 table, `.float()`). Returned as a Python float holding that float32 value: a float32 tensor
        times it is the official broadcast product bit for bit, and on a GPU it travels as a kernel argument (no
        host-to-device copy, no sync)."""
        return float(np.float32(getattr(self, name)[i]))

    def model_timesteps(self, device=None) -> torch.Tensor:
        """[num_steps] int64 original (unscaled) timesteps the network is called with, indexed by respaced step."""
        return torch.tensor(self.timestep_map, dtype=torch.long, device=device)

    def q_sample(self, x0: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        """x0 diffused to respaced step i (all of the batch at the same step)."""
        return self.coef("sqrt_alphas_cumprod", i) * x0 + self.coef("sqrt_one_minus_alphas_cumprod", i) * noise

    def p_sample(self, model_output: torch.Tensor, x: torch.Tensor, i: int, noise: Optional[torch.Tensor],
                 clip_denoised: bool = True) -> torch.Tensor:
        """One ancestral step at respaced step i from the network output (eps, learned-range variance values):
        x_{i-1}. No noise is added at i == 0 (`noise` may be None there). The official arithmetic in its order;
        the official mask multiply (1.0 or 0.0 times the noise term) is left out, which changes no bit (y * 1.0
        is y, and mean + 0 * finite is mean)."""
        c = x.shape[1]
        eps, var_values = torch.split(model_output, c, dim=1)
        x0 = self.coef("sqrt_recip_alphas_cumprod", i) * x - self.coef("sqrt_recipm1_alphas_cumprod", i) * eps
        if clip_denoised:
            x0 = x0.clamp_(-1, 1)
        mean = self.coef("posterior_mean_coef1", i) * x0
        mean += self.coef("posterior_mean_coef2", i) * x
        if i == 0:
            return mean
        frac = (var_values + 1) / 2
        log_variance = frac * self.coef("log_betas", i)
        log_variance += (1 - frac).mul_(self.coef("posterior_log_variance_clipped", i))
        return mean.add_(log_variance.mul_(0.5).exp_().mul_(noise))
