"""RestoreFormer / RestoreFormer++ (pipelines/archs/restoreformer.py through FaceRestorer) against a reference.

Reference: spandrel (PyPI, MIT) ships RestoreFormer's official architecture file (via GFPGAN's copy of
wzhouxiff/RestoreFormer, cosmetic edits only). RestoreFormer++ is not packaged anywhere; the official
`VQVAEGANMultiHeadTransformer(head_size=4, ex_multi_scale_num=1)` differs from RestoreFormer in three things, which
`_plus_plus_reference` applies to spandrel's classes: 4 heads, a decoder built with attention at 16 and 32
(`attn_resolutions=[16, 32]`, the official constructor's ex_multi_scale_num loop), and the official decoder's
fallback for the encoder feature of a level (`block_<i>_atten` if present, else `block_<i>`; spandrel's copy has
only the first because RestoreFormer never needs the second). Once, on the development machine, FaceMend's
network was also compared with the official file itself (RestoreFormerPlusPlus commit 59d250f,
RestoreFormer/modules/vqvae/vqvae_arch.py) at full size: max |diff| on the [0,1] output 3.3e-5 (RestoreFormer++)
and 3.6e-5 (RestoreFormer), random weights whose raw outputs span about [-5, 5]; the difference is float
reassociation in GroupNorm and attention.

The official aligned-face path (RestoreFormer.enhance(has_aligned=True)) is GFPGANer's: cv2.resize to 512,
uint8/255, BGR->RGB, normalize(0.5, 0.5), net(x)[0], tensor2img(min_max=(-1, 1)); `_official_enhance` replays it.

Sizes: the network is fully convolutional and the attention levels are fixed by the level index, so the
equivalence of the architecture is tested on 128 px inputs with 32 base channels (the same code paths at ~1/50 of
the cost); the 512 pre/post-processing path runs once on a narrow network; the full-size layouts (both releases)
are checked for detection, configuration and strict loading without a forward (~20 s a face on one core).
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from facemend.pipelines.io.errors import ModelFileInvalid
from facemend.pipelines.restore.restorer import FaceRestorer

from conftest import bgr_to_ours as _to_ours, float_casts_follow, reorder_tol, rounding_bound, smooth_faces_bgr as _faces

SMALL = dict(ch=32, ch_mult=(1, 1, 2, 2, 4, 4))


@pytest.fixture(scope="module")
def ref_module():
    try:
        return importlib.import_module("spandrel.architectures.RestoreFormer.__arch.restoreformer_arch")
    except ImportError:
        pytest.skip("RestoreFormer reference not installed: pip install spandrel")


def _randomized(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif p.ndim == 1:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def _v1_reference(mod, seed, **kw):
    torch.manual_seed(seed)
    return _randomized(mod.RestoreFormer(head_size=8, **kw), seed)


def _plus_plus_reference(mod, seed, ch=64, ch_mult=(1, 2, 2, 4, 4, 8)):
    class RestoreFormerPlusPlus(mod.RestoreFormer):
        def __init__(self):
            super().__init__(ch=ch, ch_mult=ch_mult, head_size=4)
            self.decoder = mod.MultiHeadDecoderTransformer(ch=ch, out_ch=3, ch_mult=ch_mult, num_res_blocks=2,
                                                           attn_resolutions=(16, 32), resolution=512,
                                                           z_channels=256, enable_mid=True, head_size=4)

        def encode(self, x):
            quant, loss, info, hs = super().encode(x)
            for key in [k for k in hs if k.startswith("block_") and not k.endswith("_atten")]:
                hs.setdefault(key + "_atten", hs[key])
            return quant, loss, info, hs

    torch.manual_seed(seed)
    return _randomized(RestoreFormerPlusPlus(), seed)


def _save_official_ckpt(net, path, extra=True):
    """The release layout: a training checkpoint whose state_dict holds 'vqvae.' keys (plus training leftovers)."""
    sd = {f"vqvae.{k}": v for k, v in net.state_dict().items()}
    if extra:
        sd["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    torch.save({"state_dict": sd, "epoch": 12, "global_step": 123}, path)


def _official_enhance(net, faces_bgr):
    import cv2
    from torchvision.transforms.functional import normalize

    outs = []
    for face in faces_bgr:
        face = cv2.resize(face, (512, 512))
        img = cv2.cvtColor((face / 255.).astype("float32"), cv2.COLOR_BGR2RGB)
        t = torch.from_numpy(img.transpose(2, 0, 1)).float()
        normalize(t, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), inplace=True)
        with torch.no_grad():
            out = net(t.unsqueeze(0))[0]
        outs.append(((out.squeeze(0).clamp(-1, 1) + 1) / 2).numpy())
    return np.stack(outs)


def _raw_errors(fr, ref, x01, size):
    """Each network's measured float32 error on its raw output (float32 vs float64 run, no margin), at `size`
    (a reduced input: float64 runs at the checked size would double the test), scaled by the area ratio to the
    checked size: the sizes of GroupNorm's and attention's reductions grow with the area, and a K-term sum's
    rounding error at most linearly in K (the convolutions' reductions do not change with size)."""
    import copy

    x = (torch.nn.functional.interpolate(x01, size=(size, size), mode="area") - 0.5) / 0.5
    scale = (x01.shape[-1] / size) ** 2

    def ours(dtype):
        r = fr if dtype == torch.float32 else copy.deepcopy(fr).to(dtype=dtype)
        with float_casts_follow(dtype):                   # ours quantizes in float32 (for half precision)
            return r.forward_normalized(x.to(dtype))

    def theirs(dtype):
        r = ref if dtype == torch.float32 else copy.deepcopy(ref).to(dtype=dtype)
        return r(x.to(dtype))[0]

    return scale * reorder_tol(ours, margin=1), scale * reorder_tol(theirs, margin=1)


def _pair_tol(e_ours, e_ref):
    """Ours vs official on the [0,1] output: each side within 2x its measured error of the exact result (clamp and
    /2 only shrink a difference), + the (x + 1) / 2 of both sides (2 roundings each)."""
    return (2 * e_ours + 2 * e_ref) / 2 + rounding_bound(2)


def _net_only(fr, ref, x01):
    """Both networks on the same [-1,1] batch at the input's own size (the architecture is size-agnostic)."""
    x = (x01 - 0.5) / 0.5
    with torch.no_grad():
        expected = ref(x)[0]
    got = fr.forward_normalized(x)
    return ((got.clamp(-1, 1) + 1) / 2 - (expected.clamp(-1, 1) + 1) / 2).abs().max().item()


def test_restoreformer_plus_plus_matches_reference(ref_module, tmp_path):
    ref = _plus_plus_reference(ref_module, seed=1, **SMALL)
    path = tmp_path / "RestoreFormer++.ckpt"
    _save_official_ckpt(ref, path)
    fr = FaceRestorer.from_file(str(path))
    cfg = fr.net.config
    assert fr.arch == "RestoreFormer" and fr.input_size == 512
    assert cfg.plus_plus and cfg.head_size == 4 and cfg.dec_attn_levels == (5, 4) and cfg.ch_mult == SMALL["ch_mult"]
    own, theirs = fr.net.state_dict(), ref.state_dict()
    assert set(own) == set(theirs) and all(own[k].shape == theirs[k].shape for k in own)
    x = _to_ours(_faces(2, 128, seed=2))
    diff = _net_only(fr, ref, x)
    e_ours, e_ref = _raw_errors(fr, ref, x[:1], 64)
    tol = _pair_tol(e_ours, e_ref)
    assert diff <= tol, f"max |ours - reference| = {diff:.3g} > {tol:.3g}"
    # Batched = one at a time: two float32 orders of our network, each within 2x its measured error (raw output).
    one = fr.forward_normalized((x[:1] - 0.5) / 0.5)
    d1 = (one - fr.forward_normalized((x - 0.5) / 0.5)[:1]).abs().max().item()
    assert d1 <= 4 * e_ours


def test_restoreformer_v1_official_path_at_512(ref_module, tmp_path):
    """RestoreFormer in GFPGAN's release layout ({'params': ...}), through the whole 512 aligned-face path."""
    ref = _v1_reference(ref_module, seed=3, ch=32, ch_mult=(1, 1, 1, 1, 2, 2))
    path = tmp_path / "RestoreFormer.pth"
    torch.save({"params": ref.state_dict()}, path)
    fr = FaceRestorer.from_file(str(path))
    assert not fr.net.config.plus_plus and fr.net.config.head_size == 8
    faces = _faces(1, 512, seed=4)
    expected = _official_enhance(ref, faces)
    got = fr(_to_ours(faces))
    diff = (got - torch.from_numpy(expected)).abs().max().item()
    # + the official path's float32 steps around the network (uint8/255, normalise: 3 roundings of values <= 1).
    tol = _pair_tol(*_raw_errors(fr, ref, _to_ours(faces), 128)) + rounding_bound(3)
    assert diff <= tol, f"max |ours - official path| = {diff:.3g} > {tol:.3g}"
    # A 256 face (other size) comes back at 256, and 0 visibility returns the input.
    small = torch.nn.functional.interpolate(got, size=(256, 256), mode="bilinear", antialias=True)
    assert fr(small).shape == small.shape and torch.equal(fr(small, visibility=0.0), small)


def test_full_size_layouts(ref_module, tmp_path):
    """RestoreFormer++.ckpt and RestoreFormer.ckpt keys/shapes: recognised, told apart, strictly loaded."""
    for name, ref in (("RestoreFormer++.ckpt", _plus_plus_reference(ref_module, seed=5)),
                      ("RestoreFormer.ckpt", _v1_reference(ref_module, seed=6))):
        _save_official_ckpt(ref, tmp_path / name, extra=False)
        fr = FaceRestorer.from_file(str(tmp_path / name))
        cfg = fr.net.config
        assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.n_embed, cfg.embed_dim) == (64, (1, 2, 2, 4, 4, 8), 2,
                                                                                        1024, 256)
        assert cfg.head_size == (4 if "++" in name else 8)
        own, theirs = fr.net.state_dict(), ref.state_dict()
        assert set(own) == set(theirs) and all(torch.equal(own[k], theirs[k]) for k in own)
        del fr, ref


def test_fp16_request_and_wrong_files(ref_module, tmp_path):
    ref = _plus_plus_reference(ref_module, seed=7, **SMALL)
    sd = ref.state_dict()
    path = tmp_path / "rf.ckpt"
    _save_official_ckpt(ref, path)
    fr = FaceRestorer.from_file(str(path), dtype=torch.float16)
    assert fr.dtype in (torch.float32, torch.bfloat16)          # fp16 is not safe here (spandrel agrees)
    # A missing tensor is named.
    broken = {f"vqvae.{k}": v for k, v in sd.items() if k != "decoder.up.4.attn.0.q.weight"}
    torch.save({"state_dict": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(ModelFileInvalid, match=r"decoder\.up\.4\.attn\.0\.q\.(weight|bias)"):
        FaceRestorer.from_file(str(tmp_path / "broken.ckpt"))
    # A plain VQGAN autoencoder (no cross-attention query norms) is not taken for RestoreFormer.
    vq = {k: v for k, v in sd.items() if "attn" not in k}
    torch.save({"state_dict": {f"vqvae.{k}": v for k, v in vq.items()}}, tmp_path / "vqgan.ckpt")
    with pytest.raises(ModelFileInvalid, match="VQ autoencoder") as info:
        FaceRestorer.from_file(str(tmp_path / "vqgan.ckpt"))
    assert "RestoreFormer" in str(info.value)
