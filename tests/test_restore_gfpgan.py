"""GFPGAN v1.3/v1.4 restorer (pipelines/restore/restorer.py, pipelines/archs/gfpgan.py) against the official code.

Reference: the official `GFPGANv1Clean` from the `gfpgan` wheel (1.3.8; Apache-2.0). `import gfpgan` pulls in
basicsr, which is source-only and imports `torchvision.transforms.functional_tensor` (removed from torchvision),
so the package cannot be imported. Its two architecture files need only three basicsr names
(`ARCH_REGISTRY.register`, `default_init_weights`, and the package path), so they are loaded straight from the
installed wheel under a private package name with stubs for those names; the stubs are removed from sys.modules
afterwards. Install the reference with `pip install --no-deps gfpgan` (its dependencies are not needed); without
it these tests skip and say so.

The GFPGANer path (gfpgan/utils.py, `enhance(has_aligned=True)`) is reproduced literally in
`_gfpganer_restore`: BGR uint8 / 255 (float64) -> float32 -> RGB -> normalize(0.5, 0.5) -> network with its
defaults (randomize_noise=True; the `weight` argument is ignored by the clean arch) -> tensor2img(min_max=(-1,1)).
The official network draws fresh noise on every call; seeding the global RNG on CPU right before the call makes
that reproducible, and FaceRestorer(seed=s) draws the same maps.

Sizes: the v1.4 configuration (channel_multiplier 2, different_w, sft_half) is tested at out_size 64 with
narrow 0.25 (the official class accepts both; the same code paths at ~1/300 of the cost), plus one full 512
checkpoint with exactly the v1.4 keys and shapes (narrow 1): load, config detection, and one 512 forward against
the official GFPGANer path. Half precision is checked on a
narrow 0.125 network at out_size 32 because fp16/bf16 convolutions are ~200x slower than fp32 on these CPUs.

Measured here (random weights, fp32, CPU, output in [0,1]): ours vs official max |diff| ~1e-6 (64) and ~1e-7
(512); batch vs single ~2e-6; half precision: see TOL_HALF.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch

from facemend.pipelines.io.errors import InvalidImage, ModelFileInvalid
from facemend.pipelines.restore.restorer import FaceRestorer

from conftest import bgr_to_ours as _to_ours, need_shared, pair_reorder_tol, restorer_reorder_tol, rounding_bound
from conftest import smooth_faces_bgr

V14 = dict(num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False, num_mlp=8,
           input_is_latent=True, different_w=True, narrow=1, sft_half=True)
# Batch of N vs N single runs (batched vs single-sample conv path): conftest.restorer_reorder_tol, the network's
# own float32 rounding measured against float64 on this machine.
# Half precision vs fp32 on the [0,1] output: max / mean |diff|. Measured on the test's narrowed random network
# (out_size 32, narrow 0.125), batched / single-face path: fp16 1.4e-3 / 9.5e-4 max, 2.2e-4 mean; bf16 1.1e-2 /
# 7.9e-3 max, 1.6e-3 mean. The official network cast to the same dtype: fp16 1.4e-3 max / 2.6e-4 mean, bf16
# 1.3e-2 / 2.1e-3 (bf16 keeps 8 mantissa bits, so ~3/255 worst case is inherent, not ours).
TOL_HALF = {torch.float16: (5e-3, 5e-4), torch.bfloat16: (3e-2, 3e-3)}


# ---------------------------------------------------------------------------------------------------------------
# The official architecture


def _load_official_arch():
    """Import gfpgan/archs/gfpganv1_clean_arch.py from the installed wheel without importing gfpgan/basicsr."""
    try:
        spec = importlib.util.find_spec("gfpgan")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("official reference not installed: `pip install --no-deps gfpgan` (its archs need no deps)")
    arch_dir = os.path.join(list(spec.submodule_search_locations)[0], "archs")
    if not os.path.isfile(os.path.join(arch_dir, "gfpganv1_clean_arch.py")):
        pytest.skip(f"gfpgan wheel without archs/gfpganv1_clean_arch.py in {arch_dir}")

    class _Registry:
        def register(self, *args, **kwargs):
            return lambda obj: obj

    def default_init_weights(module_list, scale=1, bias_fill=0, **kwargs):
        # Initialisation only; every test sets its own seeded weights afterwards.
        if not isinstance(module_list, list):
            module_list = [module_list]
        for module in module_list:
            for m in module.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    torch.nn.init.kaiming_normal_(m.weight, **kwargs)
                    m.weight.data *= scale
                    if m.bias is not None:
                        m.bias.data.fill_(bias_fill)

    stubs = {name: types.ModuleType(name) for name in
             ("basicsr", "basicsr.utils", "basicsr.utils.registry", "basicsr.archs", "basicsr.archs.arch_util")}
    stubs["basicsr.utils.registry"].ARCH_REGISTRY = _Registry()
    stubs["basicsr.archs.arch_util"].default_init_weights = default_init_weights
    pkg_name = "_facemend_reference_gfpgan_archs"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [arch_dir]
    saved = {name: sys.modules.get(name) for name in list(stubs) + [pkg_name]}
    sys.modules.update(stubs)
    sys.modules[pkg_name] = pkg
    try:
        module = importlib.import_module(f"{pkg_name}.gfpganv1_clean_arch")
    finally:
        for name, old in saved.items():
            if name == pkg_name:
                continue
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module.GFPGANv1Clean


@pytest.fixture(scope="module")
def official_cls():
    return _load_official_arch()


def _randomized(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights that exercise every path: non-zero noise strengths and biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".weight") and p.numel() == 1:          # StyleConv noise strength (0 at init)
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("modulation.bias"):                  # styles around 1, as initialised
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def _build_official(cls, out_size: int, seed: int, **overrides):
    torch.manual_seed(seed)
    return _randomized(cls(out_size=out_size, **{**V14, **overrides}), seed)


def _gfpganer_restore(net, faces_bgr_uint8: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """GFPGANer.enhance(has_aligned=True)'s per-face loop, step by step (float output and uint8 output)."""
    import cv2
    from torchvision.transforms.functional import normalize

    floats, uint8s = [], []
    for face in faces_bgr_uint8:
        img = face / 255.                                           # float64, like the official code
        img = cv2.cvtColor(img.astype("float32"), cv2.COLOR_BGR2RGB)  # img2tensor(bgr2rgb=True, float32=True)
        t = torch.from_numpy(img.transpose(2, 0, 1)).float()
        normalize(t, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), inplace=True)
        torch.manual_seed(seed)                                     # the official call draws fresh noise
        with torch.no_grad():
            out = net(t.unsqueeze(0), return_rgb=False, weight=0.5)[0]
        # tensor2img(out.squeeze(0), rgb2bgr=True, min_max=(-1, 1))
        o = out.squeeze(0).float().cpu().clamp_(-1, 1)
        o = (o - (-1)) / (1 - (-1))
        floats.append(o.numpy())                                    # RGB CHW float, before quantisation
        np_img = cv2.cvtColor(o.numpy().transpose(1, 2, 0), cv2.COLOR_RGB2BGR)
        uint8s.append((np_img * 255.0).round().astype("uint8"))
    return np.stack(floats), np.stack(uint8s)


def _faces_uint8(n: int, size: int, seed: int):
    return smooth_faces_bgr(n, size, seed, noise=0.15)


# ---------------------------------------------------------------------------------------------------------------
# Files in the official layouts (out_size 64, v1.4 configuration otherwise)


def _save_layouts(net, d):
    sd = net.state_dict()
    files = {
        "pth_params_ema": d / "GFPGANv1.4-64.pth",
        "safetensors": d / "GFPGANv1.4-64.safetensors",
        "pth_module_params": d / "GFPGANv1.4-64-dp.pth",
    }
    torch.save({"params_ema": sd, "params": {k: v * 0 for k, v in sd.items()}}, files["pth_params_ema"])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(files["safetensors"]))
    torch.save({"params": {f"module.{k}": v for k, v in sd.items()}}, files["pth_module_params"])
    return types.SimpleNamespace(net=net, sd=sd, files=files, dir=d)


@pytest.fixture(scope="module")
def tiny(official_cls, tmp_path_factory):
    """v1.4 configuration at out_size 64 with narrow 0.25 (16x cheaper) for the behaviour tests."""
    return _save_layouts(_build_official(official_cls, 64, seed=1, narrow=0.25),
                         tmp_path_factory.mktemp("gfpgan64n"))


@pytest.fixture(scope="module")
def restorer(tiny):
    return FaceRestorer.from_file(str(tiny.files["pth_params_ema"]))


def test_equivalence_stored_noise_all_layouts(tiny):
    """Every official file layout loads to the same network; stored-noise output equals the official one."""
    x01 = _to_ours(_faces_uint8(2, 64, seed=3))
    with torch.no_grad():
        ref = tiny.net((x01 - 0.5) / 0.5, return_rgb=False, randomize_noise=False)[0]
    ref01 = (ref.clamp(-1, 1) + 1) / 2
    for kind, path in tiny.files.items():
        fr = FaceRestorer.from_file(str(path))
        assert fr.arch == "GFPGANv1Clean" and fr.input_size == 64
        got = fr(x01, noise="stored")
        diff = (got - ref01).abs().max().item()
        tol = restorer_reorder_tol(fr, x01, noise="stored")  # two float32 evaluations of one network
        assert diff <= tol, f"{kind}: max |ours - official| = {diff:.3g} > {tol:.3g}"


def test_equivalence_with_gfpganer_pipeline(tiny, restorer):
    """GFPGANer's exact preprocessing, seeded random noise and tensor2img; every face in one batched call."""
    faces = _faces_uint8(2, 64, seed=4)
    ref_float, ref_uint8 = _gfpganer_restore(tiny.net, faces, seed=7)
    got = restorer(_to_ours(faces), seed=7, batch_size=8)
    diff = (got - torch.from_numpy(ref_float)).abs().max().item()
    tol = restorer_reorder_tol(restorer, _to_ours(faces), seed=7, batch_size=8)
    assert diff <= tol, f"max |ours - GFPGANer| = {diff:.3g} > {tol:.3g}"
    ours_uint8 = (got * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).flip(-1).numpy()
    off = np.abs(ours_uint8.astype(int) - ref_uint8.astype(int))
    assert off.max() <= 1 and (off > 0).mean() < 1e-3, f"uint8 mismatch: {(off > 0).sum()} values"
    # A different seed gives different noise (the official network is stochastic), the same seed the same result.
    assert torch.equal(restorer(_to_ours(faces), seed=7, batch_size=8), got)
    tol = restorer_reorder_tol(restorer, _to_ours(faces), seed=7)
    assert (restorer(_to_ours(faces), seed=7) - got).abs().max() <= tol  # CPU default: one face a call
    assert (restorer(_to_ours(faces), seed=8, batch_size=8) - got).abs().max() > 1e-4


def test_batch_equals_single_runs(restorer):
    x = _to_ours(_faces_uint8(3, 64, seed=5))
    batched = restorer(x, batch_size=2, seed=3)                      # chunks of 2 and 1
    singles = torch.cat([restorer(x[i:i + 1], batch_size=1, seed=3) for i in range(3)])
    assert (batched - singles).abs().max().item() <= restorer_reorder_tol(restorer, x, seed=3)
    stored_b = restorer(x, batch_size=3, noise="stored")
    stored_s = torch.cat([restorer(x[i:i + 1], noise="stored") for i in range(3)])
    assert (stored_b - stored_s).abs().max().item() <= restorer_reorder_tol(restorer, x, noise="stored")


def test_other_sizes_visibility_and_bad_values(restorer):
    x = _to_ours(_faces_uint8(2, 64, seed=6))
    small_in = torch.nn.functional.interpolate(x, size=(40, 48), mode="bilinear", antialias=True)
    out = restorer(small_in, seed=0)
    assert out.shape == small_in.shape and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    big_in = torch.nn.functional.interpolate(x, size=(96, 96), mode="bilinear")
    out_big = restorer(big_in, seed=0)
    assert out_big.shape == big_in.shape
    # The network sees the input resized to its size; output resized back (consistent both ways).
    direct = restorer(torch.nn.functional.interpolate(big_in, size=(64, 64), mode="bilinear", antialias=True),
                      seed=0)
    back = torch.nn.functional.interpolate(direct, size=(96, 96), mode="bicubic", antialias=True).clamp(0, 1)
    assert (out_big - back).abs().max().item() <= restorer_reorder_tol(restorer, big_in, seed=0)
    # visibility: 0 -> input unchanged, 0.5 -> halfway
    assert torch.equal(restorer(small_in, visibility=0.0), small_in)
    half = restorer(small_in, visibility=0.5, seed=0)
    assert (half - (small_in + out) / 2).abs().max().item() <= rounding_bound(3)  # a blend: 3 operations
    # NaN / out-of-range values do not propagate; grayscale and RGBA are accepted; empty batch is fine.
    bad = x[:1].clone()
    bad[..., :8, :8] = float("nan")
    assert torch.isfinite(restorer(bad)).all()
    assert restorer(x[:1, :1]).shape == (1, 3, 64, 64)
    assert restorer(torch.cat([x[:1], torch.ones_like(x[:1, :1])], 1)).shape == (1, 3, 64, 64)
    assert restorer(x[:0]).shape == (0, 3, 64, 64)
    with pytest.raises(InvalidImage):
        restorer(x[0])
    with pytest.raises(ValueError):
        restorer(x, visibility=1.5)


def test_half_precision_close_to_fp32(official_cls, tmp_path):
    """fp16 and bf16 (the GPU settings) against fp32, on a narrowed 32 network (half convs are slow on CPU)."""
    net = _build_official(official_cls, 32, seed=2, narrow=0.125)
    path = tmp_path / "narrow.pth"
    torch.save({"params_ema": net.state_dict()}, path)
    fr = FaceRestorer.from_file(str(path))
    x = _to_ours(_faces_uint8(2, 32, seed=8))
    ref = fr(x, noise="stored")
    # fp16 through the batched (activation-scaling) path, bf16 through the single-face (weight-modulation) path.
    for dtype, batch_size in ((torch.float16, 2), (torch.bfloat16, 1)):
        fr.to(dtype=dtype)
        got = fr(x, noise="stored", batch_size=batch_size)
        fr.to(dtype=torch.float32)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        tol_max, tol_mean = TOL_HALF[dtype]
        d = (got - ref).abs()
        assert d.max().item() < tol_max and d.mean().item() < tol_mean, (dtype, d.max().item(), d.mean().item())


def test_wrong_kind_of_file():
    # A real RetinaFace detector checkpoint in the restorer folder.
    path = need_shared("models", "facedetection", "retinaface_mobilenet0.25_1mb.pth")
    with pytest.raises(ModelFileInvalid, match="RetinaFace") as info:
        FaceRestorer.from_file(str(path))
    assert "GFPGAN" in str(info.value)                          # says what was expected


def test_wrong_or_damaged_restorer_files(tmp_path, tiny):
    # Something unknown: say that nothing matched and what was expected.
    junk = tmp_path / "junk.safetensors"
    from safetensors.torch import save_file

    save_file({"foo.weight": torch.zeros(3, 3)}, str(junk))
    with pytest.raises(ModelFileInvalid, match="GFPGAN"):
        FaceRestorer.from_file(str(junk))
    # An ESRGAN upscaler: named.
    esr = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(64, 3, 3, 3),
                               "body.0.rdb1.conv1.weight": torch.zeros(32, 64, 3, 3)}}, esr)
    with pytest.raises(ModelFileInvalid, match="upscaler"):
        FaceRestorer.from_file(str(esr))
    # A GFPGAN file with a missing tensor: names the key.
    broken = dict(tiny.sd)
    del broken["final_linear.weight"]
    bpath = tmp_path / "broken.pth"
    torch.save({"params_ema": broken}, bpath)
    with pytest.raises(ModelFileInvalid, match="final_linear.weight"):
        FaceRestorer.from_file(str(bpath))
    # Truncated download.
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(tiny.files["pth_params_ema"].read_bytes()[:5000])
    with pytest.raises(ModelFileInvalid):
        FaceRestorer.from_file(str(trunc))
    # Noise buffers are optional (some converted files drop them): still loads.
    no_noise = {k: v for k, v in tiny.sd.items() if ".noises." not in k}
    npath = tmp_path / "no_noise.safetensors"
    save_file({k: v.contiguous() for k, v in no_noise.items()}, str(npath))
    assert FaceRestorer.from_file(str(npath)).arch == "GFPGANv1Clean"


def test_full_size_v14_layout(official_cls, tmp_path):
    """One real-size checkpoint with exactly the v1.4 keys/shapes: detection, strict load, one 512 forward."""
    net = _build_official(official_cls, 512, seed=11)
    sd = net.state_dict()
    path = tmp_path / "GFPGANv1.4.pth"
    torch.save({"params_ema": sd}, path)
    fr = FaceRestorer.from_file(str(path))
    cfg = fr.net.config
    assert (cfg.out_size, cfg.channel_multiplier, cfg.num_style_feat, cfg.num_mlp, cfg.narrow) == (512, 2, 512, 8, 1)
    assert cfg.different_w and cfg.sft_half
    own = fr.net.state_dict()
    assert list(own) == list(sd) and all(own[k].shape == sd[k].shape for k in sd)
    assert 86e6 < sum(v.numel() for v in sd.values()) < 88e6
    faces = _faces_uint8(1, 512, seed=12)
    ref_float, _ = _gfpganer_restore(net, faces, seed=0)
    del net
    got = fr(_to_ours(faces), seed=0)
    diff = (got - torch.from_numpy(ref_float)).abs().max().item()
    # Each side's measured float32 error (pair_reorder_tol, stored noise: float64 noise draws differ), on a copy of
    # the layout at 1/8 of the width (float64 runs of the full network would double this test) scaled by the width
    # ratio 8; + the official pre/post-processing's float32 steps (uint8/255, normalise, clamp/2: 5 roundings).
    narrow = _build_official(official_cls, 512, seed=11, narrow=0.125)
    npath = tmp_path / "GFPGAN-narrow.pth"
    torch.save({"params_ema": narrow.state_dict()}, npath)
    x = _to_ours(faces)
    t = (x - 0.5) / 0.5

    def official01(net, t):
        return net(t, return_rgb=False, weight=0.5, randomize_noise=False)[0] * 0.5

    tol = pair_reorder_tol(FaceRestorer.from_file(str(npath)), x, official01, narrow, t, scale=8.0,
                           noise="stored") + rounding_bound(5)
    assert diff <= tol, f"512: max |ours - GFPGANer| = {diff:.3g} > {tol:.3g}"
