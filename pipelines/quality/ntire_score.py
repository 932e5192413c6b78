"""The NTIRE 2025 and 2026 Real-World Face Restoration score and ID gate (zhengchen1999/
NTIRE2025_RealWorld_Face_Restoration eval.py at 3b1903d, jkwang28/NTIRE2026_RealWorld_Face_Restoration eval.py at
7ca192d; reference/methods.md 7.3).

Score = CLIPIQA + MANIQA + MUSIQ/100 + max(0, (10 - NIQE)/10) + QALIGN/5 + max(0, (100 - FID)/100)
Each IQA term is the mean over the test images (per-dataset means weighted by the dataset sizes); FID is one
number over the whole output folder. ID gate: an image is "low ID" when its ID similarity to the input is
below its dataset's threshold; a submission fails when more than 10 images are low (both READMEs; eval.py only
counts them).

The two years differ only in two thresholds: the 2026 eval.py lowers Wider-Test to 0.2 and WebPhoto-Test to 0.25
(its README still quotes 0.30 for both, its conclusion "0.20-0.60"; the code is what scores). Score formula,
metrics, dataset sizes, the ID model and alignment are the same; the test landmark file is test_face.csv (2025)
and test_2026_face.csv (2026), same columns.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

# Per-dataset ID-similarity thresholds and test-set sizes, exactly as eval.py names them.
ID_THRESHOLDS = {"CelebA": 0.5, "LFW-Test": 0.6, "CelebChild-Test": 0.6, "Wider-Test": 0.3, "WebPhoto-Test": 0.3}
DATASET_COUNTS = {"CelebA": 100, "LFW-Test": 100, "CelebChild-Test": 50, "WebPhoto-Test": 100, "Wider-Test": 100}
MAX_LOW_ID = 10
PROTOCOLS = {
    "ntire2025": {"thresholds": ID_THRESHOLDS, "max_low": MAX_LOW_ID, "landmark_file": "test_face.csv",
                  "source": "zhengchen1999/NTIRE2025_RealWorld_Face_Restoration eval.py @ 3b1903d"},
    "ntire2026": {"thresholds": {**ID_THRESHOLDS, "Wider-Test": 0.2, "WebPhoto-Test": 0.25}, "max_low": MAX_LOW_ID,
                  "landmark_file": "test_2026_face.csv",
                  "source": "jkwang28/NTIRE2026_RealWorld_Face_Restoration eval.py @ 7ca192d"},
}


def protocol(name: str) -> dict:
    """One year's ID gate (thresholds per subset, the most low-ID faces a passing submission may have)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
METRICS = ("niqe", "clipiqa", "maniqa", "musiq", "qalign", "fid")


def score_terms(niqe: Optional[float] = None, clipiqa: Optional[float] = None, maniqa: Optional[float] = None,
                musiq: Optional[float] = None, qalign: Optional[float] = None,
                fid: Optional[float] = None) -> dict:
    """Each metric's contribution to the score (about 0..1 each); metrics left as None are left out, as eval.py
    leaves out Q-Align when it is not run."""
    given = dict(niqe=niqe, clipiqa=clipiqa, maniqa=maniqa, musiq=musiq, qalign=qalign, fid=fid)
    for name, value in given.items():
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(f"{name} is not a finite number ({value}); the NTIRE score needs finite metric means")
    terms = {}
    if clipiqa is not None:
        terms["clipiqa"] = float(clipiqa)
    if maniqa is not None:
        terms["maniqa"] = float(maniqa)
    if musiq is not None:
        terms["musiq"] = float(musiq) / 100
    if niqe is not None:
        terms["niqe"] = max(0.0, (10 - float(niqe)) / 10)
    if qalign is not None:
        terms["qalign"] = float(qalign) / 5
    if fid is not None:
        terms["fid"] = max(0.0, (100 - float(fid)) / 100)
    return terms


def ntire_score(**means) -> float:
    """The challenge score from the metric means (names as in METRICS)."""
    unknown = set(means) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; the NTIRE score uses {', '.join(METRICS)}")
    return sum(score_terms(**means).values())


def weighted_mean(values: Sequence[float], datasets: Optional[Sequence[str]] = None,
                  counts: Mapping[str, int] = DATASET_COUNTS) -> float:
    """eval.py's 'All' value: per-dataset means weighted by the official dataset sizes (= the plain mean on the
    official test set). Without dataset labels, or with labels outside `counts`, the plain mean."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to average")
    if not datasets or any(d not in counts for d in datasets):
        return sum(values) / len(values)
    groups: dict = {}
    for v, d in zip(values, datasets):
        groups.setdefault(d, []).append(v)
    total = sum(counts[d] for d in groups)
    return sum(sum(g) / len(g) * counts[d] for d, g in groups.items()) / total


def id_gate(similarities: Sequence[float], datasets: Optional[Sequence[Optional[str]]] = None,
            default_threshold: float = 0.6, thresholds: Mapping[str, float] = ID_THRESHOLDS,
            max_low: int = MAX_LOW_ID) -> dict:
    """Which images fall below their ID threshold, and whether the set passes (at most `max_low` low images).

    datasets: each image's NTIRE subset name (keys of ID_THRESHOLDS) or None for `default_threshold`.
    """
    sims = [float(s) for s in similarities]
    labels = list(datasets) if datasets is not None else [None] * len(sims)
    if len(labels) != len(sims):
        raise ValueError(f"{len(sims)} similarities but {len(labels)} dataset labels")
    per_image, low_by_set = [], {}
    for s, d in zip(sims, labels):
        if d is not None and d not in thresholds:
            raise ValueError(f"unknown dataset {d!r}; known: {', '.join(thresholds)} (or None for the default "
                             f"threshold {default_threshold})")
        t = thresholds[d] if d is not None else float(default_threshold)
        low = s < t  # strict, as eval.py
        per_image.append({"id_sim": s, "threshold": t, "low": low})
        if low:
            key = d or "default"
            low_by_set[key] = low_by_set.get(key, 0) + 1
    low_count = sum(p["low"] for p in per_image)
    return {"low_count": low_count, "low_by_dataset": low_by_set, "max_low": int(max_low),
            "passed": low_count <= max_low, "per_image": per_image}


# The organisers' landmark file (face_alignment/test_face.csv, test_2026_face.csv, val_face.csv): one row per input
# image, keyed by its file name without extension; `dataset` is the subset whose threshold applies (eval.py takes
# it from here, not from the folders); x1..y2 is the detection box, unused by the gate.
LANDMARK_COLUMNS = ("left_eye_x", "left_eye_y", "right_eye_x", "right_eye_y", "nose_x", "nose_y",
                    "mouth_left_x", "mouth_left_y", "mouth_right_x", "mouth_right_y")


def landmark_key(path: str) -> str:
    """The file's key in the landmark file, as inference_face forms it: the base name up to its first dot."""
    import os

    return os.path.basename(path).split(".")[0]


def read_landmark_file(path: str) -> dict:
    """{key: {"dataset": str, "points": [[x, y]] * 5}} from the organisers' CSV (columns filename, dataset and the
    ten landmark coordinates, in the order left eye, right eye, nose, mouth left, mouth right)."""
    import csv
    import os

    from ..io.errors import FaceMendError

    if not os.path.isfile(path):
        raise FaceMendError(f"landmark file not found: {path} (the organisers' face_alignment/test_face.csv, "
                            "test_2026_face.csv or val_face.csv)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("filename", "dataset") + LANDMARK_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise FaceMendError(f"{path} is not an NTIRE landmark file: no column(s) {', '.join(missing)} (its header "
                                f"is {reader.fieldnames}); expected filename,dataset,x1,y1,x2,y2,left_eye_x,...")
        out = {}
        for line, row in enumerate(reader, start=2):
            try:
                vals = [float(row[c]) for c in LANDMARK_COLUMNS]
            except (TypeError, ValueError) as exc:
                raise FaceMendError(f"{path} line {line}: landmark coordinates are not numbers ({exc})") from exc
            if not all(math.isfinite(v) for v in vals):
                raise FaceMendError(f"{path} line {line}: landmark coordinates are not finite")
            out.setdefault(row["filename"], {"dataset": row["dataset"],
                                             "points": [vals[i:i + 2] for i in range(0, 10, 2)]})
    if not out:
        raise FaceMendError(f"{path} has no rows")
    return out
