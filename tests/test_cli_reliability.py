"""The CLI as a hostile user drives it (issue 11): nothing lost, nothing cryptic. Tiny images and the demo
preset with a few tuning steps keep each case to about a second."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from facemend import cli
from facemend.cli import main
from facemend.host import model_paths

from conftest import need_shared

FAST = ["--tune-steps", "2"]


def _gray(path, size=(40, 30), value=120):
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _no_model_loading(monkeypatch):
    """Make loading any pipeline fail loudly: the checks under test must come before it."""
    def refuse(*a, **k):
        raise AssertionError("a pipeline was built before the output location was checked")
    monkeypatch.setattr(cli, "build_pipeline", refuse)


# 1: demo (x2) on images with transparency: the alpha is scaled with the picture and kept.
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_demo_keeps_transparency_at_twice_the_size(tmp_path, mode):
    rgba = Image.new("RGBA", (40, 30), (200, 100, 50, 255))
    rgba.paste((200, 100, 50, 0), (0, 0, 20, 30))  # left half transparent
    src = tmp_path / "in" / f"t_{mode}.png"
    src.parent.mkdir()
    if mode == "P":  # palette + tRNS: index 0 is transparent
        img = Image.new("P", (40, 30), 1)
        img.putpalette([200, 100, 50, 200, 100, 50] + [0] * 762)
        img.paste(0, (0, 0, 20, 30))
        img.save(src, transparency=0)
    else:
        rgba.convert(mode).save(src)
    out = tmp_path / "out"
    assert main(["--device", "cpu", "restore", str(src), "-o", str(out), *FAST]) == 0
    result = Image.open(out / f"t_{mode}.png")
    assert result.size == (80, 60) and result.mode == "RGBA"
    alpha = np.asarray(result.getchannel("A"))
    assert alpha[:, :36].max() == 0 and alpha[:, 44:].min() == 255  # the transparent half stays transparent


# 2: -o equal to the input folder (or naming an input's own output) never replaces an input.
def test_output_folder_equal_to_the_input_folder_is_refused(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    a = _gray(folder / "a.png")
    before = a.read_bytes()
    _no_model_loading(monkeypatch)
    assert main(["--device", "cpu", "restore", str(folder), "-o", str(folder), *FAST]) == 2
    assert "input folder" in capsys.readouterr().err
    # A file input whose output (photos/a.png) would be the input itself.
    assert main(["--device", "cpu", "restore", str(a), "-o", str(folder), *FAST]) == 2
    assert "would replace an input" in capsys.readouterr().err
    assert a.read_bytes() == before and sorted(os.listdir(folder)) == ["a.png"]


# 3: inputs sharing a stem get distinct outputs.
def test_inputs_with_the_same_stem_get_distinct_outputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _gray(folder / "x.png", value=40)
    Image.new("RGB", (40, 30), (220, 220, 220)).save(folder / "x.jpg", quality=95)
    _gray(folder / "y.png")
    other = tmp_path / "other"
    other.mkdir()
    _gray(other / "y.png", value=90)
    out = tmp_path / "out"
    assert main(["--device", "cpu", "restore", str(folder), str(other / "y.png"), "-o", str(out), "--report",
                 str(tmp_path / "r.json"), *FAST]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    targets = [r["output"] for r in report]
    assert len(set(targets)) == 4 and sorted(os.listdir(out)) == sorted(os.path.basename(t) for t in targets)
    mean = {os.path.basename(r["input"]) + r["input"].split(os.sep)[-2]:
            np.asarray(Image.open(r["output"]).convert("L")).mean() for r in report}
    assert abs(mean["x.pngin"] - 40) < 2 and abs(mean["x.jpgin"] - 220) < 2  # each result is its own input's
    assert abs(mean["y.pngin"] - 120) < 2 and abs(mean["y.pngother"] - 90) < 2


# 6: an interrupted write leaves no file behind (the old temp name NAME.png.part.png was read as an input).
def test_interrupted_write_leaves_only_complete_files(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for n in "abc":
        _gray(folder / f"{n}.png")
    out = tmp_path / "out"
    calls = []
    real_save = Image.Image.save

    def save(self, fp, format=None, **params):
        calls.append(fp)
        if len(calls) == 2:  # the second output: half a PNG on disk, then Ctrl-C
            (fp.write if hasattr(fp, "write") else open(fp, "wb").write)(b"\x89PNG\r\n\x1a\n partial")
            raise KeyboardInterrupt
        return real_save(self, fp, format, **params)

    monkeypatch.setattr(Image.Image, "save", save)
    assert main(["--device", "cpu", "restore", str(folder), "-o", str(out), *FAST]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert os.listdir(out) == ["a.png"]  # complete; nothing else, hidden or not
    monkeypatch.setattr(Image.Image, "save", real_save)
    # A rerun over the output folder finds only real images, and --skip-existing resumes the interrupted run.
    assert main(["--device", "cpu", "restore", str(folder), "-o", str(out), "--skip-existing", *FAST]) == 0
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "c.png"]


# 7: existing outputs are refused by default (before any work), replaced or kept on request.
def test_existing_outputs_refused_overwritten_or_skipped(tmp_path, capsys, monkeypatch):
    src = _gray(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    old = _gray(out / "a.png", size=(7, 7), value=3).read_bytes()
    with monkeypatch.context() as m:
        _no_model_loading(m)
        assert main(["--device", "cpu", "restore", str(src), "-o", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "exist already" in err and "--overwrite" in err and "--skip-existing" in err
    assert (out / "a.png").read_bytes() == old
    assert main(["--device", "cpu", "restore", str(src), "-o", str(out), "--skip-existing", *FAST]) == 0
    assert (out / "a.png").read_bytes() == old and "skipped" in capsys.readouterr().out
    assert main(["--device", "cpu", "restore", str(src), "-o", str(out), "--overwrite", *FAST]) == 0
    assert Image.open(out / "a.png").size == (80, 60)


# 8: an output location that cannot take the results is refused before any model loads.
def test_unusable_output_location_is_refused_first(tmp_path, capsys, monkeypatch):
    src = _gray(tmp_path / "a.png")
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    _no_model_loading(monkeypatch)
    assert main(["--device", "cpu", "restore", str(src), "-o", str(a_file), *FAST]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["--device", "cpu", "restore", str(src), "-o", str(a_file / "sub"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "cannot write to the output folder" in err and str(a_file / "sub") in err
    assert a_file.read_text() == "not a folder"


def test_read_only_output_folder_is_refused_first(tmp_path, capsys, monkeypatch):
    if os.geteuid() == 0:
        # root writes through permissions: make the probe write fail as a read-only filesystem would.
        import tempfile

        def read_only(*a, **k):
            raise PermissionError(30, "Read-only file system")
        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    src = _gray(tmp_path / "a.png")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    _no_model_loading(monkeypatch)
    try:
        assert main(["--device", "cpu", "restore", str(src), "-o", str(ro), *FAST]) == 2
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err
    assert "cannot write to the output folder" in err and str(ro) in err


# 9: one unreadable or missing input is reported; the others are still restored; exit 1 with the list.
def test_bad_inputs_are_reported_and_the_run_goes_on(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    _gray(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    _gray(folder / "c.png")
    out = tmp_path / "out"
    missing = tmp_path / "gone.jpg"
    code = main(["--device", "cpu", "restore", str(missing), str(folder), "-o", str(out), "--report",
                 str(tmp_path / "r.json"), *FAST])
    assert code == 1
    assert sorted(os.listdir(out)) == ["a.png", "c.png"]
    err = capsys.readouterr().err
    assert "2 failed" in err and f"{folder / 'b.png'}: cannot read image" in err and str(missing) in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert sorted(os.path.basename(r["input"]) for r in report if "error" in r) == ["b.png", "gone.jpg"]


# 10: progress per image and per face batch; the node's face selection options.
def test_progress_bars_and_face_selection_options(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars are for a terminal (a log gets plain lines)
    photo = need_shared("faces", "clean", "t1_six_faces.jpg")
    small = tmp_path / "six.png"
    Image.open(photo).convert("RGB").resize((640, 443), Image.BICUBIC).save(small)
    out = tmp_path / "out"
    args = ["restore", str(small), "--device", "cpu", "--tune-steps", "2", "--report", str(tmp_path / "r.json")]
    assert main(args + ["-o", str(out), "--max-faces", "2"]) == 0
    err = capsys.readouterr().err
    assert "images: 100%" in err and "ZSSR x2 on 2 face(s)" in err  # tqdm bars on stderr
    assert json.loads((tmp_path / "r.json").read_text())[0]["faces"] == [2]
    assert main(args + ["-o", str(tmp_path / "o2"), "--min-face-size", "1000", "--no-progress"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())[0]["faces"] == [0]
    assert "images:" not in capsys.readouterr().err


def test_restore_progress_counts_faces(tmp_path):
    """The fast preset's bar advances once per restored face (the restorer's chunk callback)."""
    from facemend.pipelines.presets import FaceRestorePipeline

    events = []

    class Recorder:
        def stage(self, name, total):
            events.append((name, total))

        def __call__(self, n=1):
            events.append(n)

    pipe = cli.build_pipeline("demo", device="cpu", tune_steps=2, progress=Recorder())
    assert isinstance(pipe, FaceRestorePipeline)
    pipe.face_stages[0][1](torch.rand(3, 3, 40, 40))
    name, total = events[0]
    assert name.startswith("ZSSR x2 on 3 face(s)") and sum(events[1:]) == total > 0


# 13: model names are confined to the registered folders; explicit CLI paths stay allowed.
def test_model_names_cannot_leave_the_models_folders(tmp_path, monkeypatch):
    from facemend.pipelines.io.errors import ModelFileNotFound

    models = tmp_path / "models"
    (models / "facerestore_models" / "sub").mkdir(parents=True)
    (models / "facerestore_models" / "sub" / "ok.pth").write_bytes(b"x")
    outside = tmp_path / "secret.pth"
    outside.write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "linked.pth").write_bytes(b"x")
    (models / "facerestore_models" / "linked.pth").symlink_to(elsewhere / "linked.pth")
    model_paths.set_models_dirs([str(models)])
    try:
        assert model_paths.find_file("facerestore_models", "sub/ok.pth").endswith("sub/ok.pth")
        assert model_paths.find_file("facerestore_models", "linked.pth")  # users symlink big files in
        for name in ("../secret.pth", "../../secret.pth", str(outside), "sub/../../../secret.pth"):
            with pytest.raises(ModelFileNotFound, match="points outside"):
                model_paths.find_file("facerestore_models", name)
            with pytest.raises(ModelFileNotFound, match="points outside"):
                model_paths.find_dir("facerestore_models", name)
        from node_specs import node_op

        with pytest.raises(ModelFileNotFound, match="points outside"):
            node_op("FaceMend_RestorerLoader")("../secret.pth", "fp32")
        with pytest.raises(ModelFileNotFound, match="points outside"):
            node_op("FaceMend_DetectorLoader")(str(outside))
        from facemend.ops.diffusion import base_model_path

        (tmp_path / "sd3.safetensors").write_bytes(b"x")
        for name in (str(tmp_path / "sd3.safetensors"), "../../sd3.safetensors"):
            with pytest.raises(ModelFileNotFound, match="points outside"):
                base_model_path(name)
        # The CLI's explicit file paths are the user's own choice.
        assert cli.model_file("facerestore_models", str(outside)) == str(outside)
    finally:
        model_paths.set_models_dirs([])


# 14: the global options work after the sub-command too; every option of every sub-command has help.
def test_global_options_after_the_sub_command(tmp_path, capsys):
    src = _gray(tmp_path / "a.png")
    code = main(["restore", str(src), "-o", str(tmp_path / "out"), "--preset", "fast",
                 "--models-dir", str(tmp_path / "m1"), "--device", "cpu"])
    assert code == 2  # refused for the missing restorer, so the options were understood
    err = capsys.readouterr().err
    assert "GFPGANv1.4.pth" in err and str(tmp_path / "m1") in err
    # Before and after add up.
    assert main(["--models-dir", str(tmp_path / "m0"), "restore", str(src), "-o", str(tmp_path / "out"),
                 "--preset", "fast", "--models-dir", str(tmp_path / "m1")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "m0") in err and str(tmp_path / "m1") in err


def test_every_option_has_help():
    import argparse

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("", parser)] + list(subs.choices.items()):
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


# 11: the output size is bounded too, and an image over the bound is refused before any work.
def test_output_size_limit_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    from facemend.pipelines.io.errors import InvalidImage
    from facemend.pipelines.presets import MAX_OUTPUT_PIXELS

    assert MAX_OUTPUT_PIXELS < 16000 * 12000  # the 8000x6000 demo case (12.6 GB) is refused by default
    folder = tmp_path / "in"
    folder.mkdir()
    _gray(folder / "big.png", size=(400, 300))   # x2: 800x600 = 480000 px
    _gray(folder / "small.png", size=(40, 30))
    seen_at_build = []
    real_build = cli.build_pipeline

    def build(*a, **k):
        seen_at_build.append(capsys.readouterr().err)
        return real_build(*a, **k)

    monkeypatch.setattr(cli, "build_pipeline", build)
    out = tmp_path / "out"
    code = main(["--device", "cpu", "restore", str(folder), "-o", str(out), "--max-output-megapixels", "0.25", *FAST])
    assert code == 1 and os.listdir(out) == ["small.png"]
    assert "big.png: REFUSED" in seen_at_build[0] and "800x600" in seen_at_build[0]  # said before the models load
    assert "1 failed" in capsys.readouterr().err
    # The Python API holds the same bound, per call.
    pipe = real_build("demo", device="cpu", tune_steps=2, max_output_pixels=4 * 40 * 30 - 1)
    with pytest.raises(InvalidImage, match="output limit"):
        pipe(torch.rand(1, 3, 30, 40))
    assert pipe.upscale == 2 and pipe(torch.rand(1, 3, 29, 40))[0].shape == (1, 3, 58, 80)


# 16: the demo's before/after picture says which half is which.
def test_before_after_halves_are_labelled():
    from facemend.cli import DEMO_LABELS
    from facemend.pipelines.io.images import side_by_side

    g = torch.Generator().manual_seed(0)
    before, after = torch.rand(3, 240, 200, generator=g), torch.rand(3, 240, 200, generator=g)
    plain = side_by_side(before, after)
    labelled = side_by_side(before, after, labels=DEMO_LABELS)
    assert labelled.shape == plain.shape == (3, 240, 408)
    changed = (labelled - plain).abs().amax(0) > 1 / 255
    rows, cols = changed.nonzero(as_tuple=True)
    assert rows.max() < 40  # only a band at the top
    left, right = cols[cols < 200], cols[cols >= 208] - 208
    assert left.numel() > 500 and right.numel() > 500 and left.max() < 150 and right.max() < 150
    for x0 in (0, 208):  # white text on a black box
        box = labelled[:, :rows.max() + 1, x0:x0 + 40]
        assert (box == 0).all(0).float().mean() > 0.4 and (box > 0.8).all(0).sum() > 10
