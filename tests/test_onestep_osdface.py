"""OSDFace backend against the official code (jkwang28/OSDFace at its pin) on tiny random weights in the official
layouts: the embedder's tokens (default and concatenated + position-table paths), the whole one-step output with the
merged LoRA (--merge_lora) and with the applied one (diffusers' load_lora_weights), the full-size key layouts from the
official constructors, and the file errors."""
import copy
import inspect
import os
import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from conftest import reorder_tol, rounding_bound  # noqa: E402
from official_code import official_dir  # noqa: E402
from osdface_models import (SETSTATE_CALLS, TINY_EMBEDDER, make_osdface, official_args, official_embedder,  # noqa: E402
                            official_model, official_modules)
from facemend.pipelines.diffusion.osdface import (EmbedderConfig, EmbeddingChange, VisualEmbedder,  # noqa: E402
                                                  load_embedder, load_osdface)
from facemend.pipelines.io.errors import ModelFileInvalid, ModelFileNotFound  # noqa: E402

OFFICIAL = "jkwang28/OSDFace"
TINY = EmbedderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_EMBEDDER.items()})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)
    return make_osdface(str(tmp_path_factory.mktemp("models")))


def _face(seed=0, n=1):
    """A smooth random 'face' at 512 (the official input size), [N,3,512,512] in [0,1]."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 32, 32, generator=g)
    return torch.nn.functional.interpolate(small, size=(512, 512), mode="bicubic", align_corners=False).clamp(0, 1)


def _features(emb: VisualEmbedder, lq, dtype):
    """The encoder output the selection reads ([N, hw, C]), with the embedder cast to dtype."""
    m = copy.deepcopy(emb).to(dtype)
    with torch.no_grad():
        x = torch.nn.functional.interpolate(lq.to(dtype), size=(512, 512), mode="bilinear", align_corners=False)
        h = m.quant_conv(m.encoder((x - 0.5) / 0.5))
    return h.permute(0, 2, 3, 1).reshape(h.shape[0], -1, h.shape[1]), m.quantize.embedding.weight


def _distances(z, e):
    return torch.sum(z ** 2, dim=2, keepdim=True) + torch.sum(e ** 2, dim=1) - 2 * torch.matmul(z, e.t())


def _assert_selection_is_well_posed(f32, f64):
    """Token selection is discrete: it is reproducible across float orders (another CPU, thread count, the official
    op order) only when the float error of the distances (measured: float32 against float64, x4 as reorder_tol)
    can neither change a position's nearest code nor the order in which the first 77 distinct codes are first
    reached (two codes whose best distances are that close)."""
    d32, d64 = _distances(*f32), _distances(*f64)
    tol = 4 * (d32.double() - d64).abs().max().item()
    two = d64.topk(2, dim=2, largest=False)
    best, code = two.values[..., 0], two.indices[..., 0]
    first = torch.full((best.shape[0], d64.shape[2]), float("inf"), dtype=torch.float64)
    first = first.scatter_reduce(1, code, best, reduce="amin").sort(dim=1).values
    reached = first[:, :78][torch.isfinite(first[:, :78])]
    assert (two.values[..., 1] - best).min() > tol and reached.diff().min() > tol, tol


def test_full_size_layouts_follow_the_official_constructors():
    odir = official_dir(OFFICIAL)
    with official_modules(odir) as (infer, lq_embed):
        from lq_embed.vqvae import VQVAEencoder

        sig = inspect.signature(lq_embed.vqvae_encoder.__init__).parameters
        kw = {k: p.default for k, p in sig.items() if k not in ("self", "args") and p.default is not p.empty}
        assert kw["n_min"] == 77 and kw["embed_dim"] == 512
        args = official_args("", "", merge=True)
        with torch.device("meta"):
            ref = VQVAEencoder(args=args, **kw)
            ours = VisualEmbedder(EmbedderConfig())
            ref_change, our_change = lq_embed.TwoLayerConv1x1(512, 1024), EmbeddingChange(512, 1024)
    for a, b in ((ref, ours), (ref_change, our_change)):
        sa = {k: tuple(v.shape) for k, v in a.state_dict().items()}
        sb = {k: tuple(v.shape) for k, v in b.state_dict().items()}
        assert sa == sb
    assert ours.cfg.latent_w == 16 and sum(v.numel() for v in ours.state_dict().values()) > 20_000_000


@pytest.mark.parametrize("concat,pos", [(False, False), (True, True)], ids=["default", "concat+pos"])
def test_tokens_equal_the_official_embedder(files, concat, pos):
    base, own = files
    odir = official_dir(OFFICIAL)
    lq = _face(1) * 2 - 1
    cfg = EmbedderConfig(**{**TINY.__dict__, "concat": concat, "pos_embedding": pos})
    ours = load_embedder(os.path.join(own, "associate_2.ckpt"), concat=concat, pos_embedding=pos)
    assert ours.cfg == cfg
    assert not SETSTATE_CALLS  # the pickled callback class was read as an inert stand-in
    with official_modules(odir) as (infer, lq_embed):
        ref = official_embedder(lq_embed, official_args(base, own, merge=True, concat=concat, pos=pos))
        with torch.no_grad():
            want = ref(lq)
            got = ours(lq)
            # the continuous features before the selection, within float reordering of this network
            x = torch.nn.functional.interpolate(lq, size=(512, 512), mode="bilinear", align_corners=False)
            feat_ref = ref.encoder.quant_conv(ref.encoder.encoder((x - 0.5) / 0.5)[0]["out"])
    f32, f64 = _features(ours, lq, torch.float32), _features(ours, lq, torch.float64)
    tol = 4 * max((f32[0].double() - f64[0]).abs().max().item(), rounding_bound(1, evaluations=1))
    feat_ref = feat_ref.permute(0, 2, 3, 1).reshape(f32[0].shape)
    assert (f32[0] - feat_ref).abs().max() <= tol
    _assert_selection_is_well_posed(f32, f64)
    assert got.shape == want.shape == (1, 77, 1024 if concat else 512)
    if pos:  # the table: numpy float64 sin/cos there, torch here, both rounded to float32
        assert (got - want).abs().max() <= torch.finfo(torch.float32).eps
    else:
        assert torch.equal(got, want)  # rows of the codebook, picked identically
    assert (got.abs().sum(2) > 0).sum() >= 20  # many distinct codes (fewer than 77 here: the zero rows are checked too)


@pytest.mark.parametrize("mode", ["merged", "applied"])
def test_one_step_equals_official_infer(files, mode):
    base, own = files
    odir = official_dir(OFFICIAL)
    if mode == "applied":
        pytest.importorskip("peft")  # diffusers' load_lora_weights, the official applied path, needs it
    face = _face(2)
    ours = load_osdface(base, own, lora_mode=mode)  # the tiny widths read off the file, as for the real one
    assert ours.embedder.cfg == TINY
    got = ours(face, seed=7)
    with official_modules(odir) as (infer, lq_embed):
        ref = official_model(infer, lq_embed, official_args(base, own, merge=mode == "merged"))
        torch.manual_seed(7)  # diffusers' latent_dist.sample() draws from the global generator
        want = ref(face * 2 - 1)

    def run(dt):
        m = copy.deepcopy(ours).to(dtype=dt)
        return m.run(face, seed=7)

    tol = reorder_tol(run)
    assert got.shape == want.shape == (1, 3, 512, 512)
    assert (got - want).abs().max().item() <= tol, (got - want).abs().max().item()
    assert tol < 1e-3  # a meaningful bound (no token flipped between the float32 and float64 runs)


def test_faces_batch_with_the_posterior_mean(files):
    base, own = files
    face = _face(3)
    model = load_osdface(base, own, latent="mean")
    two = torch.cat([face, _face(4)])
    one, both = model(face), model(two)
    # two float32 results in two orders (alone / in a batch: the tiny VAE decoder's batched kernels round
    # differently): apart by at most the sum of their measured distances to the exact one (x4 as reorder_tol)
    tol = reorder_tol(lambda dt: copy.deepcopy(model).to(dtype=dt).run(face))
    tol += reorder_tol(lambda dt: copy.deepcopy(model).to(dtype=dt).run(two)[:1])
    assert (both[:1] - one).abs().max() <= tol
    assert torch.equal(model(face), one)  # no randomness with the mean


def test_every_tensor_moves_with_the_model(files):
    """Nothing the step reads is a plain tensor attribute left behind by .to(): only parameters and buffers."""
    base, own = files
    for mode in ("merged", "applied"):
        model = load_osdface(base, own, lora_mode=mode, embedding="concat", pos_embedding=True)
        stray = [f"{name}.{k}" for name, m in model.named_modules() for k, v in vars(m).items()
                 if isinstance(v, torch.Tensor)]
        assert not stray
        model.to("meta")
        assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"meta"}
        assert "embedder.quantize.pos_embedding" in dict(model.named_buffers())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precisions_load_and_run(files, dtype):
    base, own = files
    model = load_osdface(base, own, dtype=dtype, lora_mode="applied", latent="mean")
    assert {p.dtype for p in model.parameters()} == {dtype} and model.embedder.quantize.embedding.weight.dtype == dtype
    out = model(_face(5))
    assert out.dtype == torch.float32 and out.shape == (1, 3, 512, 512)
    assert torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1


def test_single_file_base_gives_the_folder_output(files, tmp_path):
    """SD-2.1-base as one original-layout file (models/checkpoints/v2-1_512-ema-pruned.safetensors) loads into the
    same weights as the diffusers folder; its text encoder tensors are never needed."""
    from diffusers import DDIMScheduler
    from osdface_models import tiny_osd_vae, tiny_sd2_unet, write_sd21_single_file

    from facemend.pipelines.diffusion.sd21_single_file import shipped_config

    _, own = files
    unet, vae = tiny_sd2_unet(), tiny_osd_vae()
    folder = tmp_path / "sd21"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    DDIMScheduler.from_config(shipped_config("scheduler")).save_pretrained(folder / "scheduler")
    single = str(tmp_path / "v2-1_512-tiny.safetensors")
    write_sd21_single_file(single, unet, vae, {"cond_stage_model.model.token_embedding.weight": torch.zeros(4, 8)})
    from safetensors.torch import save_file

    # the LoRA of the tests' other UNet does not fit this one: a LoRA for this UNet
    from onestep_models import random_lora
    from osdface_models import LORA_TARGETS

    lora_dir = tmp_path / "osdface"
    shutil.copytree(own, lora_dir)
    save_file(random_lora(unet, LORA_TARGETS, 4, torch.Generator().manual_seed(19), prefix="unet."),
              str(lora_dir / "pytorch_lora_weights.safetensors"))
    a = load_osdface(str(folder), str(lora_dir), latent="mean")
    b = load_osdface(single, str(lora_dir), latent="mean", base_configs=(str(folder / "unet"), str(folder / "vae")))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    face = _face(6)
    assert torch.equal(a(face), b(face))
    # the shipped configs are SD-2.1-base's architecture
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        n_unet = sum(p.numel() for p in UNet2DConditionModel.from_config(shipped_config("unet")).parameters())
        n_vae = sum(p.numel() for p in AutoencoderKL.from_config(shipped_config("vae")).parameters())
    assert (n_unet, n_vae) == (865910724, 83653863)
    with pytest.raises(ModelFileInvalid, match="UNet does not fit the SD-2.1-base config"):
        load_osdface(single, str(lora_dir))  # the tiny file against the real-size shipped configs
    sd1 = str(tmp_path / "v1-5-like.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 768)},
              sd1)
    with pytest.raises(ModelFileInvalid, match="not a Stable Diffusion 2.x checkpoint: it holds a Stable Diffusion 1"):
        load_osdface(sd1, str(lora_dir))
    with pytest.raises(ModelFileNotFound, match="v2-1_512-ema-pruned.safetensors"):
        load_osdface(str(tmp_path / "absent.safetensors"), str(lora_dir))


def test_file_errors_name_the_file(files, tmp_path):
    base, own = files
    bad = tmp_path / "osdface"
    shutil.copytree(own, bad)
    os.remove(bad / "embedding_change_weights.pth")
    with pytest.raises(ModelFileNotFound, match="embedding_change_weights.pth"):
        load_osdface(base, str(bad))
    # the concatenated variant does not need it
    shutil.copy(os.path.join(own, "pytorch_lora_weights.safetensors"), bad / "x.safetensors")
    torch.save({"state_dict": {"vqvae_LQ.quant_conv.weight": torch.zeros(1)}}, bad / "associate_2.ckpt")
    with pytest.raises(ModelFileInvalid, match="associate_2.ckpt.*vqvae_LQ.encoder.conv_in.weight"):
        load_osdface(base, str(bad), embedding="concat")
    torch.save({"conv1.weight": torch.zeros(256, 512, 1)}, bad / "embedding_change_weights.pth")
    shutil.copy(os.path.join(own, "associate_2.ckpt"), bad / "associate_2.ckpt")
    with pytest.raises(ModelFileInvalid, match="embedding_change_weights.pth.*missing keys"):
        load_osdface(base, str(bad))
    shutil.copy(os.path.join(own, "embedding_change_weights.pth"), bad / "embedding_change_weights.pth")
    from safetensors.torch import save_file

    save_file({"text_encoder.x.lora_A.weight": torch.zeros(4, 4)}, str(bad / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ModelFileInvalid, match="pytorch_lora_weights.safetensors.*UNet weights only"):
        load_osdface(base, str(bad))
    with pytest.raises(ModelFileInvalid, match="associate_2.ckpt.*missing keys"):  # full-size widths do not fit
        load_osdface(base, own, embedder_config=EmbedderConfig())
