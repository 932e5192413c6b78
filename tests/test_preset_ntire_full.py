"""The `ntire_full` preset: the NTIRE 2025 AIIA chain with its per-image tuning (GFPGAN v1.3 -> TSD-SR scale 1 ->
IQA-guided tuning with CLIP-IQA + MANIQA losses and the ArcFace ID guard -> wavelet fix against GFPGAN -> paste),
built by the CLI/Python API from a models folder. GFPGAN and the metrics are cheap stand-ins here (their own
loading and equivalence are tested in test_restore_gfpgan.py and test_iqa_metrics.py)."""
import pytest
import torch

pytest.importorskip("diffusers")

from facemend import cli  # noqa: E402
from facemend.host import model_paths  # noqa: E402
from facemend.pipelines import presets  # noqa: E402

from conftest import load_image, need_shared  # noqa: E402


class _Blur:
    def __call__(self, faces, callback=None):
        self.out = torch.nn.functional.avg_pool2d(faces, 3, 1, 1, count_include_pad=False)
        return self.out


class _Metric:
    """A differentiable stand-in IQA metric in 0..1 (mean saturation), shaped like IQA_METRIC."""
    score_range = (0.0, 1.0)

    def __init__(self, name):
        self.name, self.calls = name, 0

    def score(self, x):
        self.calls += 1
        return (x.amax(1) - x.amin(1)).mean((1, 2))

    def as_loss(self, x):
        return 1 - self.score(x)


class _ID:
    def __init__(self):
        self.calls = 0

    def similarity(self, a, b):
        self.calls += 1
        return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))


@pytest.fixture
def stand_ins(monkeypatch):
    from facemend.ops import quality as iqa
    from facemend.pipelines.restore import restorer as restore

    torch.set_num_threads(1)
    made = {"restorer": _Blur(), "clipiqa": _Metric("clipiqa"), "maniqa": _Metric("maniqa"), "id": _ID(), "opened": []}
    monkeypatch.setattr(restore.FaceRestorer, "from_file",
                        classmethod(lambda cls, path, **kw: made["opened"].append(path) or made["restorer"]))
    monkeypatch.setattr(iqa, "open_metric", lambda name, *a, **k: made[name])
    monkeypatch.setattr(iqa, "open_id_model", lambda model: made["opened"].append(model) or made["id"])
    return made


def test_ntire_full_chains_gfpgan13_tsdsr_tuning_and_the_fix_against_gfpgan(tmp_path, monkeypatch, stand_ins):
    from onestep_models import make_tsdsr

    photo = need_shared("faces", "clean", "ffhq_00000000.png")
    make_tsdsr(str(tmp_path), base_name="stable-diffusion-3-medium-diffusers")
    (tmp_path / "facerestore_models").mkdir()
    (tmp_path / "facerestore_models" / "GFPGANv1.3.pth").write_bytes(b"stand-in")
    calls = []
    real_fix = presets.color_fix
    monkeypatch.setattr(presets, "color_fix",
                        lambda target, ref, method: calls.append((target, ref, method)) or real_fix(target, ref, method))
    monkeypatch.setattr(cli, "_ntire_tune_stage", _few_steps(cli._ntire_tune_stage))
    model_paths.set_models_dirs([str(tmp_path)])
    try:
        pipe = cli.build_pipeline("ntire_full", device="cpu", precision="fp32")
    finally:
        model_paths.set_models_dirs([])
    assert stand_ins["opened"][0].endswith("GFPGANv1.3.pth")  # the factsheet's GFPGAN version
    assert stand_ins["opened"][1] == "models/buffalo_l/w600k_r50.onnx"
    assert [name for name, _ in pipe.face_stages] == ["restore", "onestep_sr", "ntire_tune"]
    image = load_image(photo)
    image = torch.nn.functional.interpolate(image, size=(256, 256), mode="bicubic", antialias=True).clamp(0, 1)
    out, report = pipe(image)
    assert out.shape == image.shape and sum(report["faces"]) == 1
    assert stand_ins["clipiqa"].calls and stand_ins["maniqa"].calls and stand_ins["id"].calls
    target, reference, method = calls[-1]
    assert method == "wavelet" and reference is stand_ins["restorer"].out  # colour from GFPGAN, as in `ntire`
    assert target.shape == (1, 3, 512, 512)


def _few_steps(real):
    return lambda seed=0, steps=0, progress=None: real(seed, steps=2, progress=progress, width=8, depth=2,
                                                       crop_size=32, batch_size=2, validation_interval=1)


def test_ntire_full_names_its_missing_metric_files(tmp_path, monkeypatch):
    from facemend.pipelines.io.errors import ModelFileNotFound

    model_paths.set_models_dirs([str(tmp_path)])
    try:
        with pytest.raises(ModelFileNotFound) as err:
            cli._ntire_tune_stage()
    finally:
        model_paths.set_models_dirs([])
    assert "RN50.pt" in str(err.value) and "facemend_iqa" in str(err.value)


def test_presets_list_ntire_full_apart_from_ntire(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "ntire_full: the full NTIRE 2025 AIIA chain" in out and "GFPGAN v1.3" in out
    assert "ntire: the NTIRE 2025 AIIA chain" in out
