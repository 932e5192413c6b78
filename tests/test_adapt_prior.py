"""The diffusion prior (pipelines/adapt/prior.py, schedule.py) against DifFace's official guided-diffusion code.

A tiny prior (32 px, 3 levels with per-level block counts, attention at absolute sizes 16 and 8, 16-channel
heads, scale-shift norm, learned-range output) is built with the official `UNetModel`, given random weights
everywhere (the official zero-initialised layers would hide errors), saved as the official file is (a bare
state dict, optionally `module.`-prefixed) and loaded strictly by ours. The real size is checked key by key and
shape by shape against reference/layouts/keys_iddpm_ffhq512_ema500000.txt without allocating it (meta device).

Tolerance: same operations in the same order on the same CPU; measured max |diff| 0 to ~1e-6 on outputs of
magnitude ~10 (float32 convolutions may pick other algorithms for other shapes): 1e-4 relative.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facemend.pipelines.adapt.prior import (PriorUNet, PriorUNetConfig, config_from_state_dict, load_prior_unet)
from facemend.pipelines.adapt.schedule import SpacedSchedule
from facemend.pipelines.io.errors import ModelFileInvalid

from adapt_official import difface_unet, ufr_diffusion
from conftest import float_casts_follow, modules_reorder_tol, need_shared

TINY = dict(image_size=32, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=[1, 2, 1],
            attention_resolutions=[16, 8], dropout=0, channel_mult=[1, 1, 2], conv_resample=True, dims=2,
            use_fp16=False, num_head_channels=16, use_scale_shift_norm=True, resblock_updown=False,
            use_new_attention_order=False)


def _randomise(net, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return net.eval()


def tiny_official(seed: int = 0):
    """The official UNetModel, tiny, random weights (skips without the DifFace checkout)."""
    return _randomise(difface_unet()(**TINY), seed)


def tiny_prior(seed: int = 0) -> PriorUNet:
    """Ours with the same random weights as tiny_official(seed) (the parameters come in the same order): for the
    tests that only need a prior, so they run without the official code."""
    return _randomise(PriorUNet(tiny_config()), seed)


def tiny_config() -> PriorUNetConfig:
    return PriorUNetConfig(image_size=32, model_channels=32, num_res_blocks=(1, 2, 1), attention_resolutions=(16, 8),
                           channel_mult=(1, 1, 2), num_head_channels=16)


def test_tiny_prior_loads_strictly_and_equals_official(tmp_path):
    ref = tiny_official()
    sd = ref.state_dict()
    plain, wrapped = tmp_path / "prior.pth", tmp_path / "prior_ddp.pth"
    torch.save(sd, plain)
    torch.save({f"module.{k}": v for k, v in sd.items()}, wrapped)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([999, 357])
    with torch.no_grad():
        want = ref(x, t)
    for path in (plain, wrapped):
        ours = load_prior_unet(str(path), config=tiny_config())
        with torch.no_grad():
            got = ours(x, t)
        assert got.shape == (2, 6, 32, 32)
        # each side's float32 error against its float64 run (both cast to float32 around GroupNorm and softmax,
        # as the official code does for fp16; in the float64 run those casts follow), 2x each
        def call(m, x_):
            with float_casts_follow(x_.dtype, m):
                return m(x_, t)

        with torch.no_grad():
            tol = modules_reorder_tol(call, ours, x, margin=2.0) + modules_reorder_tol(call, ref, x, margin=2.0)
        assert (got - want).abs().max() < tol
    # Without a config the architecture comes from the shapes (image size and head width given).
    inferred = config_from_state_dict(sd, image_size=32, num_head_channels=16)
    assert inferred == tiny_config()


@pytest.mark.parametrize("scale_shift", [True, False])
def test_inference_path_is_the_autograd_path_bit_for_bit(scale_shift):
    """Without autograd the UNet works in place and projects every block's time embedding in one product: the
    same operations on the same values, so the same bits. New weights (load_state_dict) are picked up."""
    import dataclasses

    torch.manual_seed(2)
    net = PriorUNet(dataclasses.replace(tiny_config(), use_scale_shift_norm=scale_shift)).eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([999, 357])
    for _ in range(2):
        with torch.enable_grad():
            want = net(x, t)
        with torch.no_grad():
            got = net(x, t)
        assert torch.equal(got, want)
        sd = {k: v * 1.5 if v.is_floating_point() else v for k, v in net.state_dict().items()}
        net.load_state_dict(sd)                                    # second round: the stacked weights refresh
    # A model loaded under inference_mode (as ComfyUI loads models) holds inference tensors, which have no version
    # counter: the same bits, and new weights loaded there are picked up as well.
    with torch.inference_mode():
        frozen = PriorUNet(dataclasses.replace(tiny_config(), use_scale_shift_norm=scale_shift)).eval()
        frozen.load_state_dict(net.state_dict())
        for _ in range(2):
            assert frozen.time_embed[0].weight.is_inference()
            assert torch.equal(frozen(x, t), net(x, t))
            sd = {k: v * 0.5 if v.is_floating_point() else v for k, v in frozen.state_dict().items()}
            frozen.load_state_dict(sd)
            net.load_state_dict(sd)


def test_tiny_prior_has_the_official_random_weights():
    """tiny_prior (ours, for the mechanics tests) and tiny_official draw the same weights: the tests that compare
    with the official code and those that need only a prior use the same network."""
    ours, ref = tiny_prior(3).state_dict(), tiny_official(3).state_dict()
    assert list(ours) == list(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_prior_refuses_damaged_files_naming_them(tmp_path):
    sd = tiny_prior().state_dict()
    missing = dict(sd)
    missing.pop("middle_block.1.qkv.weight")
    extra = dict(sd, **{"extra.weight": torch.zeros(1)})
    wrong = dict(sd)
    wrong["out.2.weight"] = torch.zeros(6, 32, 1, 1)
    for name, bad in (("missing.pth", missing), ("extra.pth", extra), ("wrong.pth", wrong)):
        path = tmp_path / name
        torch.save(bad, path)
        with pytest.raises(ModelFileInvalid, match=name):
            load_prior_unet(str(path), config=tiny_config())
    junk = tmp_path / "junk.pth"
    torch.save({"conv.weight": torch.zeros(1)}, junk)
    with pytest.raises(ModelFileInvalid, match="junk.pth"):
        load_prior_unet(str(junk))


def _layout():
    path = need_shared("reference", "layouts", "keys_iddpm_ffhq512_ema500000.txt")
    rows = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        rows[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return rows


def test_real_size_layout_matches_released_file_keys():
    rows = _layout()
    with torch.device("meta"):
        net = PriorUNet(PriorUNetConfig())
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert list(own) == list(rows)                  # 630 keys, the released order
    assert own == rows
    assert len(own) == 630
    assert 159.7e6 < sum(int(np.prod(s)) for s in own.values()) < 159.9e6
    # The released shapes alone give back the official configuration.
    meta_sd = {k: torch.empty(s, device="meta") for k, s in rows.items()}
    assert config_from_state_dict(meta_sd) == PriorUNetConfig()


def test_respaced_schedule_equals_official():
    create, _ = ufr_diffusion()
    off = create("250")
    ours = SpacedSchedule("250")
    assert ours.timestep_map == off.timestep_map
    assert (ours.timestep_map[89], ours.timestep_map[90], ours.timestep_map[150], ours.timestep_map[249]) == \
        (357, 361, 602, 999)
    for name in ("betas", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(off, name), err_msg=name)
