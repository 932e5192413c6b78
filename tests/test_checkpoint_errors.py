"""Broken model files (issue 11 items 4 and 5): empty, truncated or foreign .pth / .safetensors files give an
error that names the file and says what to do, from the loader, the node and the CLI."""
import pytest
import torch
from PIL import Image

from facemend.cli import main
from facemend.host import model_paths
from facemend.pipelines.io.checkpoints import load_weights
from facemend.pipelines.io.errors import ModelFileInvalid


def _safetensors_bytes(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(path))
    return path.read_bytes()


def _broken_files(tmp_path):
    good = _safetensors_bytes(tmp_path)
    pth = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(4096)}, pth)
    return {
        "empty.pth": b"",
        "empty.safetensors": b"",
        "truncated.safetensors": good[: len(good) // 2],   # header intact, data cut off
        "cut_header.safetensors": good[:20],
        "junk.safetensors": b"\xff" * 64,
        "truncated.pth": pth.read_bytes()[:300],
    }


def test_broken_files_raise_an_error_naming_the_file(tmp_path):
    for name, data in _broken_files(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ModelFileInvalid) as info:
            load_weights(str(path))
        msg = str(info.value)
        assert str(path) in msg, msg
        assert ("empty (0 bytes)" in msg) if not data else ("corrupt, truncated" in msg), msg


def test_node_and_cli_name_the_broken_file(tmp_path, capsys):
    from facemend.ops.restore import load_restorer

    models = tmp_path / "models"
    (models / "facerestore_models").mkdir(parents=True)
    files = _broken_files(tmp_path)
    photo = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (90, 120, 150)).save(photo)
    model_paths.set_models_dirs([str(models)])
    try:
        for name in ("empty.pth", "empty.safetensors", "truncated.safetensors"):
            (models / "facerestore_models" / name).write_bytes(files[name])
            with pytest.raises(ModelFileInvalid, match=name):
                load_restorer(name, "fp32")
            code = main(["--device", "cpu", "restore", str(photo), "-o", str(tmp_path / "out"), "--preset", "fast",
                         "--restorer", name, "--no-progress"])
            err = capsys.readouterr().err
            assert code == 2 and name in err and "Traceback" not in err, err
    finally:
        model_paths.set_models_dirs([])
