"""LoRA weights merged into Linear / Conv2d modules (no peft needed at run time).

peft computes y = base(x) + scale * B(A(x)) with scale = lora_alpha / r; for a Linear that is
W + scale * B @ A, for a Conv2d (A: the base kernel with r outputs, B: 1x1) W + scale * (B @ A.flatten(1)),
reshaped to the kernel. Merging once gives the same output as peft's unmerged adapters (as
`merge_and_unload`) and costs nothing per call.
"""
from __future__ import annotations

import torch

from ..io.errors import ModelFileInvalid


def lora_pairs(state_dict: dict, path: str, strip_prefixes=(), adapter_names=None) -> dict:
    """{module name: (A, B)} from peft-style keys '<module>.lora_A[.<adapter>].weight' / lora_B.

    Keys are accepted with or without an adapter name between lora_A and weight; `adapter_names` (if given)
    restricts which adapters are read. Other keys are ignored by this function.
    """
    pairs: dict = {}
    for key, value in state_dict.items():
        for tag in (".lora_A.", ".lora_B."):
            if tag not in key:
                continue
            module, rest = key.split(tag, 1)
            parts = rest.split(".")
            if parts[-1] != "weight":
                continue
            adapter = ".".join(parts[:-1])
            if adapter_names is not None and adapter not in adapter_names:
                continue
            for prefix in strip_prefixes:
                if module.startswith(prefix):
                    module = module[len(prefix):]
                    break
            slot = pairs.setdefault(module, [None, None])
            slot[0 if tag == ".lora_A." else 1] = value
    broken = [m for m, (a, b) in pairs.items() if a is None or b is None]
    if broken:
        raise ModelFileInvalid(f"{path}: LoRA modules without both lora_A and lora_B weights: {broken[:3]}")
    return {m: (a, b) for m, (a, b) in pairs.items()}


def lora_rank(pairs: dict) -> int:
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise ModelFileInvalid(f"LoRA file mixes ranks {sorted(ranks)}")
    return ranks.pop()


@torch.no_grad()
def merge_lora(root: torch.nn.Module, pairs: dict, scale: float, path: str, what: str) -> int:
    """Add scale * B @ A to each named module's weight (in float32, then cast back). Returns the count.

    Raises ModelFileInvalid naming the modules that the model lacks or whose shapes do not fit, which is
    what a LoRA for another base model (or another diffusers version's module names) looks like."""
    missing, wrong = [], []
    updates = []
    for name, (a, b) in pairs.items():
        try:
            module = root.get_submodule(name)
        except AttributeError:
            missing.append(name)
            continue
        weight = getattr(module, "weight", None)
        if weight is None:
            missing.append(name)
            continue
        a32, b32 = a.to(weight.device, torch.float32), b.to(weight.device, torch.float32)
        if isinstance(module, torch.nn.Conv2d):
            ok = a32.ndim == 4 and b32.ndim == 4 and a32.shape[1:] == weight.shape[1:] and b32.shape[0] == weight.shape[0]
            delta = (b32.flatten(1) @ a32.flatten(1)).view(weight.shape) if ok else None
        elif isinstance(module, torch.nn.Linear):
            ok = a32.ndim == 2 and b32.ndim == 2 and a32.shape[1] == weight.shape[1] and b32.shape[0] == weight.shape[0]
            delta = b32 @ a32 if ok else None
        else:
            ok, delta = False, None
        if not ok or b32.shape[1] != a32.shape[0]:
            wrong.append(f"{name}: A {tuple(a.shape)}, B {tuple(b.shape)} vs weight {tuple(weight.shape)} "
                         f"({type(module).__name__})")
            continue
        updates.append((weight, delta))
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} target modules not in the {what} (e.g. {missing[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with shapes that do not fit (e.g. {wrong[0]})")
        raise ModelFileInvalid(f"{path} does not fit the {what}: {'; '.join(parts)}. Is it the LoRA for this "
                               "base model?")
    for weight, delta in updates:
        weight.copy_((weight.float() + scale * delta).to(weight.dtype))
    return len(updates)


class LoraApplied(torch.nn.Module):
    """base(x) + scale * B(A(x)): a LoRA kept beside its Linear / Conv2d (what peft and diffusers'
    load_lora_weights compute, unmerged), for checking a merge or keeping the base weights untouched."""

    def __init__(self, base: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.scale = base, float(scale)
        w = base.weight
        if isinstance(base, torch.nn.Conv2d):
            self.lora_A = torch.nn.Conv2d(base.in_channels, a.shape[0], base.kernel_size, base.stride, base.padding,
                                          base.dilation, base.groups, bias=False, padding_mode=base.padding_mode)
            self.lora_B = torch.nn.Conv2d(a.shape[0], base.out_channels, 1, bias=False)
        else:
            self.lora_A = torch.nn.Linear(base.in_features, a.shape[0], bias=False)
            self.lora_B = torch.nn.Linear(a.shape[0], base.out_features, bias=False)
        with torch.no_grad():
            self.lora_A.weight.copy_(a.to(w.dtype))
            self.lora_B.weight.copy_(b.to(w.dtype))
        self.lora_A.to(w.device)
        self.lora_B.to(w.device)

    @property
    def weight(self):  # code that reads a layer's weight (its dtype, device) still finds it
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x, *args, **kwargs):
        return self.base(x, *args, **kwargs) + self.scale * self.lora_B(self.lora_A(x))


@torch.no_grad()
def apply_lora(root: torch.nn.Module, pairs: dict, scale: float, path: str, what: str) -> int:
    """Wrap each named module in LoraApplied (same checks and messages as merge_lora). Returns the count."""
    merge_lora(root, pairs, 0.0, path, what)  # its checks; W + 0 * delta leaves every weight as it was
    for name, (a, b) in pairs.items():
        parent, _, child = name.rpartition(".")
        holder = root.get_submodule(parent) if parent else root
        setattr(holder, child, LoraApplied(getattr(holder, child), a, b, scale))
    return len(pairs)
