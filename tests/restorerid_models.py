"""Tiny random-weight RestorerID networks and files in the official layouts (tests only).

The key names and nesting are the official ones (RestorerIDFull.ckpt: {'state_dict': {model.diffusion_model.*,
structcond_stage_model.*, first_stage_model.*}}; ip-adapter-faceid-plus_sd15.bin: {'image_proj', 'ip_adapter'});
only widths and depths are reduced. The context width stays 768 and the LoRA rank 128, because the official
IDBalance and LoRA hard-code them.
"""
from __future__ import annotations

import pytest
import torch

from facemend.pipelines.identity.structure_encoder import StructureEncoder, StructureEncoderConfig
from facemend.pipelines.identity.unet import RestorerIDUNet, UNetConfig

TINY_UNET = UNetConfig(model_channels=32, num_res_blocks=1, attention_resolutions=(1, 2), channel_mult=(1, 2),
                       num_heads=2, struct_channels=32)
TINY_STRUCT = StructureEncoderConfig(model_channels=32, out_channels=32, num_res_blocks=1,
                                     attention_resolutions=(1, 2), channel_mult=(1, 2), num_heads=2)
# official constructor arguments for the same networks
OFFICIAL_UNET_ARGS = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                          num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                          transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False, semb_channels=32)
OFFICIAL_STRUCT_ARGS = dict(image_size=96, in_channels=4, model_channels=32, out_channels=32, num_res_blocks=1,
                            attention_resolutions=[1, 2], dropout=0, channel_mult=[1, 2], conv_resample=True, dims=2,
                            use_checkpoint=False, use_fp16=False, num_heads=2, num_head_channels=-1,
                            use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False)

# the published networks (configs/v15/v15-RestorerID.yaml: unet_config, structcond_stage_config)
OFFICIAL_UNET_FULL_ARGS = dict(OFFICIAL_UNET_ARGS, model_channels=320, attention_resolutions=[4, 2, 1], num_res_blocks=2,
                               channel_mult=[1, 2, 4, 4], num_heads=8, semb_channels=256)
OFFICIAL_STRUCT_FULL_ARGS = dict(OFFICIAL_STRUCT_ARGS, model_channels=256, out_channels=256, num_res_blocks=2,
                                 attention_resolutions=[4, 2, 1], channel_mult=[1, 1, 2, 2], num_heads=4)


def randomise(module: torch.nn.Module, seed: int, norm_jitter: float = 0.1, scale: float = 1.0):
    """Seeded default init, then non-trivial norm affines (every parameter matters, nothing is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * norm_jitter)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (scale / fan_in ** 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def tiny_unet(seed: int = 0) -> RestorerIDUNet:
    return randomise(RestorerIDUNet(TINY_UNET), seed).eval()


def tiny_structure_encoder(seed: int = 1) -> StructureEncoder:
    return randomise(StructureEncoder(TINY_STRUCT), seed).eval()


# --- files in the official layouts, for the loader / nodes / preset / ComfyUI tests ---------------------------
# Our own reduced widths (not compared with the official code): context 64 wide, LoRA rank 8, VAE factor 2.
FILE_UNET = UNetConfig(model_channels=32, num_res_blocks=1, attention_resolutions=(1, 2), channel_mult=(1, 2),
                       num_heads=8, context_dim=64, struct_channels=32, lora_rank=8)
FILE_STRUCT = StructureEncoderConfig(model_channels=32, out_channels=32, num_res_blocks=1,
                                     attention_resolutions=(1, 2), channel_mult=(1, 2), num_heads=4)


def ldm_vae_shapes(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z=4) -> dict:
    """Key -> shape of LDM's AutoencoderKL (first_stage_model.* without the prefix), attn_resolutions []."""
    s = {}

    def norm(p, c):
        s[p + ".weight"], s[p + ".bias"] = (c,), (c,)

    def conv(p, cout, cin, k):
        s[p + ".weight"], s[p + ".bias"] = (cout, cin, k, k), (cout,)

    def res(p, cin, cout):
        norm(p + ".norm1", cin), conv(p + ".conv1", cout, cin, 3), norm(p + ".norm2", cout)
        conv(p + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(p + ".nin_shortcut", cout, cin, 1)

    def mid(p, c):
        res(p + ".mid.block_1", c, c)
        norm(p + ".mid.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.mid.attn_1.{n}", c, c, 1)
        res(p + ".mid.block_2", c, c)

    conv("encoder.conv_in", ch, 3, 3)
    cin = ch
    for i, m in enumerate(ch_mult):
        for j in range(num_res_blocks):
            res(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i != len(ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    mid("encoder", cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", 2 * z, cin, 3)
    conv("quant_conv", 2 * z, 2 * z, 1)
    conv("post_quant_conv", z, z, 1)
    cin = ch * ch_mult[-1]
    conv("decoder.conv_in", cin, z, 3)
    mid("decoder", cin)
    for i in reversed(range(len(ch_mult))):
        for j in range(num_res_blocks + 1):
            res(f"decoder.up.{i}.block.{j}", cin, ch * ch_mult[i])
            cin = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", 3, cin, 3)
    return s


def _random(shapes: dict, gen, std=0.05) -> dict:
    out = {}
    for k, shape in shapes.items():
        if len(shape) == 1 and "norm" in k and k.endswith("weight"):
            out[k] = 1 + torch.randn(shape, generator=gen) * 0.05
        elif len(shape) == 1:
            out[k] = torch.randn(shape, generator=gen) * 0.02
        else:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            out[k] = torch.randn(shape, generator=gen) / fan_in ** 0.5
    return out


def image_proj_shapes(id_dim=512, embed=64, clip=32, depth=1, tokens=4) -> dict:
    """ProjPlusModel keys (ip-adapter-faceid-plus_sd15.bin['image_proj']); dim_head 64 as the official."""
    s = {"proj.0.weight": (2 * id_dim, id_dim), "proj.0.bias": (2 * id_dim,), "proj.2.weight": (embed * tokens, 2 * id_dim),
         "proj.2.bias": (embed * tokens,), "norm.weight": (embed,), "norm.bias": (embed,),
         "perceiver_resampler.proj_in.weight": (embed, clip), "perceiver_resampler.proj_in.bias": (embed,),
         "perceiver_resampler.proj_out.weight": (embed, embed), "perceiver_resampler.proj_out.bias": (embed,),
         "perceiver_resampler.norm_out.weight": (embed,), "perceiver_resampler.norm_out.bias": (embed,)}
    for i in range(depth):
        p = f"perceiver_resampler.layers.{i}."
        s.update({p + "0.norm1.weight": (embed,), p + "0.norm1.bias": (embed,), p + "0.norm2.weight": (embed,),
                  p + "0.norm2.bias": (embed,), p + "0.to_q.weight": (embed, embed),
                  p + "0.to_kv.weight": (2 * embed, embed), p + "0.to_out.weight": (embed, embed),
                  p + "1.0.weight": (embed,), p + "1.0.bias": (embed,), p + "1.1.weight": (4 * embed, embed),
                  p + "1.3.weight": (embed, 4 * embed)})
    return s


def make_restorerid_files(root, seed=0, optional_prefixes=True, fmt="ckpt", checkpoint_only=False) -> dict:
    """models/restorer_id/RestorerIDFull.ckpt + models/ipadapter/ip-adapter-faceid-plus_sd15.bin +
    models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K/ + models/diffusers/stable-diffusion-v1-5/{text_encoder,
    tokenizer}: tiny, random, in the official layouts. Returns the paths."""
    import os
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from onestep_models import _tiny_text_encoder

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = randomise(RestorerIDUNet(FILE_UNET), seed)
    struct = randomise(StructureEncoder(FILE_STRUCT), seed + 1)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({f"structcond_stage_model.{k}": v for k, v in struct.state_dict().items()})
    sd.update({f"first_stage_model.{k}": v for k, v in _random(ldm_vae_shapes(32, (1, 2), 1, 4), g).items()})
    sd["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    if optional_prefixes:
        sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(64)
        sd["Adapter.image_proj_model.norm.weight"] = torch.ones(64)
    paths = {}
    folder = os.path.join(root, "restorer_id")
    os.makedirs(folder, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        paths["checkpoint"] = os.path.join(folder, "RestorerIDFull.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, paths["checkpoint"])
    else:
        paths["checkpoint"] = os.path.join(folder, "RestorerIDFull.ckpt")
        torch.save({"state_dict": sd, "global_step": 1, "epoch": 0}, paths["checkpoint"])
    if checkpoint_only:
        return paths
    os.makedirs(os.path.join(root, "ipadapter"), exist_ok=True)
    paths["ip_adapter"] = os.path.join(root, "ipadapter", "ip-adapter-faceid-plus_sd15.bin")
    torch.save({"image_proj": _random(image_proj_shapes(), g), "ip_adapter": {}}, paths["ip_adapter"])
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=32, image_size=224, projection_dim=16, hidden_act="gelu")
    paths["image_encoder"] = os.path.join(root, "clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K")
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(paths["image_encoder"])
    paths["text_encoder"] = os.path.join(root, "diffusers", "stable-diffusion-v1-5")
    _tiny_text_encoder(paths["text_encoder"], hidden=64)
    return paths


def export_tiny_arcface(path, seed=0):
    """A random ONNX network with ArcFace's I/O ([N,3,112,112] -> [N,512]), as tests/test_iqa_face_id.py makes."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, 4), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, 2),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(512)).eval()
    x = torch.rand(1, 3, 112, 112)
    net(x)
    torch.onnx.export(net, x, str(path), input_names=["input.1"], output_names=["embedding"],
                      dynamic_axes={"input.1": {0: "N"}, "embedding": {0: "N"}}, dynamo=False)
    return net


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A models folder with the tiny RestorerID files and a tiny ArcFace, set as the search path for a module."""
    from facemend.host import model_paths

    root = tmp_path_factory.mktemp("models")
    make_restorerid_files(str(root))
    (root / "insightface" / "models" / "buffalo_l").mkdir(parents=True)
    export_tiny_arcface(root / "insightface" / "models" / "buffalo_l" / "w600k_r50.onnx")
    model_paths.set_models_dirs([str(root)])
    yield root
    model_paths.set_models_dirs([])
