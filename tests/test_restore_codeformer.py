"""CodeFormer restorer (pipelines/archs/codeformer.py through FaceRestorer) against a reference implementation.

Reference: CodeFormer's official code lives only in the sczhou/CodeFormer repository (its own basicsr fork, not
on PyPI). spandrel_extra_arches (PyPI) ships that architecture file with cosmetic edits (its forward takes
`weight` for `w` and fixes adain=True, as inference_codeformer.py calls it); it is the reference here. Once, on
the development machine, the official files from the repository (commit b33cc7d, loaded with a three-name
basicsr stub) gave the same outputs as spandrel's copy on the same random weights (see the report of the change).
Without spandrel_extra_arches these tests skip and say so: `pip install spandrel_extra_arches`.

The inference_codeformer.py path for aligned faces is the same as GFPGANer's (uint8/255 -> RGB -> normalize(0.5,
0.5) -> net(x, w=w, adain=True)[0] -> tensor2img(min_max=(-1,1))), so the GFPGAN test's `_gfpganer_restore`
replays it with the network call swapped.

CodeFormer only runs at 512 (16x16 codes), so each forward costs ~10 s on 2 CPU cores: the file is marked slow.
Measured here (random weights, fp32, CPU): max |ours - reference| ~6e-5 on the [0,1] output (raw outputs span
about [-4, 5] with these weights; the difference is float reassociation in attention and GroupNorm).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from facemend.pipelines.restore.restorer import FaceRestorer

from conftest import float_casts_follow, reorder_tol, rounding_bound

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_cls():
    mod = pytest.importorskip("spandrel_extra_arches.architectures.CodeFormer",
                              reason="reference not installed: pip install spandrel_extra_arches")
    return mod.CodeFormer


def _randomized(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name == "position_emb" or "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif p.ndim == 1:                                        # norm scales
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def pair(reference_cls, tmp_path_factory):
    torch.manual_seed(0)
    ref = _randomized(reference_cls(), seed=1)
    path = tmp_path_factory.mktemp("codeformer") / "codeformer.pth"
    torch.save({"params_ema": ref.state_dict()}, path)
    return ref, FaceRestorer.from_file(str(path))


def _reference_restore(ref, faces_bgr_uint8: np.ndarray, w: float) -> np.ndarray:
    import cv2
    from torchvision.transforms.functional import normalize

    outs = []
    for face in faces_bgr_uint8:
        img = cv2.cvtColor((face / 255.).astype("float32"), cv2.COLOR_BGR2RGB)
        t = torch.from_numpy(img.transpose(2, 0, 1)).float()
        normalize(t, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), inplace=True)
        with torch.no_grad():
            out = ref(t.unsqueeze(0), weight=w)[0]
        o = out.squeeze(0).float().clamp_(-1, 1)
        outs.append(((o - (-1)) / (1 - (-1))).numpy())
    return np.stack(outs)


def _measured_errors(ref, fr, x01, w, size=128):
    """Each network's float32 error on its raw output (float32 vs float64 run, no margin), measured on copies of
    the same weights at `size` px (latent side size/32: the position embedding's first (size/32)^2 rows) - float64
    runs at 512 would double this slow test - and scaled by the area ratio: GroupNorm's, attention's and the
    transformer's reductions grow with the area, a K-term sum's rounding error at most linearly in K (the
    convolutions' do not change). The reference hard-codes its 16x16 code grid in one call and keys its fusion layers
    by feature size; the copy is given the reduced grid and sizes (test-only)."""
    import copy

    side = size // 32
    x = (torch.nn.functional.interpolate(x01, size=(size, size), mode="area") - 0.5) / 0.5
    scale = (512 / size) ** 2

    def small_ref(dtype):
        r = copy.deepcopy(ref).to(dtype)
        r.position_emb = torch.nn.Parameter(r.position_emb[:side * side].clone())
        get = r.quantize.get_codebook_feat
        r.quantize.get_codebook_feat = lambda idx, shape: get(idx, [shape[0], side, side, shape[3]])
        r.fuse_convs_dict = torch.nn.ModuleDict({str(int(k) * size // 512): m for k, m in r.fuse_convs_dict.items()})
        return r

    def small_ours(dtype):
        r = copy.deepcopy(fr).to(dtype=dtype)
        r.net.position_emb = torch.nn.Parameter(r.net.position_emb[:side * side].clone())
        r.net.latent_side = side
        return r

    def theirs(dtype):
        r = small_ref(dtype)
        with float_casts_follow(dtype, r):
            return r(x.to(dtype), weight=w)[0]

    def ours(dtype):
        r = small_ours(dtype)
        with float_casts_follow(dtype):                    # ours takes softmax / AdaIN in float32 (half precision)
            return r.forward_normalized(x.to(dtype), fidelity=w)

    return scale * reorder_tol(ours, margin=1), scale * reorder_tol(theirs, margin=1)


def _face(seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 8, 8, generator=g)
    img = torch.nn.functional.interpolate(low, size=(512, 512), mode="bicubic", align_corners=False).clamp(0, 1)
    return (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).flip(-1).contiguous().numpy()


def test_codeformer_matches_reference_and_fidelity_matters(pair):
    ref, fr = pair
    assert fr.arch == "CodeFormer" and fr.supports_fidelity and fr.input_size == 512
    own, theirs = fr.net.state_dict(), ref.state_dict()
    assert list(own) == list(theirs) and all(own[k].shape == theirs[k].shape for k in own)
    faces = _face(3)
    x = torch.from_numpy(np.ascontiguousarray(faces[..., ::-1])).permute(0, 3, 1, 2).contiguous().float() / 255
    expected = _reference_restore(ref, faces, w=0.7)
    got = fr(x, fidelity=0.7)
    diff = (got - torch.from_numpy(expected)).abs().max().item()
    # Each side within 2x its measured error of the exact result (clamp and /2 only shrink a difference), + the
    # official pre/post-processing's float32 steps (uint8/255, normalise, (x + 1) / 2: 5 roundings of values <= 1).
    e_ours, e_ref = _measured_errors(ref, fr, x, 0.7)
    tol = (2 * e_ours + 2 * e_ref) / 2 + rounding_bound(5)
    assert diff <= tol, f"max |ours - reference| = {diff:.3g} > {tol:.3g}"
    # w = 0 skips the encoder fusion: a different image.
    assert (fr(x, fidelity=0.0) - got).abs().max().item() > 1e-3


def test_codeformer_fp16_request_falls_back(pair):
    _, fr = pair
    fr.to(dtype=torch.float16)
    try:
        assert fr.dtype in (torch.float32, torch.bfloat16)      # fp16 is not safe for the code argmax
        assert fr.requested_dtype == torch.float16
    finally:
        fr.to(dtype=torch.float32)
