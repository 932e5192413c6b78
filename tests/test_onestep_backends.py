"""TSD-SR and OSEDiff loaders: tiny random-weight models in the official folder/file layouts load and give the
same output as the official recipe (peft adapters + diffusers models, written out here); missing or wrong files
give errors that name them."""
import os
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from onestep_models import (TSDSR_TRANSFORMER_TARGETS, TSDSR_VAE_TARGETS, make_osediff, make_tsdsr,  # noqa: E402
                            random_lora, tiny_sd3)
from facemend.pipelines.io.errors import ModelFileInvalid, ModelFileNotFound  # noqa: E402
from facemend.pipelines.diffusion.backends import load_osediff, load_tsdsr  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("models"))
    return root, make_tsdsr(root), make_osediff(root)


def _image(h=64, w=64, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _peft_copy(model, state_dict, adapter, key_of):
    """Copy LoRA tensors into a peft-wrapped model's adapter parameters; every file key must be used."""
    used = set()
    with torch.no_grad():
        for n, p in model.named_parameters():
            key = key_of(n)
            if key is not None:
                p.copy_(state_dict[key])
                used.add(key)
    return used


def test_tsdsr_files_in_the_official_layout_match_the_official_recipe(models_root):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from peft import LoraConfig
    from safetensors.torch import load_file

    _, (base, lora), _ = models_root
    ours = load_tsdsr(base, lora)
    # Official recipe (TSD-SR test/test_tsdsr.py): peft adapters, rank r with lora_alpha = r, weights copied by
    # name ('transformer.' + parameter name without '.default'), t = 1000, z0 = z - v, no shift_factor.
    tr = SD3Transformer2DModel.from_pretrained(base, subfolder="transformer").eval()
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").eval()
    for model, fname, targets in ((tr, "transformer.safetensors", TSDSR_TRANSFORMER_TARGETS),
                                  (vae, "vae.safetensors", TSDSR_VAE_TARGETS)):
        sd = load_file(os.path.join(lora, fname))
        rank = next(iter(sd.values())).shape[0] if "lora_A" in next(iter(sd)) else 4
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
        used = _peft_copy(model, sd, "default",
                          lambda n: "transformer." + n.replace(".default", "") if ".default" in n else None)
        assert used == set(sd), "the LoRA file holds keys the official loader would not use"
    assert len(load_file(os.path.join(lora, "vae.safetensors"))) == 2 * 31  # 32 official targets; SD3 has no quant_conv
    prompt = torch.load(os.path.join(lora, "prompt_embeds.pt"))
    pooled = torch.load(os.path.join(lora, "pool_embeds.pt"))
    x = _image(64, 96)
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latent_dist.sample(generator=torch.Generator().manual_seed(5))
        z = z * vae.config.scaling_factor
        v = tr(hidden_states=z, timestep=torch.tensor([1000.0]), encoder_hidden_states=prompt,
               pooled_projections=pooled).sample
        ref = (vae.decode((z - v) / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2
    out = ours(x, scale=1, seed=5)
    err = (out - ref).abs().max().item()
    print(f"max |ours - official| = {err:.2e}")
    assert err < 1e-4, err
    assert (ref - (x.clamp(0, 1))).abs().mean() > 1e-3  # the step does change the image


def test_osediff_pkl_in_the_official_layout_matches_the_official_recipe(models_root):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import AutoTokenizer, CLIPTextModel

    _, _, (base, pkl) = models_root
    prompt = "face, portrait"
    ours = load_osediff(base, pkl, prompt=prompt)
    # Official recipe (OSEDiff osediff.py OSEDiff_test): three UNet adapters + one VAE adapter with peft's default
    # lora_alpha, weights copied by parameter name ('lora' or 'conv_in'), DDPM step at t = 999.
    ck = torch.load(pkl, weights_only=True)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").eval()
    for name, key in (("default_encoder", "unet_lora_encoder_modules"), ("default_decoder", "unet_lora_decoder_modules"),
                      ("default_others", "unet_lora_others_modules")):
        unet.add_adapter(LoraConfig(r=ck["rank_unet"], init_lora_weights="gaussian", target_modules=ck[key]),
                         adapter_name=name)
    used = _peft_copy(unet, ck["state_dict_unet"], None, lambda n: n if ("lora" in n or "conv_in" in n) else None)
    assert used == set(ck["state_dict_unet"])
    unet.set_adapter(["default_encoder", "default_decoder", "default_others"])
    vae.add_adapter(LoraConfig(r=ck["rank_vae"], init_lora_weights="gaussian",
                               target_modules=ck["vae_lora_encoder_modules"]), adapter_name="default_encoder")
    used = _peft_copy(vae, ck["state_dict_vae"], None, lambda n: n if "lora" in n else None)
    assert used == set(ck["state_dict_vae"])
    vae.set_adapter(["default_encoder"])
    sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    # OSEDiff pins diffusers 0.25, whose DDPM step from t=999 with one inference step goes to t = 999 - 1000 = -1;
    # current diffusers looks the previous step up in its list, so the list is given as [999].
    sched.set_timesteps(timesteps=[999])
    tok = AutoTokenizer.from_pretrained(os.path.join(base, "tokenizer"))
    te = CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder"))
    x = _image(64, 64, seed=1)
    with torch.no_grad():
        ids = tok(prompt, max_length=tok.model_max_length, padding="max_length", truncation=True,
                  return_tensors="pt").input_ids
        emb = te(ids)[0]
        z = vae.encode(x * 2 - 1).latent_dist.sample(generator=torch.Generator().manual_seed(9))
        z = z * vae.config.scaling_factor
        t = torch.tensor([999]).long()
        eps = unet(z, t, encoder_hidden_states=emb).sample
        z0 = sched.step(eps, t, z, return_dict=True).prev_sample
        ref = (vae.decode(z0 / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2
    out = ours(x, scale=1, seed=9)
    err = (out - ref).abs().max().item()
    print(f"max |ours - official| = {err:.2e}")
    assert err < 1e-4, err


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_backends_run_at_every_scale_with_exact_sizes(models_root, scale):
    _, (tb, tl), (ob, pkl) = models_root
    x = _image(24, 40, seed=2)  # 24x40 -> x4 = 96x160: the denoiser tiles for OSEDiff's smaller tile below
    for model in (load_tsdsr(tb, tl), load_osediff(ob, pkl)):
        out = model(x, scale=scale, seed=0)
        assert out.shape == (1, 3, 24 * scale, 40 * scale) and torch.isfinite(out).all()
        assert 0 <= out.min() and out.max() <= 1


def test_bf16_runs_close_to_fp32(models_root):
    _, (base, lora), _ = models_root
    x = _image(64, 64, seed=3)
    a = load_tsdsr(base, lora, dtype=torch.float32)(x, seed=1)
    b = load_tsdsr(base, lora, dtype=torch.bfloat16)(x, seed=1)
    assert b.dtype == torch.float32 and (a - b).abs().mean() < 0.02


def test_missing_files_are_listed_with_where_they_go(models_root, tmp_path):
    root, (base, lora), (obase, pkl) = models_root
    partial = tmp_path / "sd3"
    shutil.copytree(os.path.join(base, "transformer"), partial / "transformer")
    lora_dir = tmp_path / "tsdsr"
    lora_dir.mkdir()
    shutil.copy(os.path.join(lora, "transformer.safetensors"), lora_dir)
    with pytest.raises(ModelFileNotFound) as err:
        load_tsdsr(str(partial), str(lora_dir))
    msg = str(err.value)
    for needed in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae.safetensors",
                   "prompt_embeds.pt", "pool_embeds.pt", "stable-diffusion-3-medium-diffusers", "TSD-SR"):
        assert needed in msg, (needed, msg)
    assert "transformer/config.json" not in msg and str(lora_dir / "transformer.safetensors") not in msg
    with pytest.raises(ModelFileNotFound, match=r"(?s)unet/config.json.*text_encoder.*osediff.pkl.*cswry/OSEDiff"):
        load_osediff(str(tmp_path / "nothing"), str(tmp_path / "osediff.pkl"))


def test_wrong_lora_files_are_refused_with_the_reason(models_root, tmp_path):
    from safetensors.torch import save_file

    root, (base, lora), (obase, pkl) = models_root
    bad = tmp_path / "tsdsr"
    shutil.copytree(lora, bad)
    # A transformer LoRA for a wider model (e.g. a real SD3 LoRA on the tiny base): shapes do not fit.
    wide = tiny_sd3().__class__(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                pooled_projection_dim=24, out_channels=16, pos_embed_max_size=96)
    save_file(random_lora(wide, TSDSR_TRANSFORMER_TARGETS, 4, torch.Generator().manual_seed(0)),
              str(bad / "transformer.safetensors"))
    with pytest.raises(ModelFileInvalid, match="does not fit the SD3 transformer.*shapes"):
        load_tsdsr(base, str(bad))
    # The OSEDiff pickle given as TSD-SR's VAE LoRA (wrong file in the folder).
    shutil.copy(os.path.join(lora, "transformer.safetensors"), bad / "transformer.safetensors")
    save_file({"x.weight": torch.zeros(2)}, str(bad / "vae.safetensors"))
    with pytest.raises(ModelFileInvalid, match="no LoRA weights"):
        load_tsdsr(base, str(bad))
    junk = tmp_path / "osediff.pkl"
    torch.save({"something": torch.zeros(1)}, junk)
    with pytest.raises(ModelFileInvalid, match="not an OSEDiff checkpoint"):
        load_osediff(obase, str(junk))
