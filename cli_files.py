"""The CLI's file handling: which inputs, where their results go, the checks made before any model loads
(output folder, existing outputs, output size), and writes that never leave half a file.

For other engines (e.g. a distributed `restore`), the rules to reuse: scan_inputs (what is read, what is skipped
and why), plan_outputs (one output per input, planned before any work), check_output_dir, check_existing,
claim_output_dir (one run per output folder; from output_plan), write_output (atomic, never replacing a file
that appeared meanwhile unless told to) and write_json_atomic."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import torch

from .output_plan import OutputError, OutputExists, claim_output_dir, place_file, plan_stems  # noqa: F401
from .pipelines.io.errors import FaceMendError
from .pipelines.io.images import IMAGE_EXTENSIONS, enable_image_plugins, write_image
from .pipelines.presets import check_output_size


EXISTING_POLICIES = ("error", "overwrite", "skip")


def plan_outputs(inputs: list[str], out_dir: str, suffix: str = "", names: dict | None = None
                 ) -> list[tuple[str, str]]:
    """(input, output path) pairs: <stem><suffix>.png in out_dir (`names`: input -> relative output stem, e.g.
    sub/x when a folder tree is mirrored). Inputs sharing a stem, also one differing only in case (x.jpg and
    X.png, or two folders' x.png), keep their extension in the name (x_jpg.png, x_png.png), then a counter, so
    no result replaces another. An output that would be one of the inputs is refused."""
    stems = plan_stems(inputs, suffix, names=[names[p] for p in inputs] if names else None)
    names = [os.path.join(out_dir, stem + ".png") for stem in stems]
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


def write_output(target: str, image: torch.Tensor, alpha: torch.Tensor | None, replace: bool = True) -> None:
    """Write a PNG under a hidden temporary name without an image extension, then rename: an interrupted
    write leaves no file a later run would take for a result or an input. replace=False: a target that
    appeared meanwhile is left alone (OutputExists)."""
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(target) or ".", f".{os.path.basename(target)}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as f:
            write_image(f, image, alpha, format="PNG")
        place_file(tmp, target, replace)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    """A JSON file (e.g. --report) written under a temporary name and renamed: never half a file, and a failed
    write leaves the previous file as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def collect_inputs(items: list[str]) -> tuple[list[str], list[dict]]:
    """Image files named or found in folders, and a failure entry for each argument that is neither."""
    scan = scan_inputs(items)
    return scan.files, scan.failed


@dataclass
class InputScan:
    files: list = field(default_factory=list)  # image files, in order
    failed: list = field(default_factory=list)  # {"input", "error"} for arguments that are not there
    skipped: list = field(default_factory=list)  # files in the folders that are not read (not images)
    subfolders: list = field(default_factory=list)  # subfolders not entered (without recursive)
    names: dict = field(default_factory=dict)  # file -> output stem relative to -o (folder tree mirrored)

    def notes(self) -> list[str]:
        """What a user should hear about the folders: files not read, subfolders not entered."""
        lines = []
        if self.skipped:
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            lines.append(f"skipped {len(self.skipped)} file(s) that are not images ({', '.join(IMAGE_EXTENSIONS)}): "
                         + ", ".join(self.skipped[:5]) + more)
        if self.subfolders:
            more = f" and {len(self.subfolders) - 5} more" if len(self.subfolders) > 5 else ""
            lines.append(f"{len(self.subfolders)} subfolder(s) not read: " + ", ".join(self.subfolders[:5]) + more
                         + "; pass --recursive to restore them too (the output folder mirrors the input tree)")
        return lines


def scan_inputs(items: list[str], recursive: bool = False, out_dir: str | None = None) -> InputScan:
    """The inputs of a run: named files, and the images of named folders (with `recursive`, of their whole tree,
    each output under the same relative path in the output folder; the output folder itself is not entered).
    Hidden files are ignored; other files and subfolders not entered are listed for the summary."""
    scan = InputScan()
    out_real = os.path.realpath(out_dir) if out_dir else None
    for item in items:
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs.sort()
                subs = [d for d in dirs if not d.startswith(".")
                        and os.path.realpath(os.path.join(root, d)) != out_real]
                if not recursive:
                    scan.subfolders += [os.path.join(root, d) for d in subs]
                    subs = []
                dirs[:] = subs
                for n in sorted(names):
                    path = os.path.join(root, n)
                    if n.startswith("."):
                        continue
                    if n.lower().endswith(IMAGE_EXTENSIONS):
                        scan.files.append(path)
                        if recursive:
                            scan.names[path] = os.path.splitext(os.path.relpath(path, item))[0]
                    else:
                        scan.skipped.append(path)
        elif os.path.isfile(item):
            scan.files.append(item)
        else:
            scan.failed.append({"input": item, "error": f"no such file or folder: {item}"})
    if recursive:  # named files (and files of several folders) keep their own name
        for path in scan.files:
            scan.names.setdefault(path, os.path.splitext(os.path.basename(path))[0])
    return scan


def within_output_limit(files: list[str], upscale: int, limit: int) -> tuple[list[str], list[dict]]:
    """Split off, from the image headers alone (no decoding), the inputs whose output would exceed `limit`."""
    from PIL import Image

    ok, refused = [], []
    for path in files:
        try:
            enable_image_plugins(path)
        except FaceMendError:  # no plugin for it: reported (with the extra to install) when its turn comes
            ok.append(path)
            continue
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
