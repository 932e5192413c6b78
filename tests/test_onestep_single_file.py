"""TSD-SR from a single-file SD3 checkpoint (ComfyUI's models/checkpoints/sd3_medium*.safetensors): a tiny SD3
transformer + VAE written in Stability's original layout (plus stray text-encoder tensors, as in the _incl_clips
files) loads offline into the same modules and the same refiner output as the diffusers folder; the shipped
SD3-medium configs build the real architecture's key set; wrong or missing files are named."""
import os

import pytest
import torch

pytest.importorskip("diffusers")

from onestep_models import make_tsdsr  # noqa: E402
from sd3_original_layout import (TRANSFORMER_PREFIX, VAE_PREFIX, mmdit_original_shapes,  # noqa: E402
                                 sd3_transformer_to_original, single_file_state, vae_to_original)
from facemend.host import model_paths  # noqa: E402
from facemend.ops import diffusion as op  # noqa: E402
from facemend.pipelines.diffusion import sd3_single_file  # noqa: E402
from facemend.pipelines.io.errors import ModelFileInvalid, ModelFileNotFound  # noqa: E402
from facemend.pipelines.diffusion.backends import load_osediff, load_tsdsr  # noqa: E402
from facemend.pipelines.diffusion.sd3_single_file import load_sd3_single_file  # noqa: E402

torch.set_num_threads(1)

CLIP_KEYS = {  # a few tensors of the text encoders an _incl_clips file adds (real names, tiny shapes)
    "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
    "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": (8,),
    "text_encoders.t5xxl.transformer.shared.weight": (32, 8),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models/diffusers/sd3-tiny (+ TSD-SR LoRA folder) and the same weights as models/checkpoints/sd3-tiny*.safetensors."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from safetensors.torch import save_file

    root = str(tmp_path_factory.mktemp("models"))
    base, lora = make_tsdsr(root)
    tr = SD3Transformer2DModel.from_pretrained(base, subfolder="transformer").eval()
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").eval()
    ckpt = os.path.join(root, "checkpoints")
    os.makedirs(ckpt)
    g = torch.Generator().manual_seed(7)
    clips = {k: torch.randn(s, generator=g) for k, s in CLIP_KEYS.items()}
    single = os.path.join(ckpt, "sd3-tiny_incl_clips.safetensors")
    save_file(single_file_state(tr, vae, clips), single)
    return root, base, lora, single, tr, vae


def _tiny_configs(base):
    return os.path.join(base, "transformer"), os.path.join(base, "vae")


class _Spy:
    """Wraps safetensors' safe_open to record which tensors are read."""

    def __init__(self, real):
        self.real, self.read = real, []

    def __call__(self, *args, **kwargs):
        handle, spy = self.real(*args, **kwargs), self

        class Handle:
            def keys(self):
                return handle.keys()

            def get_slice(self, key):
                return handle.get_slice(key)

            def get_tensor(self, key):
                spy.read.append(key)
                return handle.get_tensor(key)

        return Handle()


def test_single_file_loads_the_same_modules_and_reads_no_text_encoder(models, monkeypatch):
    import safetensors

    root, base, lora, single, tr, vae = models
    spy = _Spy(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", spy)
    tcfg, vcfg = _tiny_configs(base)
    tr2, vae2 = load_sd3_single_file(single, tcfg, vcfg)
    for ours, ref in ((tr2, tr), (vae2, vae)):
        a, b = ours.state_dict(), ref.state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in b), [k for k in b if not torch.equal(a[k], b[k])][:5]
        assert {k: v for k, v in ours.config.items() if not k.startswith('_')} == \
               {k: v for k, v in ref.config.items() if not k.startswith('_')}
    assert spy.read and not any(k.startswith("text_encoders.") for k in spy.read)
    assert all(k.startswith((TRANSFORMER_PREFIX, VAE_PREFIX)) for k in spy.read)


def test_tsdsr_from_the_single_file_equals_tsdsr_from_the_folder(models):
    root, base, lora, single, _, _ = models
    tcfg, vcfg = _tiny_configs(base)
    from_file = load_tsdsr(single, lora, transformer_config=tcfg, vae_config=vcfg)
    from_folder = load_tsdsr(base, lora)
    x = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    a, b = from_file(x, scale=2, seed=4), from_folder(x, scale=2, seed=4)
    err = (a - b).abs().max().item()
    print(f"max |single file - diffusers folder| = {err:.1e}")
    # The weights are identical (test above); the two module instances differ only in float summation order.
    assert a.shape == (1, 3, 96, 128) and err < 1e-5


def test_loader_node_lists_and_loads_checkpoints_files(models, monkeypatch):
    root, base, lora, single, _, _ = models
    model_paths.set_models_dirs([root])
    try:
        choices = op.onestep_base_choices()
        assert "sd3-tiny_incl_clips.safetensors" in choices and "sd3-tiny" in choices
        # With the shipped SD3-medium configs the tiny file is refused, naming what it holds and what was expected.
        with pytest.raises(ModelFileInvalid) as err:
            op.load_onestep("tsdsr", "sd3-tiny_incl_clips.safetensors", "tsdsr", "fp32")
        msg = str(err.value)
        assert "shipped SD3-medium config" in msg and "2 blocks of width 16" in msg and "sd3_medium.safetensors" in msg
        # With the tiny configs in place of the shipped ones the node loads it.
        monkeypatch.setattr(sd3_single_file, "CONFIG_DIR", base)
        model = op.load_onestep("tsdsr", "sd3-tiny_incl_clips.safetensors", "tsdsr", "fp32")
        out = op.one_step_sr(torch.rand(1, 32, 48, 3), model, scale=1, tile_size=0, tile_overlap=-1, seed=0)[0]
        assert out.shape == (1, 32, 48, 3)
    finally:
        model_paths.set_models_dirs([])


def test_shipped_configs_build_the_real_sd3_medium_layout_on_meta():
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    tcfg, vcfg = sd3_single_file.shipped_config("transformer"), sd3_single_file.shipped_config("vae")
    tr = sd3_single_file._empty(SD3Transformer2DModel, tcfg)
    vae = sd3_single_file._empty(AutoencoderKL, vcfg)
    assert all(p.is_meta for p in tr.parameters()) and all(p.is_meta for p in vae.parameters())
    n_tr, n_vae = sum(p.numel() for p in tr.parameters()), sum(p.numel() for p in vae.parameters())
    print(f"SD3-medium MMDiT {n_tr / 1e9:.3f} B, VAE {n_vae / 1e6:.2f} M parameters")
    assert round(n_tr / 1e7) == 203 and round(n_vae / 1e6) == 84  # 2.03 B and 84 M (SD3-medium)
    # The original single-file layout of this architecture, written back from the diffusers modules, is the
    # MMDiT layout stated independently (24 blocks x 1536, last context block pre-only) ...
    tr_sd = tr.state_dict()
    original = sd3_transformer_to_original(tr_sd, tcfg["num_layers"])
    assert {k: tuple(v.shape) for k, v in original.items()} == mmdit_original_shapes(depth=24)
    # ... and diffusers' converters map it (and the VAE's ldm layout) onto exactly the modules' key names and shapes.
    for converted, model, what in (
            (convert_sd3_transformer_checkpoint_to_diffusers({TRANSFORMER_PREFIX + k: v for k, v in original.items()}),
             tr, "MMDiT"),
            (convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in vae_to_original(vae.state_dict(), 4).items()},
                                        vcfg), vae, "VAE")):
        sd3_single_file._check_layout(converted, model, what, "real-size", "meta tensors", "the shipped config")
    vae_orig = vae_to_original(vae.state_dict(), 4)
    assert vae_orig["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert vae_orig["encoder.conv_out.weight"].shape == (32, 512, 3, 3) and "quant_conv.weight" not in vae_orig


def _save(path, tensors):
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s) for k, s in tensors.items()}, str(path))
    return str(path)


def test_other_checkpoints_are_refused_with_what_they_are(models, tmp_path):
    from safetensors.torch import load_file

    root, base, lora, single, tr, _ = models
    u = "model.diffusion_model."
    vae_key = {"first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)}
    cases = {
        "sd15.safetensors": ({u + "input_blocks.0.0.weight": (8, 4, 3, 3),
                              u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 768),
                              "cond_stage_model.transformer.text_model.final_layer_norm.weight": (4,), **vae_key},
                             "Stable Diffusion 1.x-style UNet plus a VAE"),
        "v2-1_512-ema-pruned.safetensors": ({u + "input_blocks.0.0.weight": (8, 4, 3, 3),
                                             u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024),
                                             **vae_key}, "Stable Diffusion 2.x UNet"),
        "sdxl.safetensors": ({u + "input_blocks.0.0.weight": (8, 4, 3, 3), u + "label_emb.0.0.weight": (8, 16),
                              "conditioner.embedders.1.model.ln_final.weight": (4,), **vae_key},
                             "Stable Diffusion XL UNet"),
        "flux.safetensors": ({u + "double_blocks.0.img_attn.qkv.weight": (12, 4)}, "Flux transformer"),
        "diffusion_pytorch_model.safetensors": ({k: tuple(v.shape) for k, v in tr.state_dict().items()},
                                                "diffusers-format SD3 transformer"),
    }
    for name, (keys, what) in cases.items():
        with pytest.raises(ModelFileInvalid) as err:
            load_sd3_single_file(_save(tmp_path / name, keys))
        msg = str(err.value)
        assert "is not a Stable Diffusion 3 checkpoint" in msg and what in msg and "joint_blocks" in msg, msg
    # The MMDiT without its VAE (e.g. a transformer-only export).
    no_vae = {k: v for k, v in load_file(single).items() if not k.startswith(VAE_PREFIX)}
    from safetensors.torch import save_file
    save_file(no_vae, str(tmp_path / "mmdit_only.safetensors"))
    with pytest.raises(ModelFileInvalid, match="no VAE"):
        load_sd3_single_file(str(tmp_path / "mmdit_only.safetensors"), *_tiny_configs(base))
    # Not safetensors, or not a file in a readable format.
    (tmp_path / "sd3_medium.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(ModelFileInvalid, match=r"\.safetensors only"):
        load_sd3_single_file(str(tmp_path / "sd3_medium.ckpt"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelFileInvalid, match="Cannot read .*broken.safetensors"):
        load_sd3_single_file(str(tmp_path / "broken.safetensors"))
    # OSEDiff does not take single files: said so, not a confusing "folder missing".
    with pytest.raises(ModelFileInvalid, match="OSEDiff reads the SD2.1-base diffusers folder only"):
        load_osediff(str(tmp_path / "sd15.safetensors"), str(tmp_path / "osediff.pkl"))


def test_missing_single_file_names_both_options(models, tmp_path):
    root, base, lora, single, _, _ = models
    missing = str(tmp_path / "checkpoints" / "sd3_medium.safetensors")
    with pytest.raises(ModelFileNotFound) as err:
        load_tsdsr(missing, lora)
    msg = str(err.value)
    for needed in (missing, "huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers",
                   "models/diffusers/", "sd3_medium.safetensors", "huggingface.co/stabilityai/stable-diffusion-3-medium ",
                   "models/checkpoints/", "never downloads"):
        assert needed in msg, (needed, msg)
    with pytest.raises(ModelFileNotFound, match="does not exist"):
        load_sd3_single_file(missing)
    # Through the node: a file name resolves to models/checkpoints/, and the error says where it should be.
    model_paths.set_models_dirs([str(tmp_path)])
    try:
        with pytest.raises(ModelFileNotFound) as err:
            op.load_onestep("tsdsr", "sd3_medium.safetensors", "tsdsr", "auto")
    finally:
        model_paths.set_models_dirs([])
    assert missing in str(err.value) and "stable-diffusion-3-medium-diffusers" in str(err.value)


def test_loader_validation_refuses_a_single_file_for_osediff(models):
    from conftest import node_class

    loader = node_class("FaceMend_OneStepSRLoader")
    model_paths.set_models_dirs([models[0]])
    try:
        msg = loader.validate_inputs(backend="osediff", base_model="sd3-tiny_incl_clips.safetensors",
                                     lora="osediff.pkl", precision="fp32")
        assert loader.validate_inputs(backend="tsdsr", base_model="sd3-tiny_incl_clips.safetensors", lora="tsdsr",
                                      precision="fp32") is True
    finally:
        model_paths.set_models_dirs([])
    assert "OSEDiff reads the SD2.1-base diffusers folder only" in msg
