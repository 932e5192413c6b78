"""One-step SR nodes called the way ComfyUI calls them: loader -> ONESTEP_SR -> SR node, with tiny random models
in a ComfyUI-style models folder; progress over tiles, interruption, missing-file errors."""
import sys
import types

import pytest
import torch

pytest.importorskip("diffusers")

import facemend  # noqa: E402
from facemend.host import device as dev  # noqa: E402
from facemend.host import model_paths  # noqa: E402
from facemend.pipelines.io.errors import Interrupted, ModelFileNotFound  # noqa: E402

torch.set_num_threads(1)


def _node(node_id):
    return facemend.NODE_CLASS_MAPPINGS[node_id]()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from onestep_models import make_osediff, make_tsdsr

    root = str(tmp_path_factory.mktemp("models"))
    make_tsdsr(root)
    make_osediff(root)
    model_paths.set_models_dirs([root])
    yield root
    model_paths.set_models_dirs([])


def test_loader_lists_folders_and_the_sr_node_upscales(models_dir, monkeypatch):
    spec = facemend.NODE_CLASS_MAPPINGS["FaceMend_OneStepSRLoader"].INPUT_TYPES()["required"]
    assert "sd3-tiny" in spec["base_model"][0] and "tsdsr" in spec["lora"][0] and "osediff.pkl" in spec["lora"][0]
    model = _node("FaceMend_OneStepSRLoader").load("tsdsr", "sd3-tiny", "tsdsr", "fp32")[0]
    assert _node("FaceMend_OneStepSRLoader").load("tsdsr", "sd3-tiny", "tsdsr", "fp32")[0] is model  # cached

    updates = []

    class Bar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            updates.append((value, total))

    monkeypatch.setitem(sys.modules, "comfy.utils", types.SimpleNamespace(ProgressBar=Bar))
    image = torch.rand(2, 48, 40, 3)  # IMAGE [B,H,W,C]
    out = _node("FaceMend_OneStepSR").run(image, model, scale=4, tile_size=128, tile_overlap=32, seed=3,
                                          vae_tile_size=256)[0]
    assert out.shape == (2, 192, 160, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert 0 <= out.min() and out.max() <= 1
    total = updates[-1][1]
    assert updates[-1][0] == total > 3  # encoder, denoiser and decoder tiles all reported
    again = _node("FaceMend_OneStepSR").run(image, model, scale=4, tile_size=128, tile_overlap=32, seed=3,
                                            vae_tile_size=256)[0]
    assert torch.equal(out, again)


def test_osediff_through_the_nodes(models_dir):
    model = _node("FaceMend_OneStepSRLoader").load("osediff", "sd21-tiny", "osediff.pkl", "fp32", "face")[0]
    out = _node("FaceMend_OneStepSR").run(torch.rand(1, 40, 56, 3), model, scale=2, tile_size=0, tile_overlap=-1,
                                          seed=0)[0]
    assert out.shape == (1, 80, 112, 3)


def test_interrupt_stops_between_tiles(models_dir):
    model = _node("FaceMend_OneStepSRLoader").load("tsdsr", "sd3-tiny", "tsdsr", "fp32")[0]
    dev.request_interrupt()
    try:
        with pytest.raises(Interrupted):
            _node("FaceMend_OneStepSR").run(torch.rand(1, 32, 32, 3), model, scale=1, tile_size=0, tile_overlap=-1,
                                            seed=0)
    finally:
        dev.clear_interrupt()


def test_missing_models_name_every_file_and_its_folder(tmp_path):
    model_paths.set_models_dirs([str(tmp_path)])
    try:
        with pytest.raises(ModelFileNotFound) as err:
            _node("FaceMend_OneStepSRLoader").load("tsdsr", "stable-diffusion-3-medium-diffusers", "tsdsr", "auto")
    finally:
        model_paths.set_models_dirs([])
    msg = str(err.value)
    base = tmp_path / "diffusers" / "stable-diffusion-3-medium-diffusers"
    for path in (base / "transformer" / "config.json", base / "vae" / "config.json",
                 tmp_path / "onestep_sr" / "tsdsr" / "transformer.safetensors",
                 tmp_path / "onestep_sr" / "tsdsr" / "pool_embeds.pt"):
        assert str(path) in msg, (path, msg)
    assert "huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers" in msg and "never downloads" in msg
