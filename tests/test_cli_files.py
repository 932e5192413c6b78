"""The CLI with a phone's photos and a shared output folder (issue 21): HEIC/HEIF/AVIF read with their rotation,
folders' other files and subfolders reported, --recursive mirrors the tree, one run per output folder, an output
that appears during the run is never replaced, --report written atomically, seed 0, plain progress lines in a log.
Tiny images and the demo preset with two tuning steps keep each case to about a second."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from facemend import cli
from facemend.cli import main
from facemend.pipelines.io.errors import InvalidImage
from facemend.pipelines.io.images import read_image

FAST = ["--device", "cpu", "--tune-steps", "2", "--no-progress"]


def _gray(path, size=(40, 30), value=120):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _rotated_photo(path):
    """40x20, left half blue, EXIF orientation 6 (rotate 90 clockwise to view): upright it is 20x40, blue on top."""
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif.tobytes(), quality=95)
    return path


def _no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a pipeline was built before the output folder was claimed")
    monkeypatch.setattr(cli, "build_pipeline", refuse)


# 9: HEIC (pillow-heif) and AVIF (Pillow) photos are read upright; without the plugin the extra is named.
@pytest.mark.parametrize("ext", [".heic", ".avif"])
def test_phone_photos_are_read_upright(tmp_path, ext):
    src = tmp_path / f"phone{ext}"
    if ext == ".heic":  # written in another process: reading must not rely on a plugin registered by the writer
        pytest.importorskip("pillow_heif")
        code = ("import pillow_heif; from PIL import Image; pillow_heif.register_heif_opener(); "
                "im = Image.new('RGB', (40, 20), (255, 0, 0)); im.paste((0, 0, 255), (0, 0, 20, 20)); "
                "exif = Image.Exif(); exif[0x0112] = 6; "
                f"im.save({str(src)!r}, exif=exif.tobytes(), quality=95)")  # as _rotated_photo
        subprocess.run([sys.executable, "-c", code], check=True)
    else:
        _rotated_photo(src)
    image, alpha = read_image(str(src))
    assert image.shape == (1, 3, 40, 20) and alpha is None
    top, bottom = image[0, :, 5, 10], image[0, :, 35, 10]
    assert top[2] > 0.9 and top[0] < 0.1 and bottom[0] > 0.9 and bottom[2] < 0.1


def test_heic_without_the_plugin_names_the_extra(tmp_path, monkeypatch, capsys):
    photo = tmp_path / "IMG_0001.HEIC"
    photo.write_bytes(b"\x00\x00\x00\x18ftypheic")
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # not installed
    with pytest.raises(InvalidImage, match=r"facemend\[heif\]"):
        read_image(str(photo))
    assert main(["restore", str(photo), "-o", str(tmp_path / "out"), *FAST]) == 1
    err = capsys.readouterr().err
    assert "IMG_0001.HEIC" in err and "pip install 'facemend[heif]'" in err


# 10: a folder's other files and subfolders are listed; --recursive restores the tree into the same tree.
def test_folder_reports_skipped_files_and_subfolders_and_recursive_mirrors(tmp_path, capsys):
    pytest.importorskip("pillow_heif").register_heif_opener()
    photos = tmp_path / "photos"
    _rotated_photo(photos / "IMG_1.heic") if photos.mkdir() is None else None
    (photos / "notes.txt").write_text("x")
    (photos / "clip.mov").write_bytes(b"x")
    _gray(photos / "2021" / "a.png", value=60)
    _gray(photos / "2021" / "deep" / "a.png", value=200)
    out = tmp_path / "out"
    assert main(["restore", str(photos), "-o", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    assert os.listdir(out) == ["IMG_1.png"] and Image.open(out / "IMG_1.png").size == (40, 80)
    text = captured.out + captured.err
    assert "skipped 2 file(s) that are not images" in text and "notes.txt" in text and "clip.mov" in text
    assert "1 subfolder(s) not read" in text and str(photos / "2021") in text and "--recursive" in text
    out2 = tmp_path / "out2"
    assert main(["restore", str(photos), "-o", str(out2), "--recursive", *FAST]) == 0
    got = sorted(os.path.relpath(os.path.join(r, f), out2) for r, _, fs in os.walk(out2) for f in fs)
    assert got == ["2021/a.png", "2021/deep/a.png", "IMG_1.png"]
    mean = {k: np.asarray(Image.open(out2 / k).convert("L")).mean() for k in got[:2]}
    assert abs(mean["2021/a.png"] - 60) < 3 and abs(mean["2021/deep/a.png"] - 200) < 3
    # Photos only in subfolders: the error says so instead of a bare "no images found".
    only_sub = tmp_path / "only_sub"
    _gray(only_sub / "2022" / "b.png")
    assert main(["restore", str(only_sub), "-o", str(tmp_path / "out3"), *FAST]) == 2
    assert "pass --recursive" in capsys.readouterr().err


# 11: one run per output folder: a second is refused before any work, naming the first; a stale claim is taken.
def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys, monkeypatch):
    from facemend.output_plan import LOCK_NAME, claim_output_dir

    src = _gray(tmp_path / "a.png")
    out = tmp_path / "out"
    with claim_output_dir(str(out), "python -m facemend restore first/"):
        with monkeypatch.context() as m:
            _no_model_loading(m)
            assert main(["restore", str(src), "-o", str(out), *FAST]) == 2
        err = capsys.readouterr().err
        assert "another FaceMend run is writing into" in err and f"process {os.getpid()}" in err
        assert "restore first/" in err and LOCK_NAME in err
    assert os.listdir(out) == []
    # The claim of a run that died (its process is gone) does not block the folder forever.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert main(["restore", str(src), "-o", str(out), *FAST]) == 0
    assert os.listdir(out) == ["a.png"]  # restored, and the claim released


# 11: an output that appears while the run works (another program) is kept; the run says so.
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path, monkeypatch, capsys, policy):
    src = _gray(tmp_path / "a.png")
    out = tmp_path / "out"
    real_build = cli.build_pipeline

    def build(*a, **k):
        pipe = real_build(*a, **k)

        def run(image):
            (out / "a.png").write_bytes(b"theirs")  # written by someone else after the existing-output check
            return pipe(image)
        return run

    monkeypatch.setattr(cli, "build_pipeline", build)
    args = ["restore", str(src), "-o", str(out), "--report", str(tmp_path / "r.json"), *FAST]
    code = main(args + (["--skip-existing"] if policy == "skip" else []))
    assert (out / "a.png").read_bytes() == b"theirs" and sorted(os.listdir(out)) == ["a.png"]
    report = json.loads((tmp_path / "r.json").read_text())[0]
    if policy == "skip":
        assert code == 0 and report["skipped"]
    else:
        assert code == 1 and "appeared while this run was working" in report["error"]


# 12: --report never half-written; seed 0 reaches the pipeline.
def test_report_is_written_atomically(tmp_path, monkeypatch, capsys):
    src = _gray(tmp_path / "a.png")
    report = tmp_path / "r.json"
    report.write_text('["the previous report"]')

    real_dump = json.dump

    def disk_full(obj, f, **kw):
        if not isinstance(obj, list):  # the output folder's claim
            return real_dump(obj, f, **kw)
        f.write('[{"input": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full)
    code = main(["restore", str(src), "-o", str(tmp_path / "out"), "--report", str(report), *FAST])
    assert code == 2 and "cannot write the report" in capsys.readouterr().err
    assert report.read_text() == '["the previous report"]'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_seed_zero_is_a_seed(monkeypatch):
    seen = []

    def stage(*args):
        seen.append(args[-1])
        return lambda faces: faces

    monkeypatch.setattr(cli, "_identity_stage", stage)
    cli.build_pipeline("id_preserve", device="cpu", seed=0)
    cli.build_pipeline("id_preserve", device="cpu")
    cli.build_pipeline("id_preserve", device="cpu", seed=7)
    assert seen == [0, 42, 7]


# 13: progress into a log (stderr not a terminal): one plain line per image, long stages at most every few seconds.
def test_progress_in_a_log_is_plain_lines(tmp_path, capsys):
    for n in "ab":
        _gray(tmp_path / "in" / f"{n}.png")
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--device", "cpu",
                 "--tune-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err and "%|" not in err
    assert [line.split(" (")[0] for line in err.splitlines() if line.startswith("images:")] == \
        ["images: 1/2 done", "images: 2/2 done"]
    from facemend.cli_progress import CLIProgress

    log = io.StringIO()
    bars = CLIProgress(1, file=log, log_every=3600)
    bars.stage("ZSSR steps", 500)
    for _ in range(500):
        bars(1)
    bars.image_done()
    bars.close()
    assert log.getvalue().count("\n") == 1  # 500 steps, one line
    log = io.StringIO()
    bars = CLIProgress(1, file=log, log_every=0)
    bars.stage("ZSSR steps", 3)
    for _ in range(3):
        bars(1)
    assert log.getvalue().splitlines()[-1].startswith("  ZSSR steps: 3/3")
