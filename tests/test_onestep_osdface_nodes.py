"""OSDFace through the nodes (OSDFace loader and the one-step loader's 'osdface' backend -> ONESTEP_SR -> the
One-Step SR node; what they compute, ops/diffusion.py) and the `osdface` preset of the CLI, with tiny random files
in a ComfyUI-style models folder: batched faces, progress with live previews, interruption, out-of-memory halving,
missing-file errors; the V3 loader's validation and fingerprint (with ComfyUI's node API; skipped without it)."""
import os

import pytest
import torch

pytest.importorskip("diffusers")

from facemend import cli  # noqa: E402
from facemend.host import device as dev  # noqa: E402
from facemend.host import model_paths  # noqa: E402
from facemend.ops import diffusion as op  # noqa: E402
from facemend.pipelines import presets  # noqa: E402
from facemend.pipelines.io.errors import Interrupted, ModelFileNotFound  # noqa: E402

from conftest import load_image, need_shared, node_class  # noqa: E402

load_osdface = op.OPS["FaceMend_OSDFaceLoader"]
load_onestep = op.OPS["FaceMend_OneStepSRLoader"]
one_step_sr = op.OPS["FaceMend_OneStepSR"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from osdface_models import make_osdface

    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("models"))
    make_osdface(root, base_name="stable-diffusion-2-1-base")
    model_paths.set_models_dirs([root])
    yield root
    model_paths.set_models_dirs([])


def _faces(n=3, size=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 16, 16, generator=g)
    x = torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return x.permute(0, 2, 3, 1).contiguous()  # IMAGE [B,H,W,C]


def test_loader_and_sr_node_batch_faces_with_progress(models_dir, monkeypatch):
    assert "osdface" in op.osdface_folder_choices() and "stable-diffusion-2-1-base" in op.osdface_base_choices()
    model = load_osdface(base_model="stable-diffusion-2-1-base", osdface_folder="osdface", precision="fp32")[0]
    # the one-step loader's backend choice gives the same (cached) model with the default options
    same = load_onestep(backend="osdface", base_model="stable-diffusion-2-1-base", lora="osdface",
                        precision="fp32")[0]
    assert same is model
    reports = []  # what ComfyUI's execution API receives when hosted: (value, total, preview image or None)
    monkeypatch.setattr(dev, "is_hosted", lambda: True)
    monkeypatch.setattr(dev, "_reporter", lambda value, total, image: reports.append((value, total, image)))
    faces = _faces(3)
    out = one_step_sr(image=faces, sr_model=model, scale=1, seed=5, max_batch=2)[0]
    assert out.shape == faces.shape and 0 <= out.min() and out.max() <= 1
    assert reports[-1][:2] == (6, 6)  # 2 groups x (tokens + encode, UNet, decode)
    # The first group's restored faces were shown live: its first face, exactly as the output has it.
    shown = [img for _, _, img in reports if img is not None]
    assert shown and torch.equal(shown[0][0], out[0].cpu())
    again = one_step_sr(image=faces, sr_model=model, scale=1, seed=5, max_batch=2)[0]
    assert torch.equal(again, out)  # seeded
    small = one_step_sr(image=_faces(1, size=128), sr_model=model, scale=2, seed=0)[0]
    assert small.shape == (1, 256, 256, 3)  # resized to 512 for the model, back to 128 x 2


def test_sr_node_interrupts_and_halves_the_batch_on_oom(models_dir, monkeypatch):
    model = load_osdface(base_model="stable-diffusion-2-1-base", osdface_folder="osdface", precision="fp32")[0]
    faces = _faces(2)
    calls = []
    real_step = type(model).step

    def step(self, lq, noise, hook=None):
        calls.append(lq.shape[0])
        if lq.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, lq, noise, hook)

    monkeypatch.setattr(type(model), "step", step)
    out = one_step_sr(image=faces, sr_model=model, scale=1, seed=0, max_batch=4)[0]
    assert out.shape == faces.shape and calls == [2, 2, 1, 1]  # max_batch 4 -> 2 (both faces still) -> 1
    monkeypatch.setattr(type(model), "step", real_step)
    monkeypatch.setattr(dev, "check_interrupt", lambda: (_ for _ in ()).throw(Interrupted("stop")))
    with pytest.raises(Interrupted):
        one_step_sr(image=faces, sr_model=model, scale=1, seed=0)


def test_missing_files_are_listed_with_their_folders(models_dir, tmp_path):
    model_paths.set_models_dirs([str(tmp_path)])
    try:
        with pytest.raises(ModelFileNotFound) as err:
            load_osdface(base_model="stable-diffusion-2-1-base", osdface_folder="osdface", precision="fp32")
    finally:
        model_paths.set_models_dirs([models_dir])
    msg = str(err.value)
    for f in ("pytorch_lora_weights.safetensors", "embedding_change_weights.pth", "associate_2.ckpt"):
        assert str(tmp_path / "onestep_sr" / "osdface" / f) in msg
    assert str(tmp_path / "diffusers" / "stable-diffusion-2-1-base" / "unet" / "config.json") in msg
    assert "never downloads" in msg


def test_osdface_loader_node_validates_its_files_and_fingerprints_its_folder(models_dir):
    loader = node_class("FaceMend_OSDFaceLoader")
    args = dict(base_model="stable-diffusion-2-1-base", osdface_folder="osdface", precision="fp32",
                lora_mode="merged", tokens="embedding change", latent="sample")
    assert loader.validate_inputs(**args) is True
    before = loader.fingerprint_inputs(**args)
    emb = os.path.join(models_dir, "onestep_sr", "osdface", "embedding_change_weights.pth")
    os.rename(emb, emb + ".away")
    try:
        msg = loader.validate_inputs(**args)  # the released weights need it: named before the run, with its place
        assert "OSDFace: model files are missing" in msg and f"  - {emb}\n" in msg
        assert os.path.join(os.path.dirname(emb), "associate_2.ckpt") not in msg  # only what is missing is listed
        assert loader.validate_inputs(**{**args, "tokens": "concat"}) is True  # the concat variants do not
        assert loader.fingerprint_inputs(**args) != before
    finally:
        os.rename(emb + ".away", emb)
    assert loader.fingerprint_inputs(**args) == before  # the same files again: the loaded model is kept
    assert "Value not in list: lora_mode: 'lora'" in loader.validate_inputs(**{**args, "lora_mode": "lora"})


def test_osdface_preset_detects_restores_colour_fixes_and_pastes(models_dir, monkeypatch):
    photo = need_shared("faces", "clean", "ffhq_00000000.png")
    calls = []
    real_fix = presets.color_fix
    monkeypatch.setattr(presets, "color_fix", lambda target, ref, method: calls.append((target, ref, method))
                        or real_fix(target, ref, method))
    model_paths.set_models_dirs([models_dir])  # (another test may have pointed them elsewhere)
    pipe = cli.build_pipeline("osdface", device="cpu", precision="fp32")
    assert [name for name, _ in pipe.face_stages] == ["osdface"]
    image = load_image(photo)
    image = torch.nn.functional.interpolate(image, size=(256, 256), mode="bicubic", antialias=True).clamp(0, 1)
    out, report = pipe(image)
    assert out.shape == image.shape and sum(report["faces"]) == 1
    assert {"osdface", "color_fix", "paste"} <= set(report["timings_s"])
    target, reference, method = calls[-1]
    assert method == "wavelet" and target.shape == reference.shape == (1, 3, 512, 512)
    assert (target - reference).abs().mean() > 1e-3  # OSDFace changed the faces


def test_cli_lists_the_osdface_preset(capsys):
    assert cli.main(["presets"]) == 0
    assert "osdface: OSDFace, the one-step face diffusion prior" in capsys.readouterr().out
