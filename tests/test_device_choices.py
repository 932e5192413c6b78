"""Per-device decisions for a first GPU run, checked on the CPU with faked CUDA facts (issue 20):
- "auto" precision: bf16 only where THAT device computes it natively (capability >= 8.0), whatever
  torch.cuda.is_bf16_supported() (emulation, current device) says;
- the restorers' memory layout per architecture and device (the decision table of io/device_caps.py);
- GFPGAN's random noise maps drawn once per call, not per chunk, with the same results for the same seed.
"""
import pytest
import torch

from facemend.pipelines.io import device_caps
from facemend.pipelines.restore import archs
from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean, StyleGAN2DecoderSFT
from facemend.pipelines.restore.restorer import FaceRestorer


def _spec(name):
    return next(s for s in archs.ARCHS if s.name == name)


@pytest.fixture
def fake_gpus(monkeypatch):
    """cuda:0 a T4 (7.5, bf16 only emulated), cuda:1 an A100 (8.0); the current device is the A100, and
    is_bf16_supported() says True as it does for a T4 (it counts emulation)."""
    caps = {0: (7, 5), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: caps[d if isinstance(d, int) else 1])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return caps


def test_bf16_is_native_only_on_the_models_own_device(fake_gpus):
    assert not device_caps.bf16_native("cuda:0")          # the T4, although the current device has bf16
    assert device_caps.bf16_native("cuda:1")
    assert device_caps.bf16_native("cuda")                 # no index: the current device (the A100)
    assert not device_caps.bf16_native("cpu")


@pytest.mark.parametrize("name", ["CodeFormer", "RestoreFormer"])
def test_auto_fp16_of_an_fp16_unsafe_restorer_is_bf16_only_on_ampere(fake_gpus, name):
    """'auto' resolves to fp16 on CUDA; CodeFormer/RestoreFormer then run bf16 where it is native, else fp32 (the
    old code chose bf16 on the T4 from is_bf16_supported()). The dtype rule without moving weights to a GPU."""
    r = object.__new__(FaceRestorer)
    r.spec = _spec(name)
    for index, want in ((0, torch.float32), (1, torch.bfloat16)):
        r.device = torch.device("cuda", index)
        assert r._usable_dtype(torch.float16) == want
    r.spec = _spec("GFPGANv1Clean")                       # fp16-safe: fp16 stays
    assert r._usable_dtype(torch.float16) == torch.float16


def test_channels_last_decision_table():
    table = {(dev, name): device_caps.channels_last_for(dev, _spec(name).groupnorm_heavy)
             for dev in ("cpu", "cuda", "mps") for name in ("GFPGANv1Clean", "GPEN", "CodeFormer", "RestoreFormer")}
    assert table == {
        # CPU: measured faster for every restorer (README); CUDA: GroupNorm-heavy VQGANs NCHW; elsewhere NCHW.
        ("cpu", "GFPGANv1Clean"): True, ("cpu", "GPEN"): True, ("cpu", "CodeFormer"): True,
        ("cpu", "RestoreFormer"): True,
        ("cuda", "GFPGANv1Clean"): True, ("cuda", "GPEN"): True, ("cuda", "CodeFormer"): False,
        ("cuda", "RestoreFormer"): False,
        ("mps", "GFPGANv1Clean"): False, ("mps", "GPEN"): False, ("mps", "CodeFormer"): False,
        ("mps", "RestoreFormer"): False}


def _tiny_gfpgan(**kw):
    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(out_size=32, narrow=0.125))
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "weight") and m.weight is not None and m.weight.ndim == 1 and m.weight.numel() == 1:
                m.weight.fill_(0.5)   # noise strengths (zero at init): make the noise visible in the output
    return FaceRestorer(net, _spec("GFPGANv1Clean"), **kw)


def test_restorer_layout_follows_the_device_unless_set():
    fr = _tiny_gfpgan()
    conv = fr.net.conv_body_first
    assert fr.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    fr.device = torch.device("mps")                        # what .to("mps") decides (no MPS here to move to)
    assert not fr.channels_last
    fr.device = torch.device("cpu")
    fr.set_throughput(channels_last=False)                 # an explicit choice wins on any device
    assert not fr.channels_last and conv.weight.is_contiguous()


def test_gfpgan_noise_maps_drawn_once_per_call_with_unchanged_results(monkeypatch):
    """Three faces in chunks of one: the official per-face draw (a CPU generator seeded with `seed`) happens once
    for the call, not once per chunk, and each face equals the network called alone with that generator."""
    fr = _tiny_gfpgan()
    faces = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    draws = []
    orig = StyleGAN2DecoderSFT.make_noise
    monkeypatch.setattr(StyleGAN2DecoderSFT, "make_noise",
                        lambda self, mode, *a: draws.append(mode) or orig(self, mode, *a))
    got = fr(faces, batch_size=1, seed=7)
    assert draws == ["random"]
    monkeypatch.setattr(StyleGAN2DecoderSFT, "make_noise", orig)
    with torch.no_grad():
        for i in range(3):
            x = (faces[i:i + 1] - 0.5) / 0.5
            want = (fr.net(x.contiguous(memory_format=torch.channels_last), noise="random",
                           generator=torch.Generator().manual_seed(7)).clamp(-1, 1) + 1) / 2
            assert torch.equal(got[i:i + 1], want)
    assert not torch.equal(got, fr(faces, batch_size=1, seed=8))   # the seed reaches the maps
