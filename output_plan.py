"""Where results go, one set of rules for every front end (the CLI's `restore`, the headless client, other engines):

- `plan_stems`: one output name per input, planned before any work; no name serves two inputs, also where the file
  system ignores case (macOS, Windows) and where a job writes extra outputs `<stem>_2`, `<stem>_3`, ...
- `refuse_outputs_on_inputs`: an output folder that holds an input, or an output that is an input, is refused.
- `claim_output_dir`: one run at a time per output folder (an exclusive lock file naming the run that holds it).
- `place_file`: a finished temporary file renamed to its output name; without `replace` a file that appeared
  meanwhile is never replaced (the existing-output rule holds for the whole run, not only at its start).

Standard library only (the headless client imports it)."""
from __future__ import annotations

import json
import os
import re
import socket
import time

LOCK_NAME = ".facemend.lock"


class OutputError(ValueError):
    """The outputs cannot go where asked (they would replace an input, another run holds the folder...)."""


class OutputExists(OutputError, FileExistsError):
    """An output appeared after the run checked for it (another program wrote it): it is left alone."""


def _clash(a: str, b: str, extra_outputs: bool) -> bool:
    """Whether output stems a and b (lower case) could name the same file."""
    if a == b:
        return True
    return extra_outputs and bool(re.fullmatch(re.escape(a) + r"_\d+", b) or re.fullmatch(re.escape(b) + r"_\d+", a))


def plan_stems(inputs: list[str], suffix: str = "", extra_outputs: bool = False, names: list[str] | None = None
               ) -> list[str]:
    """One output stem per input (its file name without extension, or `names[i]`, e.g. a relative path when a
    folder tree is mirrored), unique without regard to case. Inputs sharing a stem keep their extension in it
    (x_jpg, x_png), then a counter. With `extra_outputs` (each input may also write <stem>_2, <stem>_3, ...) no
    stem may be another's <stem>_<number>: x.png and x_2.png give x and x_2_png."""
    stems = [(names[i] if names else os.path.splitext(os.path.basename(p))[0]) + suffix for i, p in enumerate(inputs)]
    lower = [s.lower() for s in stems]
    planned: list[str] = []
    used: list[str] = []
    sep = "-" if extra_outputs else "_"  # a counter `_2` would itself look like an extra output
    for path, stem in zip(inputs, stems):
        name = stem
        if lower.count(stem.lower()) > 1 or any(_clash(u, stem.lower(), extra_outputs) for u in used):
            name = f"{stem}_{os.path.splitext(path)[1].lstrip('.').lower() or 'noext'}"
        candidate, k = name, 2
        while any(_clash(u, candidate.lower(), extra_outputs) for u in used):
            candidate, k = f"{name}{sep}{k}", k + 1
        used.append(candidate.lower())
        planned.append(candidate)
    return planned


def refuse_outputs_on_inputs(inputs: list[str], out_dir: str, outputs: list[str] = (), whole_folder: bool = False,
                             what: str = "-o") -> None:
    """Refuse outputs that are inputs; with `whole_folder`, an output folder that holds any input (its results,
    named by the server, could replace or mix with the photos)."""
    own = {os.path.realpath(p) for p in inputs}
    for target in outputs:
        if os.path.realpath(target) in own:
            raise OutputError(f"the output {target} would replace an input image; choose another output folder ({what})")
    if whole_folder:
        real = os.path.realpath(out_dir)
        for p in inputs:
            if os.path.dirname(os.path.realpath(p)) == real:
                raise OutputError(f"the output folder {out_dir} holds the input {p}: results would replace or mix "
                                  f"with the inputs; choose another output folder ({what})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class OutputClaim:
    """This run's exclusive claim on an output folder: `<folder>/.facemend.lock`, created atomically (O_EXCL),
    naming the process that holds it; removed by release() (a context manager). A lock left by a process that
    is gone (same host) is taken over."""

    def __init__(self, out_dir: str, command: str = ""):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "command": command}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._holder()
                if other is not None and other.get("host") == self.info["host"] and \
                        isinstance(other.get("pid"), int) and not _pid_alive(other["pid"]):
                    os.remove(self.path)  # its run died without cleaning up
                    continue
                who = (f"process {other.get('pid')} on {other.get('host')}, started {other.get('started')}"
                       + (f": {other['command']}" if other.get("command") else "")) if other else "another run"
                raise OutputError(f"another FaceMend run is writing into {out_dir} ({who}); wait for it to finish or "
                                  f"choose another output folder (-o). If no such run is active, delete {self.path}")
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            return
        raise OutputError(f"cannot claim the output folder {out_dir}: {self.path} keeps reappearing")

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def release(self):
        if self._holder() == self.info:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def claim_output_dir(out_dir: str, command: str = "") -> OutputClaim:
    """Claim `out_dir` (created if missing) for this run, or raise OutputError naming the run that holds it."""
    os.makedirs(out_dir, exist_ok=True)
    return OutputClaim(out_dir, command)


def place_file(tmp: str, target: str, replace: bool) -> None:
    """Rename the finished temporary file `tmp` to `target` atomically. Without `replace`, a target that exists
    (written meanwhile by someone else) is left alone: OutputExists, and `tmp` is removed."""
    if replace:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # atomic and never replaces
    except FileExistsError:
        os.remove(tmp)
        raise OutputExists(f"{target} appeared while this run was working (another program wrote it); it was "
                           "left as it is") from None
    except OSError:  # a file system without hard links: check, then rename
        if os.path.exists(target):
            os.remove(tmp)
            raise OutputExists(f"{target} appeared while this run was working (another program wrote it); it "
                               "was left as it is") from None
        os.replace(tmp, target)
        return
    os.remove(tmp)
