"""Tiny random-weight OSDFace files in the official layouts, and the official code (jkwang28/OSDFace) run on them.

Files: models/diffusers/<base>/{unet,vae,scheduler} (SD-2.1-base layout, cross_attention_dim 1024 as the
embedding change outputs) and models/onestep_sr/osdface/{pytorch_lora_weights.safetensors (diffusers'
'unet.<module>.lora_A.weight' keys), embedding_change_weights.pth (TwoLayerConv1x1 state dict), associate_2.ckpt (a
Lightning-style checkpoint: 'state_dict' with 'vqvae_LQ.*' encoder, quantizer and decoder keys, plus a pickled
callback class as PL 1.x writes)}. Only widths, depths and the codebook size are scaled down.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
import types
from argparse import Namespace

import torch

from onestep_models import random_lora

# A small VQ encoder that keeps what the official code fixes: 512 input, 6 levels (16x16 tokens grid), attention
# at 16, 512-wide codes (TwoLayerConv1x1(512, 1024) is hard-wired in infer.py), GroupNorm(32).
TINY_EMBEDDER = dict(ch=32, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1, attn_resolutions=[16], z_channels=32,
                     embed_dim=512, n_embed=128)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_in", "conv_out"]
SETSTATE_CALLS = []


class CallbackLike:
    """Stands for pytorch_lightning's ModelCheckpoint, pickled as a dict key in PL 1.x checkpoints."""

    def __setstate__(self, state):
        SETSTATE_CALLS.append(state)  # our loader must never run this
        self.__dict__.update(state)


def tiny_unet_1024():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(14)
    return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=1024,
                                attention_head_dim=4, norm_num_groups=4, use_linear_projection=True).eval()


def tiny_osd_vae():
    """SD's VAE shape (x8, 4 latent channels, quant convs) at widths that keep float64 reference runs at 512 cheap."""
    from diffusers import AutoencoderKL

    torch.manual_seed(17)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(4, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                         scaling_factor=0.18215).eval()


def make_osdface(root, rank=4, base_name="sd21-osd-tiny", pos_embedding=False):
    """Writes the tiny files; returns (base_dir, osdface_dir)."""
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    from facemend.pipelines.diffusion.osdface import EmbedderConfig, EmbeddingChange, VisualEmbedder

    base = os.path.join(root, "diffusers", base_name)
    own = os.path.join(root, "onestep_sr", "osdface")
    os.makedirs(own, exist_ok=True)
    unet = tiny_unet_1024()
    vae = tiny_osd_vae()
    unet.save_pretrained(os.path.join(base, "unet"))
    vae.save_pretrained(os.path.join(base, "vae"))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon").save_pretrained(
        os.path.join(base, "scheduler"))
    g = torch.Generator().manual_seed(15)
    save_file(random_lora(unet, LORA_TARGETS, rank, g, prefix="unet."),
              os.path.join(own, "pytorch_lora_weights.safetensors"))
    torch.manual_seed(16)
    torch.save(EmbeddingChange(512, 1024).state_dict(), os.path.join(own, "embedding_change_weights.pth"))
    cfg = EmbedderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_EMBEDDER.items()},
                         pos_embedding=pos_embedding)
    emb = VisualEmbedder(cfg)
    with torch.no_grad():
        emb.quantize.embedding.weight.copy_(torch.randn(cfg.n_embed, cfg.embed_dim, generator=g) * 0.3)
        for name, p in emb.named_parameters():  # GroupNorm affine params away from 1/0, as trained ones are
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    sd = {f"vqvae_LQ.{k}": v for k, v in emb.state_dict().items()}
    sd["vqvae_LQ.decoder.conv_in.weight"] = torch.randn(8, 512, 3, 3, generator=g)  # the half infer.py skips
    sd["vqvae_LQ.post_quant_conv.weight"] = torch.randn(32, 512, 1, 1, generator=g)
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1234, "callbacks": {CallbackLike: {"best": 0.1}},
                "pytorch-lightning_version": "1.0.8"}, os.path.join(own, "associate_2.ckpt"))
    return base, own


@contextlib.contextmanager
def official_modules(odir):
    """infer.py and lq_embed imported from the pinned checkout; the top-level names it uses (utils, lq_embed,
    infer) are restored in sys.modules afterwards so other official trees are not shadowed."""
    names = ("utils", "lq_embed", "infer")

    def ours(k):
        return any(k == n or k.startswith(n + ".") for n in names)

    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    path = list(sys.path)  # infer.py and utils/vaehook.py also append the working directory
    # Its utils/ has no __init__.py (a namespace package): a regular `utils` package anywhere on sys.path wins over
    # it, e.g. ComfyUI's, which the node tests put there.
    sys.path[:] = [str(odir)] + [p for p in path if not Path(p, "utils", "__init__.py").is_file()]
    try:
        try:
            import infer
            import lq_embed
        except ImportError as exc:  # its own imports: matplotlib, imageio, einops, tqdm (utils/), diffusers
            import pytest

            pytest.skip(f"the official OSDFace code needs {exc.name or exc} (pip install it to run this test)")
        yield infer, lq_embed
    finally:
        sys.path[:] = path
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


class _CpuTorch:
    """torch as infer.py sees it, with its CUDA device and streams pointed at the CPU (nothing else changes)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def device(*_a, **_k):
        return torch.device("cpu")

    cuda = types.SimpleNamespace(Stream=lambda *a, **k: None, stream=lambda s: contextlib.nullcontext(),
                                 synchronize=lambda *a, **k: None)


def official_args(base, own, merge, concat=False, pos=False, rank=4):
    return Namespace(pretrained_model_name_or_path=base, ckpt_path=own,
                     img_encoder_weight=os.path.join(own, "associate_2.ckpt"), mixed_precision="fp32",
                     cat_prompt_embedding=concat, use_pos_embedding=pos, use_att_pool=False, learnable_pos_emb=False,
                     merge_lora=merge, lora_rank=rank, lora_alpha=float(rank), seed=114)


def official_model(infer, lq_embed, args, on_cpu=True):
    """infer.OSDFace_test built as main_worker builds it (merge_Unet first when --merge_lora), on the CPU (or its
    own cuda:0), with the tiny VQ encoder widths passed to the official vqvae_encoder constructor."""
    if on_cpu:
        infer.torch = _CpuTorch()
    infer.vqvae_encoder = functools.partial(lq_embed.vqvae_encoder, **TINY_EMBEDDER)
    unet = infer.merge_Unet(args) if args.merge_lora else None
    model = infer.OSDFace_test(args, 0, unet)
    return model.eval()


def official_embedder(lq_embed, args):
    return functools.partial(lq_embed.vqvae_encoder, **TINY_EMBEDDER)(args).eval()


# --- SD-2.1-base as a single file (Stability's original layout) ---------------------------------------------
def tiny_sd2_unet():
    """SD-2.1-base's block structure (4 levels, 2 layers each, linear projections, 1024-wide context), tiny widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(18)
    return UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(16, 16, 32, 32),
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
                                attention_head_dim=2, norm_num_groups=8, use_linear_projection=True).eval()


_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def unet_to_original(unet) -> dict:
    """The diffusers UNet's state dict under Stability's original (LDM openaimodel) names, the inverse of diffusers'
    convert_ldm_unet_checkpoint for SD 1.x/2.x structures."""
    cfg = unet.config
    per = cfg.layers_per_block
    prefix_map = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
                  "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
                  "mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.0.": "middle_block.0.",
                  "mid_block.resnets.1.": "middle_block.2."}
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(per):
            prefix_map[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{i * (per + 1) + j + 1}.0."
            if "CrossAttn" in kind:
                prefix_map[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{i * (per + 1) + j + 1}.1."
        prefix_map[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per + 1)}.0.op."
    for i, kind in enumerate(cfg.up_block_types):
        for j in range(per + 1):
            prefix_map[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (per + 1) + j}.0."
            if "CrossAttn" in kind:
                prefix_map[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (per + 1) + j}.1."
        prefix_map[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{i * (per + 1) + per}."
                                                      f"{2 if 'CrossAttn' in kind else 1}.")
    out = {}
    for key, value in unet.state_dict().items():
        best = max((p for p in prefix_map if key.startswith(p)), key=len)
        rest = key[len(best):]
        if ".resnets." in best or best.startswith("mid_block.resnets"):
            for new, old in _RESNET:
                if rest.startswith(new + "."):
                    rest = old + rest[len(new):]
                    break
        out[prefix_map[best] + rest] = value
    return out


def write_sd21_single_file(path, unet, vae, extra=None):
    from safetensors.torch import save_file
    from sd3_original_layout import vae_to_original

    sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in unet_to_original(unet).items()}
    n = len(vae.config.block_out_channels)
    sd.update({f"first_stage_model.{k}": v.contiguous() for k, v in vae_to_original(vae.state_dict(), n).items()})
    sd.update(extra or {})
    save_file(sd, path)
