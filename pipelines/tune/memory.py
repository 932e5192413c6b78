"""How many faces one grouped tuning run (tune/engine.py) holds at once: the memory a face costs, computed from
the configuration, against the memory free on the device.

The cost model counts the tensors the code allocates, in elements of the working dtype (float32; int64 sort
indices count as two), phase by phase; a face's cost is what stays for the whole call plus its largest phase:

* training step, per crop of the step (``batch`` crops per face): the augmented crop, its son and the network
  input (``crop_terms``), the grouped network's saved activations (depth - 1 ReLU outputs of ``width``
  channels), the loss' element-wise terms, and the weight-sized gradients and Adam temporaries;
* full-image pass without grad (reconstruction tests, validation, test time), per tile of at most
  ``tile_size + 2 depth`` pixels a side, plus the image-sized input, residual and output;
* ZSSR's test time: the eight self-ensemble outputs, back-projection's image-sized temporaries; then their
  stack, its sort (values and int64 indices) and the median;
* kept for the whole call: the weights with Adam's two moments (and NTIRE's multi-scale copies and best output);
  per face of the whole batch (not only its group): the input copies and the output.

Convolution buffers (PASS_ACTIVATIONS / BACKWARD_ACTIVATIONS width-channel buffers per pixel, BLOCKED_ENDS for
the 3-channel ends) are counted as oneDNN needs them on a CPU (plain and blocked layouts); cuDNN needs fewer, so
on a GPU the same count leaves headroom for its workspaces.

What is not per face (the CUDA context, the allocator's rounding and fragmentation, other threads) is left to the
safety margin taken off the free memory. ``tests/test_tune_memory.py`` measures the real peak growth per face on
the CPU (the kernel's high-water mark of resident memory, 2 vs 5 faces in fresh processes, so that both runs use
the same grouped kernels) and checks that this estimate bounds it from above within a factor of 1.6 (measured
1.07-1.45 there; 1.55 for ZSSR x2 of a 256 px face with 128 px crops and the self-ensemble, 1.21 for NTIRE on a
512 px face with 8 crops of 128 px per step).

Pure torch: no ComfyUI import (a host frees memory before planning; see nodes/tune.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..io.errors import FaceMendError

GIB = 2 ** 30
MIB = 2 ** 20
# Safety margin: (fixed bytes, fraction of the usable memory). CUDA: context growth, cuDNN workspaces, the
# caching allocator's 2 MiB rounding and fragmentation. CPU: other processes and threads, malloc arenas.
MARGIN = {"cuda": (512 * MIB, 0.05), "cpu": (512 * MIB, 0.10)}


class NotEnoughMemory(FaceMendError, MemoryError):
    """Even one face does not fit in the memory free on the device."""


# ------------------------------------------------------------------------------------------------------ the model

def weight_count(width: int, depth: int) -> int:
    """Parameters of one face's network: 3 -> width -> ... -> width -> 3, 3x3, no biases."""
    return 9 * (3 * width + (depth - 2) * width * width + width * 3)


def tile_pixels(h: int, w: int, tile: int, depth: int) -> int:
    """Pixels of the largest tile GroupedCNN.apply_full runs at once on an h x w image."""
    if h <= tile and w <= tile:
        return h * w
    return min(h, tile + 2 * depth) * min(w, tile + 2 * depth)


def kept_weight_elements(width: int, depth: int) -> int:
    """The weights and Adam's m and v, kept for the whole call."""
    return 3 * weight_count(width, depth)


def step_weight_elements(width: int, depth: int) -> int:
    """During a training step: the parameters' selection copy and gradients, Adam's m/v/w selections and its two
    step temporaries (denominator, update): 7 weight-sized tensors at most."""
    return 7 * weight_count(width, depth)


# Activation-sized buffers a convolution layer holds at once, beyond what autograd saves: its input and output
# (no grad) or the incoming and outgoing gradient (backward), each also in oneDNN's blocked layout on a CPU
# (cuDNN on NCHW needs no copies; the same count is kept there as headroom for its workspaces).
PASS_ACTIVATIONS = 4
BACKWARD_ACTIVATIONS = 4
# The network's 3-channel ends (first input, last output, and their gradients) in that blocked layout: padded to
# 16 channels each.
BLOCKED_ENDS = 2 * 16


def train_step_elements(width: int, depth: int, crop: int, batch: int = 1, crop_terms: int = 0) -> tuple[int, int]:
    """One forward + backward of the grouped network on `batch` crop x crop inputs of one face, as (tensors,
    convolution buffers).

    Tensors: saved for backward, the depth - 1 ReLU outputs (each also the next convolution's saved input), the
    input, the residual, the output and the loss' difference and absolute value (3 channels each), and
    `crop_terms` 3-channel crop-sized tensors the caller builds per crop (augmentation, son, targets).
    Convolution buffers: BACKWARD_ACTIVATIONS width-channel buffers and the blocked 3-channel ends."""
    px = batch * crop * crop
    return px * ((depth - 1) * width + 3 * 5 + 3 * crop_terms), px * (BACKWARD_ACTIVATIONS * width + BLOCKED_ENDS)


def full_pass_elements(width: int, depth: int, h: int, w: int, tile: int) -> tuple[int, int]:
    """GroupedCNN.apply_full on one h x w face without grad, as (tensors, convolution buffers): the tile's
    3-channel input copy and residual, the whole image's output and its clamped copy; PASS_ACTIVATIONS
    width-channel buffers of the largest tile and the blocked 3-channel ends."""
    t = tile_pixels(h, w, tile, depth)
    return 3 * t * 2 + 3 * h * w * 2, (PASS_ACTIVATIONS * width + BLOCKED_ENDS) * t


def size_text(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.0f} MiB"


@dataclass
class FaceCost:
    """Bytes per face: `group` while its group runs (the largest phase plus what stays for the call) and `batch`
    for every face of the call (its input copies and output, kept until all groups are done)."""
    group: int
    batch: int
    phases: dict
    kept: dict = field(default_factory=dict)
    note: str = ""

    def describe(self) -> str:
        return ", ".join(f"{k} {size_text(v)}" for k, v in self.phases.items())

    def plus(self, extra: dict, note: str) -> "FaceCost":
        """This cost with `extra` bytes added to the named phases (e.g. another network measured per face)."""
        kept = self.phases["kept"]
        phases = {k: v + extra.get(k, 0) for k, v in self.phases.items()}
        group = kept + max(v for k, v in phases.items() if k != "kept")
        return FaceCost(group, self.batch, phases, self.kept, note)


def cuda_peak_bytes(fn, device: torch.device) -> int:
    """The CUDA allocator's peak above its level before fn() (what fn needs at most at once). Resets the device's
    peak statistics (a caller timing a whole run around this sees the peak from here on)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base)


def _cost(phases_elements: dict, kept_elements: dict, batch_elements: int, elem: int) -> FaceCost:
    """phases_elements: name -> (tensors, convolution buffers) of one phase."""
    phases = {k: int((other + conv) * elem) for k, (other, conv) in phases_elements.items()}
    kept = {k: int(v * elem) for k, v in kept_elements.items() if v}
    stays = sum(kept.values())
    return FaceCost(group=stays + max(phases.values()), batch=int(batch_elements * elem),
                    phases={**phases, "kept": stays}, kept=kept)


def zssr_face_cost(cfg, h: int, w: int, dtype: torch.dtype = torch.float32) -> FaceCost:
    """ZSSR (tune/zssr.py) on one h x w face with ZSSRConfig `cfg`."""
    elem = torch.finfo(dtype).bits // 8
    wd, d, tile = cfg.width, cfg.depth, cfg.tile_size
    stages = int(round(math.log2(cfg.scale)))
    crop = max(2, min(cfg.crop_size, h, w) // 2 * 2)
    phases = {}
    sources = 0                     # the stage inputs kept as father sources (the input copy is the first)
    for s in range(stages):
        hs, ws = h * 2 ** s, w * 2 ** s
        sources += 3 * hs * ws
        th, tw = (min(cfg.test_crop, x) // 2 * 2 or x for x in (hs, ws)) if cfg.test_crop else (hs, ws)
        son_full = 3 * th * tw
        # the step: the source selected per face (index_select copy), a sampling grid [c,c,2] and its copy, the
        # son (1/4), Adam's temporaries; crop_terms: bicubic, nearest, where, out, clamp, network input
        net, conv = train_step_elements(wd, d, crop, 1, crop_terms=6)
        step = (3 * hs * ws + 4 * crop * crop + net + 3 * crop * crop // 4 + step_weight_elements(wd, d), conv)
        # the reconstruction test: the son's and the target's selection copies, the pass, squared error
        net, conv = full_pass_elements(wd, d, th, tw, tile)
        test = (son_full * 3 + net, conv)
        # test time: up to 8 outputs (2h x 2w), the current transform, its upscale, the pass, the inverse
        # transform and back-projection's temporaries (3 full-size + 2 input-size at once); then the stack of the
        # 8 (the list freed), its sort (values and int64 indices) and the median
        out_px = 3 * 4 * hs * ws
        members = 8 if cfg.self_ensemble else 1
        net, conv = full_pass_elements(wd, d, 2 * hs, 2 * ws, tile)
        member = ((members - 1) * out_px + 3 * hs * ws + out_px + net + out_px + 3 * out_px + 2 * 3 * hs * ws, conv)
        name = f"x{2 ** (s + 1)}"
        phases[f"{name} train step"] = (sources + son_full + step[0], step[1])
        phases[f"{name} reconstruction test"] = (sources + son_full + test[0], test[1])
        phases[f"{name} test time"] = (sources + member[0], member[1])
        if cfg.self_ensemble:           # stack, sorted values, int64 indices, median
            phases[f"{name} median"] = (sources + (8 + 8 + 2 * 8 + 1) * out_px, 0)
    out = 3 * h * w * 4 ** stages
    # every face of the call: the caller's input copied twice (host clone, checked copy), the output
    return _cost(phases, {"weights + Adam": kept_weight_elements(wd, d)}, 2 * 3 * h * w + out, elem)


def ntire_face_cost(cfg, h: int, w: int, dtype: torch.dtype = torch.float32) -> FaceCost:
    """NTIRE refinement (tune/ntire_refine.py) on one h x w face with NTIREConfig `cfg` (the tuning network;
    an NR-IQA loss' own activations are the metric's and are added by the caller, see NTIRETune.face_cost)."""
    elem = torch.finfo(dtype).bits // 8
    wd, d, tile, b = cfg.width, cfg.depth, cfg.tile_size, cfg.batch_size
    crop = min(cfg.crop_size, h, w)
    short = min(h, w)
    max_scale = max(1.0, min(5.0, short / 128.0))
    n = cfg.num_scales
    scales = [1.0 / max_scale + (1.0 - 1.0 / max_scale) * (i + 1) / n for i in range(n)]
    copies = sum(3 * max(crop, round(h * s)) * max(crop, round(w * s)) for s in scales)
    kept = {"weights + Adam": kept_weight_elements(wd, d), "multi-scale copies + best": copies + 3 * h * w}
    # crop_terms: gathered patch, its permuted copy, the crop tensor, rot90 + where chain (3 alive), flip, where
    net, conv = train_step_elements(wd, d, crop, b, crop_terms=8)
    step = (net + step_weight_elements(wd, d), conv)
    # validation: the pass, the score's difference and absolute value
    net, conv = full_pass_elements(wd, d, h, w, tile)
    validation = (net + 2 * 3 * h * w, conv)
    # every face of the call: the input copied twice (host clone, checked copy), the output (a copy of best)
    return _cost({"train step": step, "validation": validation}, kept, 3 * 3 * h * w, elem)


# ------------------------------------------------------------------------------------------------- free memory

def _cgroup_available() -> Optional[int]:
    """Bytes left under this process' cgroup (v2 or v1) memory limit, if it has one."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_f) as f:
                limit = f.read().strip()
            with open(usage_f) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2 ** 60:
            return max(0, int(limit) - usage)
    return None


def system_available() -> Optional[int]:
    """Bytes of system memory available to this process: psutil's `available` (or /proc/meminfo's
    MemAvailable), lowered to the cgroup limit's headroom when there is one; None when unknown."""
    avail = None
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except Exception:  # not installed, or no permission on this platform
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    cg = _cgroup_available()
    if cg is not None:
        avail = cg if avail is None else min(avail, cg)
    return avail


def free_bytes(device: torch.device) -> tuple[Optional[int], str]:
    """(bytes free for new tensors on `device`, where the figure comes from). CUDA: cudaMemGetInfo's free plus
    what torch's caching allocator holds unused; CPU (and MPS, which shares it): the system's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(idx)
        cached = torch.cuda.memory_reserved(idx) - torch.cuda.memory_allocated(idx)
        return int(free + cached), f"cuda:{idx} free"
    return system_available(), "system memory available"


# ----------------------------------------------------------------------------------------------------- the plan

@dataclass
class GroupPlan:
    faces: int
    faces_per_group: int
    cost: Optional[FaceCost]
    free: Optional[int]
    margin: int
    source: str        # "automatic" / "set by the caller" / why else this number
    what: str = "tuning"

    @property
    def groups(self) -> int:
        return math.ceil(self.faces / self.faces_per_group) if self.faces else 0

    def slices(self) -> list[slice]:
        k = self.faces_per_group
        return [slice(i, min(i + k, self.faces)) for i in range(0, self.faces, k)]

    def line(self) -> str:
        """e.g. 'ZSSR: 37 faces per group, 2 groups for 60 faces (free 41.2 GiB, 1.1 GiB per face)'."""
        head = (f"{self.what}: {self.faces_per_group} face{'s' if self.faces_per_group != 1 else ''} per group, "
                f"{self.groups} group{'s' if self.groups != 1 else ''} for {self.faces} face"
                f"{'s' if self.faces != 1 else ''}")
        why = []
        if self.source != "automatic":
            why.append(self.source)
        if self.free is not None:
            why.append(f"free {size_text(self.free)}")
        if self.cost is not None:
            why.append(f"{size_text(self.cost.group)} per face")
            if self.cost.note:
                why.append(self.cost.note)
        if self.free is None and self.source == "automatic":
            why.append("free memory unknown: one group")
        return f"{head} ({', '.join(why)})"

    def as_dict(self) -> dict:
        return {"faces_per_group": self.faces_per_group, "groups": self.groups, "source": self.source,
                "free_bytes": self.free, "margin_bytes": self.margin,
                "bytes_per_face": None if self.cost is None else self.cost.group,
                "bytes_per_face_of_batch": None if self.cost is None else self.cost.batch,
                "phases_bytes": None if self.cost is None else self.cost.phases,
                "note": None if self.cost is None else self.cost.note or None, "line": self.line()}


def margin_bytes(device: torch.device, free: int) -> int:
    """The safety margin kept back from `free` bytes on `device` (MARGIN: fixed bytes + a fraction of the rest)."""
    fixed, frac = MARGIN["cuda" if torch.device(device).type == "cuda" else "cpu"]
    return int(fixed + frac * max(0, free - fixed))


def plan_groups(n: int, cost: FaceCost, device: torch.device, forced: int = 0, what: str = "tuning",
                need_hint: str = "", free: Optional[int] = None) -> GroupPlan:
    """Faces per group for `n` faces of `cost` each on `device`: `forced` > 0 wins (the caller's number, at most
    n); otherwise as many as fit in the free memory after the safety margin and the batch-wide per-face part,
    at least 1 and at most n. Raises NotEnoughMemory, naming what one face needs and what is free, when even
    one face does not fit. `free`: the free bytes (default: asked from the device now)."""
    n = int(n)
    if n <= 0:
        return GroupPlan(0, 1, cost, None, 0, "no faces", what)
    if forced and int(forced) > 0:
        return GroupPlan(n, min(int(forced), n), cost, None, 0, "set by the caller", what)
    if free is None:
        free, _ = free_bytes(device)
    if free is None:
        return GroupPlan(n, n, cost, None, 0, "automatic", what)
    margin = margin_bytes(device, free)
    usable = free - margin - n * cost.batch
    k = usable // cost.group if usable > 0 else 0
    if k < 1:
        raise NotEnoughMemory(
            f"{what}: one face needs about {size_text(cost.group)} while it is tuned ({cost.describe()}), "
            f"plus {size_text(cost.batch)} for each of the batch's {n} faces, but {size_text(free)} is free on "
            f"{torch.device(device)} (of which a {size_text(margin)} safety margin is kept back). "
            + (need_hint or "Use smaller crops or images, or free memory on the device."))
    return GroupPlan(n, int(min(k, n)), cost, int(free), margin, "automatic", what)


def cached_plan(tuner, images: torch.Tensor, what: str, small: str, advice: str) -> GroupPlan:
    """The plan(images) of a tuner (ZSSR, the NTIRE tune): its config's faces_per_group, or as many faces as fit in
    the memory free on their device now (tuner.face_cost); images smaller than engine.MIN_SIDE are one group with
    the note `small`. Kept on tuner._plan for the next call on a batch of the same shape (so a progress total and
    the groups agree), then asked again."""
    from .engine import MIN_SIDE

    key = (tuple(images.shape), str(images.device))
    if tuner._plan is not None and tuner._plan[0] == key:
        return tuner._plan[1]
    n, _, h, w = images.shape
    if min(h, w) < MIN_SIDE:
        plan = GroupPlan(n, max(1, n), None, None, 0, small, what)
    else:
        plan = plan_groups(n, tuner.face_cost(h, w, images.device), images.device, tuner.config.faces_per_group,
                           what, advice)
    tuner._plan = (key, plan)
    return plan
