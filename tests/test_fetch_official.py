"""tests/fetch_official.py, the script that brings the pinned official code into the cache, on a temporary local
git repository: the pinned commit (not the branch head) is exported with a marker, a second run changes nothing,
an interrupted copy never leaves a checkout the tests would use, and a clone without the commit is named."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

import fetch_official as fo
from official_code import official_dir

NAME = "someone/reference-code"


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A clone with two commits; the pin names the first. The pins file and the cache are temporary."""
    src = tmp_path / "clone"
    src.mkdir()
    _git(src, "init", "-q")
    _git(src, "config", "user.email", "t@example.org")
    _git(src, "config", "user.name", "t")
    (src / "models").mkdir()
    (src / "models" / "unet.py").write_text("VERSION = 1\n")
    (src / "run.sh").write_text("#!/bin/sh\necho pinned\n")
    (src / "run.sh").chmod(0o755)
    os.symlink("models/unet.py", src / "link.py")
    _git(src, "add", "-A")
    _git(src, "commit", "-q", "-m", "pinned")
    pinned = _git(src, "rev-parse", "HEAD")
    (src / "models" / "unet.py").write_text("VERSION = 2\n")
    (src / "later.py").write_text("")
    _git(src, "commit", "-q", "-am", "later")
    _git(src, "add", "later.py")
    _git(src, "commit", "-q", "-m", "later file")
    pins = tmp_path / "pins.json"
    pins.write_text(json.dumps({"_comment": "test", NAME: {"url": str(tmp_path / "no-such-remote"),
                                                            "commit": pinned}}))
    monkeypatch.setattr(fo, "PINS_FILE", pins)
    monkeypatch.setenv("FACEMEND_OFFICIAL_DIR", str(tmp_path / "cache"))
    return src, pinned


def test_the_pinned_commit_is_exported_with_its_marker_and_a_second_run_changes_nothing(repo, tmp_path):
    src, pinned = repo
    assert not fo.is_fetched(NAME)
    assert fo.main([NAME, "--from", str(src)]) == 0
    dest = fo.checkout_dir(NAME)
    assert dest == tmp_path / "cache" / f"someone+reference-code@{pinned}"
    assert (dest / "models" / "unet.py").read_text() == "VERSION = 1\n"      # the pin, not the branch head
    assert not (dest / "later.py").exists()
    assert os.access(dest / "run.sh", os.X_OK) and os.readlink(dest / "link.py") == "models/unet.py"
    assert (dest / fo.MARKER).read_text().strip() == pinned and fo.is_fetched(NAME)
    assert official_dir(NAME) == dest
    # A second run is a no-op: the same folder, untouched (a file added since stays).
    (dest / "local-note").write_text("x")
    before = sorted(p.name for p in tmp_path.joinpath("cache").iterdir())
    assert "already" in fo.fetch(NAME, [src])
    assert (dest / "local-note").exists() and sorted(p.name for p in tmp_path.joinpath("cache").iterdir()) == before
    # A folder of clones named <owner>+<name>/repo (the mirror layout) is found too.
    mirror = tmp_path / "mirrors" / "someone+reference-code"
    mirror.mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(mirror / "repo")], check=True)
    other = tmp_path / "cache2"
    assert "fetched" in fo.fetch(NAME, [tmp_path / "mirrors"], root=other)
    assert fo.is_fetched(NAME, other)


def test_an_interrupted_copy_leaves_no_usable_half_checkout(repo, tmp_path, monkeypatch):
    src, _ = repo
    real_export = fo._export

    def export_then_die(git_dir, commit, dest):
        real_export(git_dir, commit, dest)
        (dest / "models" / "unet.py").write_text("VER")     # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(fo, "_export", export_then_die)
    with pytest.raises(KeyboardInterrupt):
        fo.fetch(NAME, [src])
    cache = tmp_path / "cache"
    assert list(cache.iterdir()) == [] and not fo.is_fetched(NAME)        # nothing left, nothing counted
    with pytest.raises(pytest.skip.Exception, match=f"fetch_official.py {NAME}"):
        official_dir(NAME)
    # A copy killed before its rename (no marker, e.g. SIGKILL) is not used, and the next run replaces it.
    stale = fo.checkout_dir(NAME)
    (stale / "models").mkdir(parents=True)
    (stale / "models" / "unet.py").write_text("VER")
    assert not fo.is_fetched(NAME)
    monkeypatch.setattr(fo, "_export", real_export)
    fo.fetch(NAME, [src])
    assert fo.is_fetched(NAME) and (stale / "models" / "unet.py").read_text() == "VERSION = 1\n"


def test_a_clone_without_the_pinned_commit_is_named_with_what_to_do(repo, tmp_path, capsys):
    src, _ = repo
    pins = json.loads(fo.PINS_FILE.read_text())
    pins[NAME]["commit"] = "0123456789" * 4
    fo.PINS_FILE.write_text(json.dumps(pins))
    with pytest.raises(SystemExit, match=rf"no clone holding commit 012345678901 under {re.escape(str(src))}.*clone "
                                         rf"{re.escape(str(tmp_path / 'no-such-remote'))} and pass it with --from"):
        fo.fetch(NAME, [src])
    assert fo.main([NAME, "--from", str(src)]) == 1 and "no clone holding" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
