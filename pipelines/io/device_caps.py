"""What a given device runs natively, asked of THAT device (not the current CUDA device): bf16 arithmetic and the
memory layout a network runs fastest in. Decisions here are per device, so a model moved between GPUs keeps
choosing right."""
from __future__ import annotations

import torch

# bf16 tensor cores (and native bf16 arithmetic) start with Ampere, compute capability 8.0. Older GPUs (T4 7.5,
# V100 7.0, RTX 20 7.5) emulate bf16 in fp32 units: slower than fp16 and than fp32 at the same memory traffic,
# yet torch.cuda.is_bf16_supported() says True for them (it counts emulation) and asks the current device only.
BF16_MIN_CAPABILITY = (8, 0)


def bf16_native(device: torch.device | str) -> bool:
    """True when `device` computes bfloat16 natively: a CUDA device of compute capability >= 8.0."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index)) >= BF16_MIN_CAPABILITY


def channels_last_for(device: torch.device | str, groupnorm_heavy: bool) -> bool:
    """The memory layout a convolutional network should run in on `device` (the decision table, measured or known):

    - CPU: channels-last for every architecture. oneDNN convolutions take NHWC without reordering each
      activation; measured on one 512 face, 1 thread: GFPGAN v1.4 3.1 -> 2.6 s, CodeFormer 7.0 -> 6.3 s,
      RestoreFormer 4.8 -> 4.2 s, GPEN 2.9 -> 2.5 s (README, restore).
    - CUDA: channels-last (the tensor cores' native layout for fp16/bf16 convolutions) unless the network is
      GroupNorm-heavy: CUDA's GroupNorm kernels are NCHW-only and copy every channels-last activation to NCHW and
      back (CodeFormer's and RestoreFormer's VQGAN encoders/decoders, the diffusion prior: NCHW).
    - anything else (MPS, XPU, ...): NCHW, the layout every backend supports without copies.
    """
    kind = torch.device(device).type
    if kind == "cpu":
        return True
    if kind == "cuda":
        return not groupnorm_heavy
    return False
