"""Faces of several photos through one pipeline: each photo detected alone (photos differ in size), then the
crops of all photos in forwards of up to K faces, then each photo pasted alone. Pure torch (no Ray): the Ray
actor stage calls it on each batch of decoded photos."""
from __future__ import annotations

import time

import torch

from ..host import device as dev
from ..pipelines.io.errors import FaceMendError, Interrupted


def error_message(exc: BaseException) -> str:
    """The report's reason for a failed input (the local CLI's wording)."""
    message = str(exc) if isinstance(exc, FaceMendError) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, RuntimeError) and dev.is_oom(exc):
        message = f"out of memory: {exc}"
    return message


FAILURES = (FaceMendError, OSError, ValueError, RuntimeError)


def restore_images(pipeline, images: list, batch_faces: int, faces_independent: bool) -> list:
    """images: [1,3,H,W] tensors on the pipeline's device. Returns per photo (output [1,3,H',W'], report) or the
    exception that photo failed with (one bad photo never fails the others).

    faces_independent (PresetSpec): the faces of all photos share forwards of up to `batch_faces`, grouped by
    crop size; else each photo's faces go together and alone, exactly as the local CLI runs them (tuning stages
    learn from all faces of their call). A shared forward that fails is retried photo by photo, so only the photo
    at fault fails."""
    results: list = [None] * len(images)
    detected = {}
    for i, image in enumerate(images):
        t = time.perf_counter()
        try:
            detected[i] = pipeline.detect(image)
        except Interrupted:
            raise
        except FAILURES as exc:
            results[i] = exc
        else:
            detected[i][3]["seconds"] = time.perf_counter() - t
    restored = {i: None for i, d in detected.items() if len(d[2]) > 0}
    groups = _groups(detected, restored, batch_faces, faces_independent)
    for group in groups:
        try:
            _restore_group(pipeline, detected, restored, group)
        except Interrupted:
            raise
        except FAILURES as exc:
            if len(group) == 1:
                results[group[0]] = exc
                continue
            for i in group:  # retry alone: the failure belongs to one photo, not to all that shared the forward
                try:
                    _restore_group(pipeline, detected, restored, [i])
                except Interrupted:
                    raise
                except FAILURES as exc_one:
                    results[i] = exc_one
    for i, (canvas, crops, alignment, report) in detected.items():
        if results[i] is not None:
            continue
        t = time.perf_counter()
        try:
            out = canvas if len(alignment) == 0 else pipeline.paste(canvas, restored[i], alignment, report)
        except Interrupted:
            raise
        except FAILURES as exc:
            results[i] = exc
            continue
        report["seconds"] += time.perf_counter() - t
        results[i] = (out, report)
    return results


def _groups(detected, restored, batch_faces, faces_independent) -> list[list[int]]:
    """Photos whose faces share the face stages' calls: consecutive photos with crops of one size, up to
    batch_faces faces (a photo with more faces than that goes alone; the stages chunk it themselves)."""
    if not faces_independent:
        return [[i] for i in restored]
    groups, current, count, size = [], [], 0, None
    for i in restored:
        n, s = len(detected[i][2]), tuple(detected[i][1].shape[1:])
        if current and (count + n > batch_faces or s != size):
            groups.append(current)
            current, count = [], 0
        current.append(i)
        count += n
        size = s
    if current:
        groups.append(current)
    return groups


def _restore_group(pipeline, detected, restored, group: list[int]) -> None:
    crops = torch.cat([detected[i][1] for i in group]) if len(group) > 1 else detected[group[0]][1]
    shared: dict = {"timings_s": {}}
    t = time.perf_counter()
    out = pipeline.restore_crops(crops, shared)
    seconds = time.perf_counter() - t
    counts = [len(detected[i][2]) for i in group]
    for i, part in zip(group, torch.split(out, counts)):
        restored[i] = part
        report = detected[i][3]
        share = len(detected[i][2]) / sum(counts)  # the shared forward's time, by faces
        report["seconds"] += seconds * share
        for name, value in shared.items():
            if name == "timings_s":
                report["timings_s"].update({k: v * share for k, v in value.items()})
            else:
                report[name] = value
        if len(group) > 1:
            report["batched_with"] = len(group) - 1
