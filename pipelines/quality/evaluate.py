"""Evaluate a folder of restored faces as the NTIRE 2025 challenge does: per-image NR-IQA scores, ID similarity
to the matching input, FID over the folder, the challenge score and the low-ID count; written as JSON, CSV and a
PNG chart.

Outputs are matched to inputs by file stem (anywhere under the inputs folder, as eval.py does by name). Outputs
in sub-folders named like the NTIRE subsets (CelebA, LFW-Test, CelebChild-Test, Wider-Test, WebPhoto-Test) get
that subset's ID threshold and dataset weighting; others the default threshold and a plain mean. With the
organisers' landmark file, each input's subset and five landmarks come from it instead, as eval.py does.

The ID model is the challenge's own (AdaFace IR-50, adaface.py) or an ArcFace proxy (id_similarity.py); the report
says which. Landmarks for the ID warp: the landmark file; else, for AdaFace, the detector on the input; else the
FFHQ template (the outputs taken as aligned crops); each image's row says which.
"""
from __future__ import annotations

import csv
import json
import os
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..io.errors import FaceMendError
from ..io.images import IMAGE_EXTENSIONS, read_image
from .ntire_score import ID_THRESHOLDS, id_gate, landmark_key, protocol, score_terms, weighted_mean


def find_images(folder: str) -> list[str]:
    """All image files under folder (recursive), sorted by relative path."""
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda p: os.path.relpath(p, folder))


def _dataset_of(path: str, root: str) -> Optional[str]:
    parts = os.path.relpath(path, root).replace(os.sep, "/").split("/")[:-1]
    return next((p for p in parts if p in ID_THRESHOLDS), None)


def _input_landmarks(lq: torch.Tensor, key: str, landmarks: Optional[dict], detector, use_detector: bool):
    """(points [1,5,2] in the input's pixels or None for the FFHQ template, where they came from)."""
    if landmarks is not None:
        if key not in landmarks:
            raise FaceMendError(f"input {key!r} is not in the landmark file (keys are file names without extension, "
                                "as the organisers' inference_face looks them up)")
        return torch.tensor(landmarks[key]["points"], dtype=torch.float64)[None], "file"
    if use_detector and detector is not None:
        dets = detector.detect(lq, score_threshold=0.5)[0]
        if dets.shape[0]:
            best = dets[dets[:, 4].argmax()]  # the most confident face, as the organisers' MTCNN align takes
            return best[5:15].reshape(1, 5, 2).double().cpu(), "detector"
        return None, "template (no face detected in the input)"
    return None, "template"


def _id_similarity(id_model, lq: torch.Tensor, img: torch.Tensor, pts, adaface: bool) -> float:
    """One input/output pair; pts: the input's landmarks or None (both taken as aligned crops)."""
    scale = torch.tensor([img.shape[-1] / lq.shape[-1], img.shape[-2] / lq.shape[-2]], dtype=torch.float64)
    if adaface and pts is not None:
        # as the organisers: each 8-bit image warped at its own size (an output of another size gets the points
        # scaled to it)
        return float(id_model.similarity(lq, img, pts, pts * scale)[0])
    if lq.shape[-2:] != img.shape[-2:]:  # e.g. x2 outputs: compare at the output's size
        pts = None if pts is None else pts * scale
        lq = F.interpolate(lq, size=img.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    return float(id_model.similarity(lq, img, pts)[0])


def evaluate(outputs_dir: str, metrics: dict, inputs_dir: Optional[str] = None, id_model=None, fid=None,
             id_threshold: float = 0.6, device=None, log: Callable = print, interrupt: Callable = lambda: None,
             external_means: Optional[dict] = None, protocol_name: str = "ntire2025",
             landmarks: Optional[dict] = None, detector=None) -> dict:
    """metrics: name -> IQAMetric; id_model: AdaFaceIR50, ArcFaceONNX or None; fid: (FIDInception, (mu, sigma)) or
    None; external_means: means computed elsewhere (e.g. {'qalign': 4.6} from pyiqa on a large GPU), used in the
    score and listed under 'external_means'; protocol_name: 'ntire2025' | 'ntire2026' (ID thresholds per subset);
    landmarks: read_landmark_file() of the organisers' CSV; detector: finds the input's landmarks for AdaFace
    when no landmark file is given."""
    proto = protocol(protocol_name)
    thresholds = proto["thresholds"]
    files = find_images(outputs_dir)
    if not files:
        raise FaceMendError(f"no images found under {outputs_dir}")
    if id_model is not None and not inputs_dir:
        raise FaceMendError("ID similarity needs the inputs folder (--inputs)")
    inputs = {}
    if inputs_dir:
        for p in find_images(inputs_dir):
            inputs.setdefault(os.path.splitext(os.path.basename(p))[0], p)
    device = torch.device(device) if device else torch.device("cpu")
    rows, feats, t0 = [], [], time.perf_counter()
    for i, path in enumerate(files):
        interrupt()
        img = read_image(path)[0].to(device)
        dataset = _dataset_of(path, outputs_dir)
        if landmarks is not None:
            entry = landmarks.get(landmark_key(path))
            if entry is None:
                raise FaceMendError(f"output {path}: {landmark_key(path)!r} is not in the landmark file, so its "
                                    "subset is unknown (name outputs like their inputs, as the challenge requires)")
            dataset = entry["dataset"]
            if dataset not in thresholds:
                raise FaceMendError(f"the landmark file puts {landmark_key(path)!r} in subset {dataset!r}, which "
                                    f"{protocol_name} has no threshold for ({', '.join(thresholds)})")
        row = {"file": os.path.relpath(path, outputs_dir).replace(os.sep, "/"),
               "dataset": dataset, "width": img.shape[-1], "height": img.shape[-2]}
        with torch.no_grad():
            for name, metric in metrics.items():
                row[name] = float(metric.score(img)[0])
            if id_model is not None:
                stem = os.path.splitext(os.path.basename(path))[0]
                if stem not in inputs:
                    raise FaceMendError(f"no input image named {stem}.* under {inputs_dir} for output {path}")
                lq = read_image(inputs[stem])[0].to(device)
                adaface = getattr(id_model, "name", "") == "adaface"
                pts, row["landmarks"] = _input_landmarks(lq, landmark_key(inputs[stem]), landmarks, detector,
                                                         adaface)
                row["id_sim"] = _id_similarity(id_model, lq, img, pts, adaface)
            if fid is not None:
                feats.append(fid[0].features(img).double().cpu())
        rows.append(row)
        log(f"[{i + 1}/{len(files)}] {row['file']}: " + ", ".join(
            f"{k} {row[k]:.4f}" for k in list(metrics) + (["id_sim"] if id_model is not None else [])))
    datasets = [r["dataset"] for r in rows]
    means = {name: weighted_mean([r[name] for r in rows], datasets) for name in metrics}
    report = {"outputs": os.path.abspath(outputs_dir), "inputs": os.path.abspath(inputs_dir) if inputs_dir else None,
              "images": len(rows), "means": means, "per_image": rows}
    if fid is not None:
        from .fid import fid_from_features

        means["fid"] = fid_from_features(torch.cat(feats), fid[1])
    external = dict(external_means or {})
    unknown = set(external) - {"niqe", "clipiqa", "maniqa", "musiq", "qalign", "fid"}
    if unknown:
        raise FaceMendError(f"unknown external metric(s) {sorted(unknown)}")
    if external:
        report["external_means"] = external
    terms = score_terms(**{**{k: v for k, v in means.items() if k in ("niqe", "clipiqa", "maniqa", "musiq", "fid")},
                           **external})
    report["ntire"] = {"score": sum(terms.values()), "terms": terms,
                       "missing_terms": [m for m in ("clipiqa", "maniqa", "musiq", "niqe", "qalign", "fid")
                                         if m not in terms],
                       "complete": len(terms) == 6}
    report["protocol"] = {"name": protocol_name, "id_thresholds": dict(thresholds), "max_low": proto["max_low"],
                          "source": proto["source"], "score": "the same formula and metrics in 2025 and 2026"}
    if id_model is not None:
        gate = id_gate([r["id_sim"] for r in rows], datasets, default_threshold=id_threshold, thresholds=thresholds,
                       max_low=proto["max_low"])
        for r, g in zip(rows, gate["per_image"]):
            r["id_threshold"], r["low_id"] = g["threshold"], g["low"]
        means["id_sim"] = sum(r["id_sim"] for r in rows) / len(rows)
        report["id_gate"] = {k: gate[k] for k in ("low_count", "low_by_dataset", "max_low", "passed")}
        report["id_gate"]["default_threshold"] = id_threshold
        report["id_gate"]["protocol"] = protocol_name
        sources: dict = {}
        for r in rows:
            sources[r["landmarks"]] = sources.get(r["landmarks"], 0) + 1
        report["id_gate"]["landmarks"] = sources
        adaface = getattr(id_model, "name", "") == "adaface"
        report["id_model"] = {
            "name": "AdaFace IR-50" if adaface else "ArcFace (proxy)",
            "file": os.path.basename(getattr(id_model, "path", "") or ""),
            "as_the_challenge": adaface,
            "note": ("the challenge's own ID model and alignment" if adaface else
                     "a proxy: the challenge gates with AdaFace IR-50 (adaface_ir50_ms1mv2.ckpt); ArcFace numbers "
                     "differ, a face can pass here and fail there")}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def write_report(report: dict, out_dir: str) -> list[str]:
    """report.json, per_image.csv and summary.png in out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("report.json", "per_image.csv", "summary.png")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=1)
    rows = report["per_image"]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plot_summary(report, paths[2])
    return paths


def plot_summary(report: dict, path: str) -> None:
    """One figure: the NTIRE score with each term's share, then per metric every image's score (sorted, so the
    worst images stand out, with the mean), then ID similarity per image against its threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, ntire = report["per_image"], report["ntire"]
    metrics = [m for m in ("niqe", "clipiqa", "maniqa", "musiq") if m in report["means"] and m in rows[0]]
    has_id = "id_sim" in rows[0]
    panels = 1 + len(metrics) + int(has_id)
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.8), squeeze=False)
    axes = axes[0]
    ax = axes[0]
    names = list(ntire["terms"])
    ax.bar(names, [ntire["terms"][n] for n in names], color="#4C72B0")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"NTIRE score {ntire['score']:.3f}" + ("" if ntire["complete"] else
                                                        f"\n(without {', '.join(ntire['missing_terms'])})"),
                 fontsize=10)
    ax.set_ylabel("term (max about 1)")
    ax.tick_params(axis="x", rotation=45)
    lower = {"niqe"}
    for ax, m in zip(axes[1:], metrics):
        vals = sorted((r[m], r["file"]) for r in rows)
        if m not in lower:
            vals = vals[::-1]
        ax.bar(range(len(vals)), [v for v, _ in vals], color="#DD8452")
        ax.axhline(report["means"][m], color="k", lw=1, ls="--", label=f"mean {report['means'][m]:.3f}")
        ax.set_title(f"{m} ({'lower' if m in lower else 'higher'} is better)", fontsize=10)
        ax.set_xlabel("images, best to worst")
        ax.legend(fontsize=8)
        if len(vals) <= 12:
            ax.set_xticks(range(len(vals)), [os.path.basename(f)[:10] for _, f in vals], rotation=60, fontsize=7)
    if has_id:
        ax = axes[-1]
        order = sorted(range(len(rows)), key=lambda i: rows[i]["id_sim"])
        colors = ["#C44E52" if rows[i].get("low_id") else "#55A868" for i in order]
        ax.bar(range(len(order)), [rows[i]["id_sim"] for i in order], color=colors)
        gate = report["id_gate"]
        # each image's own threshold (its subset's under the protocol)
        ax.scatter(range(len(order)), [rows[i].get("id_threshold", gate["default_threshold"]) for i in order],
                   marker="_", s=80, color="k", label="threshold")
        ax.set_ylim(min(0.0, min(r["id_sim"] for r in rows)), 1.0)
        model = report.get("id_model", {}).get("name", "ArcFace (proxy)")
        ax.set_title(f"ID ({model}, {gate.get('protocol', 'ntire2025')}): {gate['low_count']} low\n"
                     f"({'pass' if gate['passed'] else 'FAIL'}, max {gate['max_low']})", fontsize=10)
        ax.set_xlabel("images, lowest first")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
