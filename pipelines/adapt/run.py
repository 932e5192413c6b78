"""The whole adaptation: restorer outputs -> pseudo targets -> fine-tuning -> a new restorer file.

Pseudo targets are the slow part (150 prior steps per face); they are kept in the work folder (`targets.pt`,
keyed on everything that changes them: the photos' contents, the restorer's and the prior's weights, the
generator's settings) so that a resumed run neither recomputes them nor trains on different ones; the fine-tuning
checkpoints record the fingerprint of the (input, target) pairs and refuse to resume on other ones.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch

from ..io.errors import FaceMendError
from .finetune import FinetuneConfig, FinetuneResult, Finetuner
from .fingerprint import module_fingerprint, tensors_fingerprint
from .pseudo_targets import PseudoTargetGenerator


def targets_key(faces: torch.Tensor, restorer, generator: PseudoTargetGenerator) -> dict:
    """Everything the pseudo targets depend on (float rounding of the batch layout aside)."""
    return {"faces": tensors_fingerprint(faces.float()), "config": repr(generator.config),
            "restorer": restorer.name, "restorer_weights": module_fingerprint(restorer.net),
            "prior_weights": module_fingerprint(generator.unet)}


def make_or_load_targets(faces: torch.Tensor, restorer, generator: PseudoTargetGenerator, work_dir: str,
                         batch_size: int = 1, hook: Optional[Callable[[int], None]] = None,
                         log: Callable[[str], None] = lambda s: None,
                         on_batch: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """Pseudo targets of `faces` ([N,3,H,W] in [0,1]) in "general" mode: the reference is the restorer's output.
    Cached in work_dir/targets.pt, reused only for the same photos, restorer weights, prior weights and generator
    settings (targets_key); other inputs are refused, naming what changed."""
    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, "targets.pt")
    key = targets_key(faces, restorer, generator)
    if os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        try:
            old = json.loads(saved.get("key", ""))
        except (TypeError, ValueError):
            old = None  # an older FaceMend's key (it left out the prior and the restorer's weights)
        if old == key:
            log(f"pseudo targets from {path}")
            return saved["targets"]
        what = {"faces": "the photos", "config": "the generator settings", "restorer": "the restorer",
                "restorer_weights": "the restorer's weights", "prior_weights": "the prior's weights"}
        differ = [what[k] for k in key if old.get(k) != key[k]] if isinstance(old, dict) else ["an older cache"]
        raise FaceMendError(f"{path} holds pseudo targets made from other inputs (not the same: "
                            f"{', '.join(differ)}); use another work folder, or delete this one to start over.")
    restored = restorer(faces, seed=0)
    targets = generator(restored, batch_size=batch_size, callback=hook, on_batch=on_batch)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"key": json.dumps(key, sort_keys=True), "targets": targets.cpu(), "restored": restored.cpu()}, tmp)
    os.replace(tmp, path)
    return targets


def adapt_restorer(faces: torch.Tensor, restorer, generator: PseudoTargetGenerator, lpips_net,
                   config: FinetuneConfig, name: str, output_path: str, work_dir: str, batch_size: int = 1,
                   hook: Optional[Callable[[int], None]] = None, log: Callable[[str], None] = lambda s: None,
                   gan_real: Optional[torch.Tensor] = None,
                   on_batch: Optional[Callable[[torch.Tensor], None]] = None,
                   on_checkpoint: Optional[Callable[[int, Callable], None]] = None
                   ) -> tuple[FinetuneResult, torch.Tensor]:
    """Returns (the fine-tuning result, the pseudo targets). hook(1) after every prior step per face batch and
    every optimiser step (progress + interruption); on_batch(targets) after each batch of pseudo targets is made
    (PseudoTargetGenerator), on_checkpoint(step, render) after each training checkpoint (Finetuner.run)."""
    if os.path.exists(output_path):
        raise FaceMendError(f"{output_path} exists; FaceMend never overwrites a model file. Choose another name.")
    targets = make_or_load_targets(faces, restorer, generator, work_dir, batch_size, hook, log, on_batch)
    result = Finetuner(restorer, lpips_net, config).run(faces, targets, name, output_path, work_dir, hook=hook,
                                                        log=log, gan_real=gan_real, on_checkpoint=on_checkpoint)
    return result, targets


def load_face_folder(folder: str, size: int) -> torch.Tensor:
    """Aligned face crops of a folder as [N,3,size,size] in [0,1] (square images only; resized to `size`)."""
    import torch.nn.functional as F

    from ..io.errors import InvalidImage
    from ..io.images import list_images, read_image

    if not os.path.isdir(folder):
        raise InvalidImage(f"face folder not found: {folder}")
    paths = list_images(folder)
    if not paths:
        raise InvalidImage(f"{folder} holds no images (png, jpg, ...).")
    faces = []
    for p in paths:
        img = read_image(p)[0]
        h, w = img.shape[-2:]
        if h != w:
            raise InvalidImage(f"{p} is {w}x{h}: adaptation takes aligned square face crops (FFHQ template, e.g. "
                               "512x512, as the FaceMend Detect + Align node outputs).")
        if (h, w) != (size, size):
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        faces.append(img.clamp(0, 1))
    return torch.cat(faces)
