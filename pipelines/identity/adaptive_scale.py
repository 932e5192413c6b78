"""RestorerID's adaptive ID scale: lambda = exp((alpha - MUSIQ(LQ)) / beta), alpha 9.5, beta 10
(scripts/Inference.py: `math.exp(0.1 * (9.5 - musiq))`, MUSIQ-KonIQ on the LQ input in [0,1]).

A badly degraded input (low MUSIQ) leans on the reference, a mild one hardly: MUSIQ 9.5 -> 1.0,
27.6 -> 0.164, 40 -> 0.047. The official code does not clamp; min/max are optional here.
"""
from __future__ import annotations

import math

import torch

ALPHA, BETA = 9.5, 10.0


def adaptive_id_scale(musiq, alpha: float = ALPHA, beta: float = BETA, min_scale: float | None = None,
                      max_scale: float | None = None):
    """A float for a float MUSIQ score, a tensor for a tensor of per-face scores."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if isinstance(musiq, torch.Tensor):
        s = torch.exp((alpha - musiq.double()) / beta)
        if min_scale is not None or max_scale is not None:
            s = s.clamp(min=min_scale, max=max_scale)
        return s.float()
    s = math.exp((alpha - float(musiq)) / beta)
    if min_scale is not None:
        s = max(s, min_scale)
    if max_scale is not None:
        s = min(s, max_scale)
    return s
