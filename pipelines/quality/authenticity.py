"""Authenticity check after IDM (Zhao et al., ICCV 2023): an authentic restorer applied to its own output should
not degrade it. Restore f(x) and f(f(x)); report the quality of both and the identity drift between them."""
from __future__ import annotations

from typing import Callable, Optional

import torch


def authenticity(restore: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, metric,
                 id_similarity: Optional[Callable] = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """restore: [N,3,H,W] -> [N,3,H,W]; metric: IQAMetric-like (score, lower_better, name).

    Returns (f(x), f(f(x)), report). Per face: score of x, f(x), f(f(x)); ``quality_gain`` = score(f(f(x))) -
    score(f(x)) oriented so that positive is better; with an ID model, ``id_fx_ffx`` (similarity of f(x) and
    f(f(x))), ``id_x_ffx`` (input to f(f(x))) and ``id_drift`` = 1 - id_fx_ffx. ``authentic`` per face: the
    second pass is not worse in quality and (with an ID model) id_fx_ffx >= id_x_fx, i.e. re-restoring does not
    move the identity more than the first restoration did.
    """
    with torch.no_grad():
        fx = restore(images)
        ffx = restore(fx)
        s = [metric.score(t).float().cpu() for t in (images, fx, ffx)]
    sign = -1.0 if metric.lower_better else 1.0
    gain = sign * (s[2] - s[1])
    report = {"metric": metric.name, "lower_better": metric.lower_better, "faces": []}
    sims = None
    if id_similarity is not None:
        sims = {"id_x_fx": id_similarity(images, fx).float().cpu(),
                "id_fx_ffx": id_similarity(fx, ffx).float().cpu(),
                "id_x_ffx": id_similarity(images, ffx).float().cpu()}
    for i in range(images.shape[0]):
        face = {"score_x": float(s[0][i]), "score_fx": float(s[1][i]), "score_ffx": float(s[2][i]),
                "quality_gain": float(gain[i])}
        ok = face["quality_gain"] >= 0
        if sims is not None:
            face.update({k: float(v[i]) for k, v in sims.items()})
            face["id_drift"] = 1.0 - face["id_fx_ffx"]
            ok = ok and face["id_fx_ffx"] >= face["id_x_fx"]
        face["authentic"] = bool(ok)
        report["faces"].append(face)
    report["authentic_faces"] = sum(f["authentic"] for f in report["faces"])
    report["mean_quality_gain"] = float(gain.mean())
    if sims is not None:
        report["mean_id_drift"] = float(1 - sims["id_fx_ffx"].mean())
    return fx, ffx, report
