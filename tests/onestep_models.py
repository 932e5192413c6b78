"""Tiny random-weight SD3 / SD2.1-style models and LoRA files in the official TSD-SR / OSEDiff layouts.

Module names, target lists, key formats and file names are the official ones; only widths, depths and LoRA
ranks are scaled down (real: SD3-medium 24 layers x 1536, rank 64; SD2.1-base, rank 4).
"""
from __future__ import annotations

import os

import torch

# TSD-SR test/test_tsdsr.py target lists (facts carried over from the official script).
TSDSR_TRANSFORMER_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "proj",
                             "linear", "proj_out"]
TSDSR_VAE_TARGETS = (
    ["encoder.conv_in"]
    + [f"encoder.down_blocks.{b}.resnets.{r}.conv{c}" for b in range(4) for r in range(2) for c in (1, 2)]
    + [f"encoder.down_blocks.{b}.downsamplers.0.conv" for b in range(3)]
    + ["encoder.down_blocks.1.resnets.0.conv_shortcut", "encoder.down_blocks.2.resnets.0.conv_shortcut"]
    + [f"encoder.mid_block.attentions.0.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
    + [f"encoder.mid_block.resnets.{r}.conv{c}" for r in range(2) for c in (1, 2)]
    + ["encoder.conv_out", "quant_conv"])


def tiny_vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, quant=False):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=4,
                         latent_channels=latent_channels, use_quant_conv=quant, use_post_quant_conv=quant,
                         scaling_factor=scaling_factor, shift_factor=shift_factor).eval()


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(2)
    return SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=24, out_channels=16, pos_embed_max_size=96).eval()


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def random_lora(model, targets, rank, gen, prefix="transformer.", std=0.05):
    """peft-layout LoRA tensors {prefix+module+'.lora_A.weight': ...} for every Linear/Conv2d named in targets."""
    sd = {}
    for name, m in model.named_modules():
        if not _matches(name, targets) or not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if isinstance(m, torch.nn.Linear):
            a = torch.randn(rank, m.in_features, generator=gen) * std
            b = torch.randn(m.out_features, rank, generator=gen) * std
        else:
            a = torch.randn(rank, m.in_channels, *m.kernel_size, generator=gen) * std
            b = torch.randn(m.out_channels, rank, 1, 1, generator=gen) * std
        sd[f"{prefix}{name}.lora_A.weight"] = a
        sd[f"{prefix}{name}.lora_B.weight"] = b
    return sd


def make_tsdsr(root, rank=4, seq=12, base_name="sd3-tiny"):
    """models/diffusers/sd3-tiny/{transformer,vae} + models/onestep_sr/tsdsr/{4 files}. Returns (base, lora)."""
    from safetensors.torch import save_file

    base = os.path.join(root, "diffusers", base_name)
    lora = os.path.join(root, "onestep_sr", "tsdsr")
    os.makedirs(lora, exist_ok=True)
    tr, vae = tiny_sd3(), tiny_vae()
    tr.save_pretrained(os.path.join(base, "transformer"))
    vae.save_pretrained(os.path.join(base, "vae"))
    g = torch.Generator().manual_seed(3)
    save_file(random_lora(tr, TSDSR_TRANSFORMER_TARGETS, rank, g), os.path.join(lora, "transformer.safetensors"))
    save_file(random_lora(vae, TSDSR_VAE_TARGETS, rank, g), os.path.join(lora, "vae.safetensors"))
    torch.save(torch.randn(1, seq, 32, generator=g), os.path.join(lora, "prompt_embeds.pt"))
    torch.save(torch.randn(1, 24, generator=g), os.path.join(lora, "pool_embeds.pt"))
    return base, lora


# --- SD2.1-style + OSEDiff --------------------------------------------------------------------------------
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(4)
    return UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4, use_linear_projection=True).eval()


def _tiny_text_encoder(folder, hidden=16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    import json

    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz,"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vf, mf = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vf, "w") as f:
        json.dump(vocab, f)
    with open(mf, "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer(vf, mf, model_max_length=77)
    tok.save_pretrained(os.path.join(folder, "tokenizer"))
    os.remove(vf)
    os.remove(mf)
    torch.manual_seed(5)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    CLIPTextModel(cfg).eval().save_pretrained(os.path.join(folder, "text_encoder"))


def osediff_target_lists(unet, vae):
    """The module lists OSEDiff's initialize_unet / initialize_vae build (same grep rules)."""
    enc, dec, oth = [], [], []
    grep = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out",
            "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for p in grep:
            if p in n and ("down_blocks" in n or "conv_in" in n):
                enc.append(n.replace(".weight", ""))
                break
            elif p in n and ("up_blocks" in n or "conv_out" in n):
                dec.append(n.replace(".weight", ""))
                break
            elif p in n:
                oth.append(n.replace(".weight", ""))
                break
    venc = []
    vgrep = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]
    for n, _ in vae.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for p in vgrep:
            if p in n and "encoder" in n:
                venc.append(n.replace(".weight", ""))
            elif "quant_conv" in n and "post_quant_conv" not in n:
                venc.append(n.replace(".weight", ""))
    return enc, dec, oth, venc


def make_osediff(root, rank=4):
    """models/diffusers/sd21-tiny/{unet,vae,text_encoder,tokenizer,scheduler} + models/onestep_sr/osediff.pkl,
    the pkl written the way OSEDiff's save_model does (peft adapters, then trained values). Returns (base, pkl)."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    base = os.path.join(root, "diffusers", "sd21-tiny")
    os.makedirs(os.path.join(root, "onestep_sr"), exist_ok=True)
    unet, vae = tiny_unet(), tiny_vae(latent_channels=4, scaling_factor=0.18215, shift_factor=None, quant=True)
    unet.save_pretrained(os.path.join(base, "unet"))
    vae.save_pretrained(os.path.join(base, "vae"))
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  prediction_type="epsilon", steps_offset=1).save_pretrained(os.path.join(base, "scheduler"))
    _tiny_text_encoder(base)
    enc, dec, oth, venc = osediff_target_lists(unet, vae)
    for name, targets in (("default_encoder", enc), ("default_decoder", dec), ("default_others", oth)):
        unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=targets), adapter_name=name)
    vae.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=venc),
                    adapter_name="default_encoder")
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # "trained" values: random B (peft inits B to zero) and a changed conv_in
        for model in (unet, vae):
            for n, p in model.named_parameters():
                if "lora_B" in n or "conv_in.base_layer" in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    sd = {"vae_lora_encoder_modules": venc, "unet_lora_encoder_modules": enc, "unet_lora_decoder_modules": dec,
          "unet_lora_others_modules": oth, "rank_unet": rank, "rank_vae": rank,
          "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
          "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k}}
    pkl = os.path.join(root, "onestep_sr", "osediff.pkl")
    torch.save(sd, pkl)
    return base, pkl
