"""The CLI's file handling: which inputs, where their results go, the checks made before any model loads
(output folder, existing outputs, output size), and writes that never leave half a file."""
from __future__ import annotations

import os
import tempfile

import torch

from .pipelines.io.errors import FaceMendError
from .pipelines.io.images import list_images, write_image
from .pipelines.presets import check_output_size


EXISTING_POLICIES = ("error", "overwrite", "skip")


def plan_outputs(inputs: list[str], out_dir: str, suffix: str = "") -> list[tuple[str, str]]:
    """(input, output path) pairs: <stem><suffix>.png in out_dir. Inputs sharing a stem (x.jpg and x.png, or two
    folders' x.png) keep their extension in the name (x_jpg.png, x_png.png), then a counter, so no result
    replaces another. An output that would be one of the inputs is refused."""
    stems = [os.path.splitext(os.path.basename(p))[0] + suffix for p in inputs]
    names = []
    used: set = set()
    for path, stem in zip(inputs, stems):
        name = stem
        if stems.count(stem) > 1:
            name = f"{stem}_{os.path.splitext(path)[1].lstrip('.').lower() or 'noext'}"
        candidate, k = name, 2
        while candidate.lower() in used:
            candidate, k = f"{name}_{k}", k + 1
        used.add(candidate.lower())
        names.append(os.path.join(out_dir, candidate + ".png"))
    own = {os.path.realpath(p) for p in inputs}
    clash = [t for t in names if os.path.realpath(t) in own]
    if clash:
        raise FaceMendError(f"the output {clash[0]} would replace an input image; choose another output folder (-o)")
    return list(zip(inputs, names))


def check_output_dir(out_dir: str, inputs_dirs=()) -> None:
    """Refuse, before any model is loaded, an output folder that cannot take the results: a file, a path
    that cannot be created, a folder we may not write to, or an input folder (results would mix with inputs)."""
    real = os.path.realpath(out_dir)
    for d in inputs_dirs:
        if os.path.realpath(d) == real:
            raise FaceMendError(f"the output folder {out_dir} is the input folder {d}: results would replace or "
                                "mix with the inputs; choose another output folder (-o)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FaceMendError(f"the output folder {out_dir} is a file; give -o a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".facemend-write-test-", dir=out_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise FaceMendError(f"cannot write to the output folder {out_dir}: {exc.strerror or exc}; "
                            "choose a writable folder with -o") from exc


def check_existing(pairs: list[tuple[str, str]], existing: str) -> None:
    """existing='error': refuse when any output exists already, naming them and the two ways on."""
    present = [t for _, t in pairs if os.path.exists(t)]
    if present and existing == "error":
        more = f" and {len(present) - 3} more" if len(present) > 3 else ""
        raise FaceMendError(f"{len(present)} output(s) exist already ({', '.join(present[:3])}{more}); "
                            "pass --overwrite to replace them or --skip-existing to keep them")


def write_output(target: str, image: torch.Tensor, alpha: torch.Tensor | None) -> None:
    """Write a PNG under a hidden temporary name without an image extension, then rename: an interrupted
    write leaves no file a later run would take for a result or an input."""
    tmp = os.path.join(os.path.dirname(target) or ".", f".{os.path.basename(target)}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as f:
            write_image(f, image, alpha, format="PNG")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def collect_inputs(items: list[str]) -> tuple[list[str], list[dict]]:
    """Image files named or found in folders, and a failure entry for each argument that is neither."""
    files, failed = [], []
    for item in items:
        if os.path.isdir(item):
            files += list_images(item)
        elif os.path.isfile(item):
            files.append(item)
        else:
            failed.append({"input": item, "error": f"no such file or folder: {item}"})
    return files, failed


def within_output_limit(files: list[str], upscale: int, limit: int) -> tuple[list[str], list[dict]]:
    """Split off, from the image headers alone (no decoding), the inputs whose output would exceed `limit`."""
    from PIL import Image

    ok, refused = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                w, h = im.size
            check_output_size(h, w, upscale, limit, what=path)
        except FaceMendError as exc:
            refused.append({"input": path, "error": str(exc)})
            continue
        except Exception:  # unreadable: reported when its turn comes
            pass
        ok.append(path)
    return ok, refused
