"""Best-of selection (the IQPFR idea of steering restoration by NR-IQA, as a selection step): given K candidate
restorations of the same N faces, pick per face the best-scoring candidate among those passing the ID gate."""
from __future__ import annotations

from typing import Optional

import torch


def select_best(scores: torch.Tensor, lower_better: bool = False, id_sims: Optional[torch.Tensor] = None,
                id_threshold: float = 0.6) -> tuple[torch.Tensor, list[dict]]:
    """scores [K,N] (candidate k, face n); id_sims [K,N] cosine to the input face, or None (no gate).

    Returns (choice [N] candidate index, per-face report). A candidate passes the gate when its ID similarity
    is at least id_threshold. When no candidate of a face passes, the one with the highest ID similarity is
    taken (the least identity loss) and the report marks the face ``gate: "none passed"``.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [K candidates, N faces], got {tuple(scores.shape)}")
    k, n = scores.shape
    if id_sims is not None and id_sims.shape != scores.shape:
        raise ValueError(f"id_sims {tuple(id_sims.shape)} must match scores {tuple(scores.shape)}")
    quality = -scores if lower_better else scores
    quality = torch.where(torch.isnan(quality), torch.full_like(quality, -float("inf")), quality)
    if id_sims is None:
        passed = torch.ones_like(scores, dtype=torch.bool)
    else:
        passed = id_sims >= id_threshold
    masked = torch.where(passed, quality, torch.full_like(quality, -float("inf")))
    choice = masked.argmax(0)
    none_passed = ~passed.any(0)
    if id_sims is not None and none_passed.any():
        choice = torch.where(none_passed, id_sims.argmax(0), choice)
    report = []
    for i in range(n):
        entry = {"face": i, "chosen": int(choice[i]), "scores": [round(float(s), 5) for s in scores[:, i]]}
        if id_sims is not None:
            entry["id_similarity"] = [round(float(s), 5) for s in id_sims[:, i]]
            entry["passed_id_gate"] = [bool(p) for p in passed[:, i]]
            entry["gate"] = "none passed" if bool(none_passed[i]) else "ok"
        report.append(entry)
    return choice, report
