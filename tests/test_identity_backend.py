"""RestorerID backend (pipelines/identity/) against the official modules, on tiny random-weight networks.

Reference: YingJiacheng/RestorerID @157e288 imported test-only (tests/restorerid_official.py): its
UNetModelRestorerID, EncoderUNetModelWT, IDBalance and DDIMSampler.ddim_sampling_sr_t. The official schedule
is registered the way scripts/Inference.py does it (linear betas, then the 1000-of-1000 respacing, both through
the official register path in float32), and the eta noise of its sampler is injected through its `noise_like`.
Tiny config: UNet widths 32/64, one ResBlock per level, attention at both levels, structure features 32 wide,
latent 16x16; the context stays 768 wide and the LoRA rank 128 (hard-coded in the official blocks).

Tolerances come from the computation (conftest.modules_reorder_tol): ours and the official each run in float32
against float64 copies of themselves; the two float32 results are apart by at most the sum of the two errors (2x
each: another order's error, other CPUs/threads, may exceed the one sampled). The official attention (einsum,
softmax after a scale) rounds several times more than our SDPA, so the official's own error has to be measured.
The sampler runs in float64 too when given float64 latents; its float64 schedule against the official float32 one
is a rounding of the same size.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facemend.pipelines.identity.sampler import ddim_plan, ddim_sample, spaced_timesteps
from facemend.pipelines.identity.structure_encoder import StructureEncoder
from facemend.pipelines.identity.unet import IDBalance, LoRAAttention, RestorerIDUNet

import restorerid_official as ro
from conftest import float_casts_follow, modules_reorder_tol, rounding_bound
from restorerid_models import OFFICIAL_STRUCT_ARGS, OFFICIAL_UNET_ARGS, randomise, tiny_structure_encoder, tiny_unet

LAYOUTS = "keys_restorerid_unet.txt", "keys_restorerid_structcond.txt"


def _official_tol(fn, *args):
    """modules_reorder_tol (margin 2) of an official call fn(*args)."""
    def run(*a):
        dtype = next(x.dtype for x in a if isinstance(x, torch.Tensor) and x.is_floating_point())
        with float_casts_follow(dtype, *(x for x in a if isinstance(x, torch.nn.Module))):
            return fn(*a)

    return modules_reorder_tol(run, *args, margin=2.0)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return ro.load_official(str(tmp_path_factory.mktemp("restorerid")))


@pytest.fixture(scope="module")
def nets(official):
    torch.manual_seed(0)
    unet, enc = tiny_unet(), tiny_structure_encoder()
    return (unet, enc) + ro.official_nets(official, unet, enc, OFFICIAL_UNET_ARGS, OFFICIAL_STRUCT_ARGS)


def _inputs(b=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, 16, 16, generator=g), torch.randn(b, 4, 16, 16, generator=g),
            torch.randn(b, 81, 768, generator=g))


def test_full_size_layout_is_the_official_one():
    """Full-size networks (on the meta device) have exactly the keys and shapes of the official dumps."""
    from conftest import SHARED

    folder = SHARED / "reference" / "layouts"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    with torch.device("meta"):
        nets_ = {LAYOUTS[0]: RestorerIDUNet(), LAYOUTS[1]: StructureEncoder()}
    for name, net in nets_.items():
        ref = {}
        for line in (folder / name).read_text().splitlines():
            key, shape = line.split("\t")
            ref[key.split(".", 2)[-1] if key.startswith("model.") else key.split(".", 1)[1]] = tuple(eval(shape))
        own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        assert own == ref, name


def test_one_call_equals_official(nets):
    unet, enc, o_unet, o_enc = nets
    lq, x, ctx = _inputs()
    t = torch.tensor([999, 41])
    with torch.no_grad():
        s, o_s = enc(lq, t), o_enc(lq, t)
        assert s.keys() == o_s.keys() == {"16", "8"}
        for k in s:
            tol = modules_reorder_tol(lambda en, l_: en(l_, t)[k], enc, lq, margin=2.0) + _official_tol(
                lambda en, l_: en(l_, t)[k], o_enc, lq)
            assert (s[k] - o_s[k]).abs().max() < tol
        for scale in (0.164, torch.tensor([0.3, 1.7])):
            e = unet(x, t, ctx, s, scale)
            o_e = o_unet(x, t, context=ctx, struct_cond=o_s, ip_scale=scale)
            assert o_e.abs().max() > 1e-2  # the comparison is not between zeros
            tol = modules_reorder_tol(lambda u, en, x_, c_, l_: u(x_, t, c_, en(l_, t), scale),
                                      unet, enc, x, ctx, lq, margin=2.0)
            tol += _official_tol(lambda u, en, x_, c_, l_: u(x_, t, context=c_, struct_cond=en(l_, t), ip_scale=scale),
                                 o_unet, o_enc, x, ctx, lq)
            assert (e - o_e).abs().max() < tol


def test_idbalance_equals_official(official):
    ours = randomise(IDBalance(64, 32), seed=3).eval()
    theirs = official["IDBalance"].IDBalance(64, 32).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(4)
    h, s, ref = torch.randn(2, 64, 8, 8, generator=g), torch.randn(2, 32, 8, 8, generator=g), torch.randn(2, 4, 768, generator=g)
    with torch.no_grad():
        a, b = ours(h, s, ref), theirs(h, {"8": s}, ref)
    tol = modules_reorder_tol(lambda m, *v: m(*v), ours, h, s, ref, margin=2.0) + _official_tol(
        lambda m, h_, s_, r_: m(h_, {"8": s_}, r_), theirs, h, s, ref)
    assert b.abs().max() > 1e-2 and (a - b).abs().max() < tol


class _OfficialModelShim(torch.nn.Module):
    """What DDIMSampler reads from LatentDiffusionRestorerID, with the schedule registered as Inference.py does."""

    parameterization = "eps"

    def __init__(self, unet, enc, util):
        super().__init__()
        self.unet, self.structcond_stage_model = unet, enc
        betas = util.make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.0120)
        self._register(betas)
        ac = self.alphas_cumprod
        last, new = 1.0, []
        for a in ac:  # the 1000-of-1000 respacing of Inference.py, in float32 torch as there
            new.append(1 - a / last)
            last = a
        self._register(np.array([b.numpy() for b in new]))
        self.num_timesteps = 1000

    def _register(self, betas):
        alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
        self.betas = torch.tensor(betas, dtype=torch.float32)
        self.alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float32)
        self.alphas_cumprod_prev = torch.tensor(np.append(1.0, alphas_cumprod[:-1]), dtype=torch.float32)

    @property
    def device(self):
        return torch.device("cpu")

    def apply_model(self, x, t, c, struct_c, ip_scale):
        return self.unet(x, t, context=c, struct_cond=struct_c, ip_scale=ip_scale)


def _official_sample(official, o_unet, o_enc, lq, cond, uncond, scale, steps, cfg, x_T, noises, monkeypatch):
    ddim = official["ddim"]
    model = _OfficialModelShim(o_unet, o_enc, official["util"])
    monkeypatch.setattr(ddim.DDIMSampler, "register_buffer", lambda self, name, attr: setattr(self, name, attr))
    it = iter(noises)
    monkeypatch.setattr(ddim, "noise_like", lambda shape, device, repeat=False: next(it))
    sampler = ddim.DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=steps, ddim_eta=1.0, verbose=False)
    timesteps = np.array(sorted(ddim.space_timesteps(1000, [steps])))
    samples, _ = sampler.ddim_sampling_sr_t(cond=cond, struct_cond=lq, ipscale=scale, shape=lq.shape,
                                            unconditional_conditioning=uncond, unconditional_guidance_scale=cfg,
                                            timesteps=timesteps, x_T=x_T)
    return samples


@pytest.mark.parametrize("steps,cfg,scale", [(4, 4.0, 0.5), (3, 1.0, 1.3)])
def test_sampler_equals_official(nets, official, monkeypatch, steps, cfg, scale):
    unet, enc, o_unet, o_enc = nets
    lq, x_T, cond = _inputs(seed=7)
    uncond = torch.randn(cond.shape, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(9)
    noises = [torch.randn(lq.shape, generator=g) for _ in range(steps)]
    with torch.no_grad():
        ref = _official_sample(official, o_unet, o_enc, lq, cond, uncond, scale, steps, cfg, x_T, noises, monkeypatch)
    ours = ddim_sample(unet, enc, lq, cond, uncond, ip_scale=scale, steps=steps, cfg=cfg, x_T=x_T,
                       noise=lambda i: noises[i])
    with torch.no_grad():
        tol = modules_reorder_tol(
            lambda u, en, l_, c_, uc, xt, *nz: ddim_sample(u, en, l_, c_, uc, ip_scale=scale, steps=steps, cfg=cfg,
                                                         x_T=xt, noise=lambda i: nz[i]),
            unet, enc, lq, cond, uncond, x_T, *noises, margin=2.0)
        tol += _official_tol(lambda u, en, l_, c_, uc, xt, *nz: _official_sample(
            official, u, en, l_, c_, uc, scale, steps, cfg, xt, nz, monkeypatch), o_unet, o_enc, lq, cond, uncond, x_T,
            *noises)
        # the official's float32 schedule (ours: float64): about 4 rounded coefficients per step
        tol += rounding_bound(4 * steps, float(ref.abs().max()), evaluations=1)
    assert (ours - ref).abs().max() < tol
    assert (ours - x_T).abs().max() > 0.1  # the sampler did move the latents


def test_plan_reproduces_the_official_timestep_quirk():
    plan = ddim_plan(50)
    assert plan.timesteps[:3] == [999, 979, 958] and plan.timesteps[-2:] == [20, 0]
    assert spaced_timesteps(1000, 50)[:4] == [0, 20, 41, 61]
    from facemend.pipelines.identity.sampler import alphas_cumprod

    ac = alphas_cumprod()
    assert float(plan.alphas[0]) == float(ac[980]) and float(plan.alphas_prev[0]) == float(ac[960])
    # the last step: alpha_t = alpha_prev = alpha-bar(0), sigma 0 -> x is returned unchanged
    assert float(plan.alphas[-1]) == float(plan.alphas_prev[-1]) == float(ac[0]) and float(plan.sigmas[-1]) == 0.0
    assert len(ddim_plan(30)) == 30 and float(ddim_plan(30).alphas[0]) == float(ac[29 * 33])


def test_scale_zero_is_exactly_no_id_branch():
    """With scale 0 the ID cross-attention weights have no influence at all (bit-identical outputs)."""
    unet, enc = tiny_unet(), tiny_structure_encoder()
    lq, x, ctx = _inputs()
    t = torch.tensor([500, 500])
    with torch.no_grad():
        s = enc(lq, t)
        a = unet(x, t, ctx, s, 0.0)
        for m in unet.modules():
            if isinstance(m, LoRAAttention) and m.ip:
                m.to_k_ip.weight.normal_()
                m.to_v_ip.weight.normal_()
        assert torch.equal(unet(x, t, ctx, s, 0.0), a)
        assert not torch.allclose(unet(x, t, ctx, s, 0.5), a)


def test_cross_attention_is_affine_in_the_scale():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(11)
    for m in [m for m in unet.modules() if isinstance(m, LoRAAttention) and m.ip][:4]:
        dim = m.to_q.in_features
        x, ctx = torch.randn(2, 10, dim, generator=g), torch.randn(2, 81, 768, generator=g)
        with torch.no_grad():
            f0, f1, f3 = (m(x, ctx, s) for s in (0.0, 1.0, 3.0))
        slope = f1 - f0
        assert slope.abs().max() > 1e-3
        # f3 - 3 f1 + 2 f0: each evaluation's own rounding (measured, 2x for another order) with its weight,
        # plus the 3 operations of the check itself
        tol = sum(w * modules_reorder_tol(lambda mm, x_, c_: mm(x_, c_, sc), m, x, ctx, margin=2.0)
                  for w, sc in ((1, 3.0), (3, 1.0), (2, 0.0)))
        tol += rounding_bound(3, float(f3.abs().max() + 3 * slope.abs().max()))
        assert (f3 - (f0 + 3 * slope)).abs().max() < tol


def test_faceid_plus_projection_equals_official(tmp_path_factory):
    """diffusers' IPAdapterFaceIDPlusImageProjection, filled by our key conversion, computes the official
    ProjPlusModel (shortcut=False, FaceID-Plus v1) exactly; run at the real 768/512 widths with a 64-wide CLIP."""
    import torch.nn as nn

    from facemend.pipelines.identity.checkpoint import build_image_proj

    ns = ro.official_definitions(str(tmp_path_factory.mktemp("rid")), "ldm/modules/encoders/modules.py",
                                 ["reshape_tensor", "PerceiverAttention", "FeedForward", "FacePerceiverResampler",
                                  "ProjPlusModel"], {"torch": torch, "nn": nn, "math": math})
    torch.manual_seed(0)
    official = ns["ProjPlusModel"](cross_attention_dim=768, id_embeddings_dim=512, clip_embeddings_dim=64).eval()
    randomise(official, seed=2)
    ours = build_image_proj(official.state_dict(), "ip-adapter-faceid-plus_sd15.bin")
    g = torch.Generator().manual_seed(3)
    emb, clip = torch.randn(2, 512, generator=g), torch.randn(2, 257, 64, generator=g)
    with torch.no_grad():
        ref = official(emb, clip, shortcut=False)
        ours.clip_embeds = clip[:, None]
        got = ours(emb)
    assert got.shape == ref.shape == (2, 4, 768)
    def run(o, e, c):
        o.clip_embeds = c[:, None]
        return o(e)

    with torch.no_grad():
        tol = modules_reorder_tol(run, ours, emb, clip)
    assert (got - ref).abs().max() < tol


def test_vae_conversion_equals_official_ldm_autoencoder(tmp_path_factory):
    """first_stage_model.* read into diffusers' AutoencoderKL gives the official LDM Encoder/Decoder's posterior
    mean/std and decoding."""
    import torch.nn as nn
    import numpy as np_

    from facemend.pipelines.identity.checkpoint import build_vae
    from restorerid_models import _random, ldm_vae_shapes

    ns = ro.official_definitions(str(tmp_path_factory.mktemp("rid")), "ldm/modules/diffusionmodules/model.py",
                                 ["Normalize", "nonlinearity", "Upsample", "Downsample", "ResnetBlock", "AttnBlock",
                                  "make_attn", "Encoder", "Decoder"],
                                 {"torch": torch, "nn": nn, "np": np_, "math": math, "XFORMERS_IS_AVAILBLE": False})
    dd = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[], in_channels=3,
              resolution=32, z_channels=4, double_z=True)
    enc, dec = ns["Encoder"](**dd).eval(), ns["Decoder"](**dd).eval()
    sd = _random(ldm_vae_shapes(32, (1, 2), 1, 4), torch.Generator().manual_seed(4))
    enc.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("encoder.")}, strict=True)
    dec.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("decoder.")}, strict=True)
    vae = build_vae(sd, "RestorerIDFull.ckpt")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        moments = nn.functional.conv2d(enc(x), sd["quant_conv.weight"], sd["quant_conv.bias"])
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        dist = vae.encode(x).latent_dist
        ref_dec = dec(nn.functional.conv2d(z, sd["post_quant_conv.weight"], sd["post_quant_conv.bias"]))
        got_dec = vae.decode(z).sample
        tol_mean = modules_reorder_tol(lambda v, x_: v.encode(x_).latent_dist.mean, vae, x)
        tol_std = modules_reorder_tol(lambda v, x_: v.encode(x_).latent_dist.std, vae, x)
        tol_dec = modules_reorder_tol(lambda v, z_: v.decode(z_).sample, vae, z)
    assert (dist.mean - mean).abs().max() < tol_mean and (dist.std - std).abs().max() < tol_std
    assert ref_dec.abs().max() > 1e-2 and (got_dec - ref_dec).abs().max() < tol_dec
