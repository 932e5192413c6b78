"""The `ntire` preset: detect -> GFPGAN -> TSD-SR (scale 1) -> wavelet colour fix against the GFPGAN output ->
paste-back, built by the CLI/Python API from a models folder (tiny random TSD-SR; GFPGAN replaced by a cheap
stand-in so the test stays fast: its own equivalence is tested in test_restore_gfpgan.py)."""
import pytest
import torch

pytest.importorskip("diffusers")

from facemend import cli  # noqa: E402
from facemend.host import model_paths  # noqa: E402
from facemend.pipelines import presets  # noqa: E402

from conftest import load_image, need_shared  # noqa: E402

torch.set_num_threads(1)


class StandInRestorer:
    """Deterministic same-size face stage standing in for GFPGAN (a 3x3 box blur)."""

    def __call__(self, faces, callback=None):
        self.out = torch.nn.functional.avg_pool2d(faces, 3, 1, 1, count_include_pad=False)
        if callback is not None:  # FaceRestorer's progress hook: faces done
            callback(faces.shape[0])
        return self.out


def test_ntire_preset_chains_gfpgan_tsdsr_and_the_wavelet_fix_against_gfpgan(tmp_path, monkeypatch):
    from onestep_models import make_tsdsr
    from facemend.pipelines.restore import restorer as restore

    photo = need_shared("faces", "clean", "ffhq_00000000.png")
    make_tsdsr(str(tmp_path), base_name="stable-diffusion-3-medium-diffusers")
    (tmp_path / "facerestore_models").mkdir()
    (tmp_path / "facerestore_models" / "GFPGANv1.4.pth").write_bytes(b"stand-in")
    stand_in = StandInRestorer()
    opened = []
    monkeypatch.setattr(restore.FaceRestorer, "from_file",
                        classmethod(lambda cls, path, **kw: opened.append(path) or stand_in))
    calls = []
    real_fix = presets.color_fix
    monkeypatch.setattr(presets, "color_fix",
                        lambda target, ref, method: calls.append((target, ref, method)) or real_fix(target, ref, method))
    model_paths.set_models_dirs([str(tmp_path)])
    try:
        pipe = cli.build_pipeline("ntire", device="cpu", precision="fp32")
    finally:
        model_paths.set_models_dirs([])
    assert opened[0].endswith("GFPGANv1.4.pth")
    assert [name for name, _ in pipe.face_stages] == ["restore", "onestep_sr"]
    image = load_image(photo)
    image = torch.nn.functional.interpolate(image, size=(256, 256), mode="bicubic", antialias=True).clamp(0, 1)
    out, report = pipe(image)
    assert out.shape == image.shape and sum(report["faces"]) == 1
    assert {"restore", "onestep_sr", "color_fix", "paste"} <= set(report["timings_s"])
    target, reference, method = calls[-1]
    assert method == "wavelet" and reference is stand_in.out  # colour from the GFPGAN output, not the input crop
    assert target.shape == reference.shape == (1, 3, 512, 512)  # TSD-SR at scale 1 on the 512 crops
    assert (target - reference).abs().mean() > 1e-3  # the diffusion stage did change the faces


def test_ntire_preset_missing_tsdsr_files_are_listed(tmp_path, monkeypatch):
    from facemend.pipelines.restore import restorer as restore
    from facemend.pipelines.io.errors import ModelFileNotFound

    (tmp_path / "facerestore_models").mkdir()
    (tmp_path / "facerestore_models" / "GFPGANv1.4.pth").write_bytes(b"stand-in")
    monkeypatch.setattr(restore.FaceRestorer, "from_file", classmethod(lambda cls, path, **kw: StandInRestorer()))
    model_paths.set_models_dirs([str(tmp_path)])
    try:
        with pytest.raises(ModelFileNotFound) as err:
            cli.build_pipeline("ntire", device="cpu")
    finally:
        model_paths.set_models_dirs([])
    msg = str(err.value)
    assert str(tmp_path / "diffusers" / "stable-diffusion-3-medium-diffusers" / "vae" / "config.json") in msg
    assert str(tmp_path / "onestep_sr" / "tsdsr" / "prompt_embeds.pt") in msg


def test_cli_lists_the_ntire_preset(capsys):
    assert cli.main(["presets"]) == 0
    assert "ntire: the NTIRE 2025 AIIA chain" in capsys.readouterr().out
