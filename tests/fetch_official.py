#!/usr/bin/env python3
"""Fetch the official reference code pinned in tests/official_pins.json into a per-user cache.

    python tests/fetch_official.py                      # every pinned repository, cloned from its URL
    python tests/fetch_official.py YingJiacheng/RestorerID --from ~/src/RestorerID
    python tests/fetch_official.py --from ~/mirrors     # a folder of clones named <name>, <owner>+<name>[/repo]
    python tests/fetch_official.py --list               # where each pin is, and whether it is there

Each repository lands in `<cache>/<owner>+<name>@<commit>` (cache: $FACEMEND_OFFICIAL_DIR, else
~/.cache/facemend/official), as the plain files of the pinned commit. `--from` takes a local clone or a bare git
directory (or a folder holding several, as <name>, <owner>+<name> or <owner>+<name>/repo) that contains the pinned
commit; without it the script runs `git fetch` of that one commit from the pinned URL. A copy is written under a
temporary name and renamed when whole, so an interrupted fetch never leaves a half checkout that the tests would use.
Blobs missing from a partial mirror are listed and left out (the tests need none of them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PINS_FILE = Path(__file__).resolve().with_name("official_pins.json")
MARKER = ".facemend-pin"


def pins() -> dict[str, dict]:
    return {k: v for k, v in json.loads(PINS_FILE.read_text()).items() if not k.startswith("_")}


def cache_root() -> Path:
    env = os.environ.get("FACEMEND_OFFICIAL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "facemend" / "official"


def checkout_dir(name: str, root: Path | None = None) -> Path:
    pin = pins()[name]
    return (root or cache_root()) / f"{name.replace('/', '+')}@{pin['commit']}"


def is_fetched(name: str, root: Path | None = None) -> bool:
    marker = checkout_dir(name, root) / MARKER
    return marker.is_file() and marker.read_text().strip() == pins()[name]["commit"]


def _git(*args: str, git_dir: Path | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = ["git"] + (["--git-dir", str(git_dir)] if git_dir else []) + list(args)
    return subprocess.run(cmd, capture_output=True, **kw)


def _git_dir_of(path: Path) -> Path | None:
    """The git directory of a clone (path/.git) or a bare repository (path itself), else None."""
    if (path / ".git").is_dir():
        return path / ".git"
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        return path
    return None


def _candidates(name: str, src: Path) -> list[Path]:
    owner_name, short = name.replace("/", "+"), name.split("/")[1]
    return [src, src / owner_name / "repo", src / owner_name, src / short]


def _has_commit(git_dir: Path, commit: str) -> bool:
    return _git("cat-file", "-e", f"{commit}^{{commit}}", git_dir=git_dir).returncode == 0


def _export(git_dir: Path, commit: str, dest: Path) -> list[str]:
    """Write the tree of `commit` into dest; return the paths whose blobs the repository lacks."""
    listing = _git("ls-tree", "-r", "-z", commit, git_dir=git_dir, check=True).stdout.split(b"\0")
    entries = []
    for row in filter(None, listing):
        meta, path = row.split(b"\t", 1)
        mode, kind, sha = meta.split()
        if kind == b"blob":
            entries.append((mode.decode(), sha.decode(), path.decode()))
    proc = subprocess.Popen(["git", "--git-dir", str(git_dir), "cat-file", "--batch"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    missing = []
    for mode, sha, path in entries:
        proc.stdin.write(sha.encode() + b"\n")
        proc.stdin.flush()
        header = proc.stdout.readline().split()
        if len(header) < 3 or header[1] == b"missing":
            missing.append(path)
            continue
        data = proc.stdout.read(int(header[2]))
        proc.stdout.read(1)  # the newline after each object
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if mode == "120000":  # a symlink: its blob is the link target
            os.symlink(data.decode(), target)
        else:
            target.write_bytes(data)
            if mode == "100755":
                target.chmod(0o755)
    proc.stdin.close()
    proc.wait()
    return missing


def fetch(name: str, sources: list[Path], root: Path | None = None) -> str:
    pin = pins()[name]
    dest = checkout_dir(name, root)
    if is_fetched(name, root):
        return f"{name}: already at {dest}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    git_dir, tmp_git = None, None
    for src in sources:
        for cand in _candidates(name, src.expanduser()):
            gd = _git_dir_of(cand)
            if gd is not None and _has_commit(gd, pin["commit"]):
                git_dir = gd
                break
        if git_dir:
            break
    if git_dir is None:
        if sources:
            raise SystemExit(f"{name}: no clone holding commit {pin['commit'][:12]} under "
                             f"{', '.join(map(str, sources))}; clone {pin['url']} and pass it with --from")
        tmp_git = Path(tempfile.mkdtemp(prefix="facemend-fetch-"))
        _git("init", "-q", "--bare", str(tmp_git), check=True)
        r = _git("fetch", "-q", "--depth", "1", pin["url"], pin["commit"], git_dir=tmp_git)
        if r.returncode != 0:
            shutil.rmtree(tmp_git, ignore_errors=True)
            raise SystemExit(f"{name}: git fetch of {pin['url']} @ {pin['commit'][:12]} failed "
                             f"({r.stderr.decode().strip()}); clone it elsewhere and pass it with --from")
        git_dir = tmp_git
    part = Path(tempfile.mkdtemp(prefix=dest.name + ".part-", dir=dest.parent))
    try:
        missing = _export(git_dir, pin["commit"], part)
        (part / MARKER).write_text(pin["commit"] + "\n")
        if dest.exists():  # a stale or unmarked copy
            shutil.rmtree(dest)
        os.replace(part, dest)
    finally:
        shutil.rmtree(part, ignore_errors=True)
        if tmp_git:
            shutil.rmtree(tmp_git, ignore_errors=True)
    note = f" ({len(missing)} blobs absent from the source, left out: {', '.join(missing[:3])})" if missing else ""
    return f"{name}: fetched {pin['commit'][:12]} into {dest}{note}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="owner/name of the pins to fetch (default: all)")
    ap.add_argument("--from", dest="sources", action="append", type=Path, default=[],
                    help="a local clone, bare git directory or folder of them to copy from instead of the URL")
    ap.add_argument("--list", action="store_true", help="print each pin, its folder and whether it is fetched")
    args = ap.parse_args(argv)
    known = pins()
    unknown = [n for n in args.names if n not in known]
    if unknown:
        ap.error(f"not pinned: {', '.join(unknown)} (pinned: {', '.join(known)})")
    names = args.names or list(known)
    if args.list:
        for n in names:
            print(f"{'fetched' if is_fetched(n) else 'missing'}  {n} @ {known[n]['commit'][:12]}  {checkout_dir(n)}")
        return 0
    failed = 0
    for n in names:
        try:
            print(fetch(n, args.sources))
        except SystemExit as e:
            print(e, file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
