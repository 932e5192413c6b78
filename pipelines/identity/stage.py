"""The `id_preserve` face stage: RestorerID on aligned crops with a reference identity and, per face, the
adaptive ID scale from MUSIQ (or a fixed scale), and the official colour fix against the input crops on the
unclamped decode (so a pipeline using this stage sets its own colour fix to "none"). After each call
`last_report` holds, per face, MUSIQ, the scale and the ArcFace similarity to the reference before and after."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..face.geometry import face_template, fit_similarity, warp_to_crops
from ..io.memory import run_halving
from ..quality.id_similarity import ARCFACE_TEMPLATE_112, INPUT_SIZE
from .adaptive_scale import ALPHA, BETA, adaptive_id_scale
from .reference import Reference


def similarity_to_reference(arcface, faces: torch.Tensor, ref: Reference) -> torch.Tensor:
    """ArcFace cosine of each FFHQ-aligned square crop [N,3,S,S] to the reference embedding -> [N]."""
    n, _, s, _ = faces.shape
    affine = fit_similarity(face_template(s).expand(n, 5, 2), torch.tensor(ARCFACE_TEMPLATE_112)).to(faces.device)
    crops = warp_to_crops(faces.float(), torch.arange(n, device=faces.device), affine, INPUT_SIZE,
                          border="constant", border_value=(0.0, 0.0, 0.0), antialias=False)
    emb = arcface.embed(crops).float()
    ref_emb = torch.nn.functional.normalize(ref.id_embed.to(emb.device).float(), dim=1)
    return (emb @ ref_emb.T)[:, 0]


def restore_in_batches(model, faces: torch.Tensor, reference: Reference, scales: torch.Tensor, batch_size: int,
                       seed: int, notes: Optional[list] = None, **restore_kw) -> torch.Tensor:
    """model.restore over batches of `batch_size` faces (8 faces are a UNet batch of 16 with CFG); face k draws
    from its own generator seeded seed + k, so a batch that runs out of memory and runs again with half as many
    faces gives the same result. `notes` collects what was retried. A hook with a `preview(images)` method (a
    host's live preview) is shown each finished batch."""
    show = getattr(restore_kw.get("hook"), "preview", None)

    def run(start: int, stop: int) -> torch.Tensor:
        out = model.restore(faces[start:stop], reference, ip_scale=scales[start:stop], seed=int(seed), first=start,
                            **restore_kw)
        if show is not None:
            show(out)
        return out

    def retried(k: int, why: str) -> None:
        if notes is not None:
            notes.append(f"RestorerID: out of memory ({why}); retried with {k} face{'s' if k > 1 else ''} per batch")

    return torch.cat(run_halving(faces.shape[0], batch_size, run, device=faces.device, on_retry=retried))


class IdentityStage:
    def __init__(self, model, reference: Reference, arcface, musiq=None, fixed_scale: Optional[float] = None,
                 steps: int = 50, cfg: float = 4.0, seed: int = 42, alpha: float = ALPHA, beta: float = BETA,
                 batch_size: int = 0, hook: Optional[Callable[[int], None]] = None, color_fix: str = "wavelet",
                 scale_source: str = ""):
        if musiq is None and fixed_scale is None:
            raise ValueError("the adaptive ID scale needs a MUSIQ metric (or give a fixed scale)")
        self.model, self.reference, self.arcface, self.musiq = model, reference, arcface, musiq
        self.fixed_scale, self.steps, self.cfg, self.seed = fixed_scale, steps, cfg, seed
        self.alpha, self.beta, self.hook = alpha, beta, hook
        self.batch_size = batch_size
        self.color_fix = color_fix
        # where the scale comes from, for the report (the CLI says why a fixed scale is used)
        self.scale_source = scale_source or ("adaptive from MUSIQ" if fixed_scale is None else
                                             f"fixed id_scale {float(fixed_scale)}")
        self.last_report: dict = {}

    def scales(self, faces: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.fixed_scale is not None:
            return torch.full((faces.shape[0],), float(self.fixed_scale)), None
        with torch.no_grad():
            musiq = torch.cat([self.musiq.score(faces[i:i + 1]).float().cpu() for i in range(faces.shape[0])])
        return adaptive_id_scale(musiq, self.alpha, self.beta), musiq

    def __call__(self, faces: torch.Tensor) -> torch.Tensor:
        scales, musiq = self.scales(faces)
        before = similarity_to_reference(self.arcface, faces, self.reference)
        bs = self.batch_size or (8 if faces.device.type == "cuda" else 1)
        notes: list = []  # face k draws from seed + k whatever the chunk size (1 on CPU, 8 on GPU by default)
        out = restore_in_batches(self.model, faces, self.reference, scales, bs, self.seed, notes,
                                 steps=self.steps, cfg=self.cfg, hook=self.hook, color_fix=self.color_fix)
        after = similarity_to_reference(self.arcface, out, self.reference)
        self.last_report = {
            "musiq": None if musiq is None else [round(float(v), 4) for v in musiq],
            "id_scale": [round(float(v), 5) for v in scales], "id_scale_source": self.scale_source,
            "id_similarity_before": [round(float(v), 5) for v in before],
            "id_similarity_after": [round(float(v), 5) for v in after],
            "reference": self.reference.report, "steps": self.steps, "cfg": self.cfg, "seed": self.seed,
            "color_fix": self.color_fix}
        if notes:
            self.last_report["notes"] = notes
        return out
