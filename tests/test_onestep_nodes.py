"""One-step SR loader -> ONESTEP_SR -> SR node, with tiny random models in a ComfyUI-style models folder: what the
nodes compute (ops/diffusion.py, no ComfyUI) with progress over tiles, live decode previews, interruption and
missing-file errors; and the V3 nodes' own parts (choices, validation before a run, fingerprints, the output
preview), which need ComfyUI's node API (they skip without it)."""
import contextlib
import os

import pytest
import torch

pytest.importorskip("diffusers")

from facemend.host import device as dev  # noqa: E402
from facemend.host import model_paths  # noqa: E402
from facemend.ops import diffusion as op  # noqa: E402
from facemend.pipelines.io.errors import Interrupted, ModelFileNotFound  # noqa: E402

from conftest import node_class  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from onestep_models import make_osediff, make_tsdsr

    root = str(tmp_path_factory.mktemp("models"))
    make_tsdsr(root)
    make_osediff(root)
    model_paths.set_models_dirs([root])
    yield root
    model_paths.set_models_dirs([])


@contextlib.contextmanager
def models_in(path):
    """The standalone model search pointed at `path` for a while (the module's models folder comes back after)."""
    before = list(model_paths._standalone_dirs)
    model_paths.set_models_dirs([str(path)])
    try:
        yield
    finally:
        model_paths.set_models_dirs(before)


@pytest.fixture
def hosted_progress(monkeypatch):
    """Progress as ComfyUI's execution API receives it when the pack is hosted: (value, total, preview or None)."""
    reports = []
    monkeypatch.setattr(dev, "is_hosted", lambda: True)
    monkeypatch.setattr(dev, "_reporter", lambda value, total, image: reports.append((value, total, image)))
    return reports


def test_loader_lists_folders_and_the_sr_node_upscales(models_dir, hosted_progress):
    assert "sd3-tiny" in op.onestep_base_choices()
    assert {"tsdsr", "osediff.pkl"} <= set(op.onestep_lora_choices())
    model = op.load_onestep("tsdsr", "sd3-tiny", "tsdsr", "fp32")
    assert op.load_onestep("tsdsr", "sd3-tiny", "tsdsr", "fp32") is model  # cached

    image = torch.rand(2, 48, 40, 3)  # IMAGE [B,H,W,C]
    out = op.one_step_sr(image, model, scale=4, tile_size=128, tile_overlap=32, seed=3, vae_tile_size=256)[0]
    assert out.shape == (2, 192, 160, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert 0 <= out.min() and out.max() <= 1
    total = hosted_progress[-1][1]
    assert hosted_progress[-1][0] == total > 3  # encoder, denoiser and decoder tiles all reported
    # A live preview of the decode reached the node: the first image of the batch, at most 512 on a side.
    shown = [img for _, _, img in hosted_progress if img is not None]
    assert shown and shown[0].shape[0] == 1 and shown[0].shape[-1] == 3 and max(shown[0].shape[1:3]) <= 512
    assert 0 <= shown[0].min() and shown[0].max() <= 1
    again = op.one_step_sr(image, model, scale=4, tile_size=128, tile_overlap=32, seed=3, vae_tile_size=256)[0]
    assert torch.equal(out, again)  # previews change nothing


def test_osediff_through_the_nodes(models_dir):
    model = op.OPS["FaceMend_OneStepSRLoader"](backend="osediff", base_model="sd21-tiny", lora="osediff.pkl",
                                                precision="fp32", prompt="face")[0]
    out = op.OPS["FaceMend_OneStepSR"](image=torch.rand(1, 40, 56, 3), sr_model=model, scale=2, tile_size=0,
                                       tile_overlap=-1, seed=0)[0]
    assert out.shape == (1, 80, 112, 3)


def test_interrupt_stops_between_tiles(models_dir):
    model = op.load_onestep("tsdsr", "sd3-tiny", "tsdsr", "fp32")
    dev.request_interrupt()
    try:
        with pytest.raises(Interrupted):
            op.one_step_sr(torch.rand(1, 32, 32, 3), model, scale=1, tile_size=0, tile_overlap=-1, seed=0)
    finally:
        dev.clear_interrupt()


def test_missing_models_name_every_file_and_its_folder(tmp_path):
    with models_in(tmp_path), pytest.raises(ModelFileNotFound) as err:
        op.load_onestep("tsdsr", "stable-diffusion-3-medium-diffusers", "tsdsr", "auto")
    msg = str(err.value)
    base = tmp_path / "diffusers" / "stable-diffusion-3-medium-diffusers"
    for path in (base / "transformer" / "config.json", base / "vae" / "config.json",
                 tmp_path / "onestep_sr" / "tsdsr" / "transformer.safetensors",
                 tmp_path / "onestep_sr" / "tsdsr" / "pool_embeds.pt"):
        assert str(path) in msg, (path, msg)
    assert "huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers" in msg and "never downloads" in msg


def test_a_file_changed_in_the_lora_folder_loads_again(models_dir):
    model = op.load_onestep("tsdsr", "sd3-tiny", "tsdsr", "fp32")
    path = os.path.join(models_dir, "onestep_sr", "tsdsr", "pool_embeds.pt")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # as a copy of new weights would leave it
    assert op.load_onestep("tsdsr", "sd3-tiny", "tsdsr", "fp32") is not model


# ---------------------------------------------------------------------------------------- the V3 nodes (ComfyUI)
def test_loader_node_choices_come_from_the_models_folders(models_dir):
    spec = node_class("FaceMend_OneStepSRLoader").GET_NODE_INFO_V1()["input"]["required"]
    assert "sd3-tiny" in spec["base_model"][1]["options"]
    assert {"tsdsr", "osediff.pkl"} <= set(spec["lora"][1]["options"])
    # One set of widgets for every backend (no dynamic combo: see nodes/diffusion.py), so each says who reads it.
    readers = {"base_model": "Every backend", "lora": "Every backend", "precision": "Every backend",
               "prompt": "OSEDiff only", "tile_size": "TSD-SR and OSEDiff", "tile_overlap": "TSD-SR and OSEDiff",
               "seed": "Every backend", "blend": "TSD-SR and OSEDiff", "vae_tile_size": "TSD-SR and OSEDiff",
               "max_batch": "Every backend"}
    for node_id in ("FaceMend_OneStepSRLoader", "FaceMend_OneStepSR"):
        inputs = node_class(node_id).GET_NODE_INFO_V1()["input"]
        for name, widget in {**inputs["required"], **inputs.get("optional", {})}.items():
            if name in readers:
                assert widget[1]["tooltip"].startswith(readers[name]), (name, widget[1]["tooltip"])


def test_loader_validation_names_missing_files_before_the_run(tmp_path):
    loader = node_class("FaceMend_OneStepSRLoader")
    with models_in(tmp_path):
        args = dict(backend="tsdsr", base_model="stable-diffusion-3-medium-diffusers", lora="tsdsr", precision="auto")
        msg = loader.validate_inputs(**args)
        with pytest.raises(ModelFileNotFound) as err:  # what the run would have raised, said before it starts
            op.load_onestep(**args)
        assert msg == str(err.value) and "never downloads" in msg
        # A linked base model (not known at validation) is not guessed at; refused combo values still are.
        assert loader.validate_inputs(backend="tsdsr", lora="tsdsr", precision="auto") is True
        assert "Value not in list: precision: 'fp8'" in loader.validate_inputs(**{**args, "precision": "fp8"})
        assert "backend: 'sdxl'" in loader.validate_inputs(**{**args, "backend": "sdxl"})


def test_loader_validation_passes_present_files_and_refuses_another_backends_lora(models_dir):
    loader = node_class("FaceMend_OneStepSRLoader")
    assert loader.validate_inputs(backend="tsdsr", base_model="sd3-tiny", lora="tsdsr", precision="fp32") is True
    assert loader.validate_inputs(backend="osediff", base_model="sd21-tiny", lora="osediff.pkl") is True
    msg = loader.validate_inputs(backend="osediff", base_model="sd21-tiny", lora="tsdsr")
    assert "osediff: lora 'tsdsr' is a folder" in msg and "osediff.pkl" in msg
    msg = loader.validate_inputs(backend="tsdsr", base_model="sd3-tiny", lora="osediff.pkl")
    assert "tsdsr: lora 'osediff.pkl' is a file" in msg and "tsdsr folder" in msg


def test_loader_fingerprint_follows_the_files(models_dir):
    loader = node_class("FaceMend_OneStepSRLoader")
    args = ("tsdsr", "sd3-tiny", "tsdsr", "fp32", "")
    before = loader.fingerprint_inputs(*args)
    assert loader.fingerprint_inputs(*args) == before  # unchanged files: ComfyUI keeps the loaded model
    path = os.path.join(models_dir, "diffusers", "sd3-tiny", "vae", "config.json")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert loader.fingerprint_inputs(*args) != before  # a file replaced inside the base folder: loaded again
    assert loader.fingerprint_inputs("tsdsr", "sd3-tiny", "tsdsr", "fp16", "") != loader.fingerprint_inputs(*args)


def test_sr_node_shows_its_output_and_checks_its_combos(models_dir, monkeypatch, tmp_path):
    import folder_paths
    import numpy as np
    from PIL import Image

    node = node_class("FaceMend_OneStepSR")
    assert node.validate_inputs(scale=3) == "Value not in list: scale: '3' not in [1, 2, 4]"
    assert node.validate_inputs(scale=2, blend="linear") is True
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    model = op.load_onestep("tsdsr", "sd3-tiny", "tsdsr", "fp32")
    result = node.execute(torch.rand(1, 32, 48, 3), model, scale=1, tile_size=0, tile_overlap=-1, seed=0)
    out = result.args[0]
    shown = result.ui.as_dict()["images"]
    assert len(shown) == 1 and shown[0]["type"] == "temp"
    png = torch.tensor(np.array(Image.open(tmp_path / shown[0]["subfolder"] / shown[0]["filename"]))).float()
    assert png.shape == out.shape[1:]  # small images are shown at their size
    # The output itself: ComfyUI writes uint8(255 * x), truncating (float32 255 * x is exact to well under 1e-3).
    assert torch.equal(png, (255.0 * out[0]).clamp(0, 255).floor())
