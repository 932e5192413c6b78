"""GPEN restorer (pipelines/archs/gpen.py through FaceRestorer) against a reference implementation.

Reference: the official GPEN code (yangxy/GPEN, face_model/gpen_model.py) is not packaged. ModelScope (PyPI
`modelscope`, Apache-2.0) ships it as modelscope/models/cv/image_portrait_enhancement/gpen.py with the pure
PyTorch ops of face_generation/op (`fused_leaky_relu`, `upfirdn2d_native`, the official CPU path). Those three
files are loaded straight from the installed wheel under private module names (importing `modelscope` itself
would pull its many dependencies): `pip install --no-deps modelscope`; without it these tests skip and say so.
Once, on the development machine, the official repository's files (commit 2c73670, CPU path) gave exactly the
same outputs as ModelScope's copy on the same random weights (max |diff| 0.0 at 64 and 256), and FaceMend's
network matched the official one within 1.3e-6 (64), 2.7e-6 (256) and 3.6e-6 (512, GPEN-BFR-512 layout).

The official aligned-face path (face_model/face_gan.py, FaceGAN.process) is replayed in `_facegan_process`:
cv2.resize to the network size, uint8/255, (x - 0.5)/0.5, BGR->RGB, net(x)[0], x*0.5 + 0.5, RGB->BGR,
clip(0,1)*255 and astype(uint8) - a truncation, where GFPGAN rounds. FaceMend returns the float image before
that quantisation (so floor(255 * ours) is the official uint8 result).

Sizes: the GPEN-BFR-256 layout (channel_multiplier 1, narrow 0.5) runs at full size (~1 s a face); behaviour
tests use out_size 64 with narrow 0.25; the GPEN-BFR-512 layout is checked for detection and strict loading
only (a 512 forward costs ~15 s on one core).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch

from facemend.pipelines.restore.archs.gpen import official_channels
from facemend.pipelines.io.errors import ModelFileInvalid
from facemend.pipelines.restore.restorer import FaceRestorer

from conftest import bgr_to_ours as _to_ours, modules_reorder_tol, pair_reorder_tol, restorer_reorder_tol, rounding_bound
from conftest import smooth_faces_bgr as _faces

# Half precision vs fp32 (max, mean |diff| on [0,1]) on a 32 px narrow network; see test_half_precision.
TOL_HALF = {torch.float16: (1e-2, 1e-3), torch.bfloat16: (5e-2, 5e-3)}


def _load_reference():
    try:
        spec = importlib.util.find_spec("modelscope")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("GPEN reference not installed: `pip install --no-deps modelscope` (only 3 files are used)")
    root = list(spec.submodule_search_locations)[0]
    op_dir = os.path.join(root, "models", "cv", "face_generation", "op")
    gpen_file = os.path.join(root, "models", "cv", "image_portrait_enhancement", "gpen.py")
    if not (os.path.isfile(gpen_file) and os.path.isdir(op_dir)):
        pytest.skip(f"modelscope wheel without {gpen_file}")

    def load(name, path):
        s = importlib.util.spec_from_file_location(name, path)
        m = importlib.util.module_from_spec(s)
        sys.modules[name] = m
        s.loader.exec_module(m)
        return m

    op = types.ModuleType("_facemend_ref_gpen_op")
    fused = load("_facemend_ref_gpen_op_fused_act", os.path.join(op_dir, "fused_act.py"))
    fir = load("_facemend_ref_gpen_op_upfirdn2d", os.path.join(op_dir, "upfirdn2d.py"))
    op.FusedLeakyReLU, op.fused_leaky_relu, op.upfirdn2d = fused.FusedLeakyReLU, fused.fused_leaky_relu, fir.upfirdn2d
    alias = "modelscope.models.cv.face_generation.op"       # what gpen.py imports
    saved = sys.modules.get(alias)
    sys.modules[alias] = op
    try:
        return load("_facemend_ref_gpen", gpen_file).FullGenerator
    finally:
        if saved is None:
            sys.modules.pop(alias, None)
        else:
            sys.modules[alias] = saved


@pytest.fixture(scope="module")
def reference_cls():
    return _load_reference()


def _build_reference(cls, size, cm, narrow, seed):
    torch.manual_seed(seed)
    net = cls(size, 512, 8, cm, narrow=narrow).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():          # biases / noise strengths are zero at init
            if p.ndim == 1 or name.endswith("noise.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def _official_net01(net, t):
    """The official network's output on the [0, 1] scale, as _facegan_process takes it (x * 0.5 + 0.5)."""
    return net(t)[0] * 0.5


def _official_input(faces_bgr):
    """_facegan_process's network input (same size: no resize)."""
    return ((torch.from_numpy(faces_bgr) / 255. - 0.5) / 0.5).permute(0, 3, 1, 2).flip(1)


def _tol(fr, net, faces_bgr, scale=1.0, ours_tol=None):
    """Ours vs official: each side's measured float32 error (pair_reorder_tol; `ours_tol`: our restorer's
    restorer_reorder_tol when already measured) + the official pipeline's own float32 steps around the network
    (uint8/255, normalise, x*0.5+0.5: 5 roundings of values <= 1; the input's rounding is inside both
    measurements)."""
    t = _official_input(faces_bgr)
    if ours_tol is None:
        return pair_reorder_tol(fr, _to_ours(faces_bgr), _official_net01, net, t, scale=scale) + rounding_bound(5)
    # The official side on the first face only (the batch's faces are of one kind; halves its cost).
    return ours_tol / 2 + modules_reorder_tol(_official_net01, net, t[:1], margin=2) + rounding_bound(5)


def _facegan_process(net, faces_bgr, in_size):
    """FaceGAN.process for each face (official GPEN), float (before quantisation) and uint8 outputs."""
    import cv2

    floats, uint8s = [], []
    for img in faces_bgr:
        img = cv2.resize(img, (in_size, in_size))
        t = torch.from_numpy(img) / 255.
        t = (t - 0.5) / 0.5
        t = t.permute(2, 0, 1).unsqueeze(0).flip(1)
        with torch.no_grad():
            out, _ = net(t)
        out = out * 0.5 + 0.5
        o = out.squeeze(0).permute(1, 2, 0).flip(2)
        floats.append(np.clip(o.float().numpy(), 0, 1))
        uint8s.append((np.clip(o.float().numpy(), 0, 1) * 255.0).astype(np.uint8))
    return np.stack(floats), np.stack(uint8s)


@pytest.fixture(scope="module")
def small(reference_cls, tmp_path_factory):
    net = _build_reference(reference_cls, 64, 1, 0.25, seed=1)
    path = tmp_path_factory.mktemp("gpen") / "GPEN-64.pth"
    torch.save(net.state_dict(), path)                  # the official files are bare state dicts
    return net, FaceRestorer.from_file(str(path))


def test_gpen_256_layout_matches_official_pipeline(reference_cls, tmp_path):
    net = _build_reference(reference_cls, 256, 1, 0.5, seed=2)   # GPEN-BFR-256: channel_multiplier 1, narrow 0.5
    sd = net.state_dict()
    path = tmp_path / "GPEN-BFR-256.pth"
    torch.save(sd, path)
    fr = FaceRestorer.from_file(str(path))
    assert fr.arch == "GPEN" and fr.input_size == 256 and not fr.supports_fidelity
    own = fr.net.state_dict()
    assert set(own) == set(sd) and all(own[k].shape == sd[k].shape for k in sd)
    faces = _faces(1, 256, seed=3)
    ref_float, ref_uint8 = _facegan_process(net, faces, 256)
    got = fr(_to_ours(faces))
    got_bgr = got.permute(0, 2, 3, 1).flip(-1).numpy()
    diff = np.abs(got_bgr - ref_float).max()
    # Measured on a copy of the same layout at 1/8 of the width (float64 runs of the full network would double
    # this test's time), scaled by the width ratio 8 (the reductions are 8x shorter).
    narrow = _build_reference(reference_cls, 256, 1, 0.0625, seed=2)
    npath = tmp_path / "GPEN-256-narrow.pth"
    torch.save(narrow.state_dict(), npath)
    tol = _tol(FaceRestorer.from_file(str(npath)), narrow, faces, scale=0.5 / 0.0625)
    assert diff <= tol, f"max |ours - official| = {diff:.3g} > {tol:.3g}"
    # The official uint8 output truncates: floor(255 * ours) reproduces it (rare off-by-one at exact .0 edges).
    off = np.abs(np.floor(got_bgr * 255.0).astype(int) - ref_uint8.astype(int))
    assert off.max() <= 1 and (off > 0).mean() < 1e-3
    # Deterministic: GPEN has no noise input, seeds change nothing.
    assert torch.equal(fr(_to_ours(faces), seed=5), got)


def test_gpen_small_batch_and_other_sizes(small):
    net, fr = small
    faces = _faces(3, 64, seed=4)
    ref_float, _ = _facegan_process(net, faces, 64)
    got = fr(_to_ours(faces), batch_size=3)
    diff = np.abs(got.permute(0, 2, 3, 1).flip(-1).numpy() - ref_float).max()
    ours_tol = restorer_reorder_tol(fr, _to_ours(faces))
    tol = _tol(fr, net, faces, ours_tol=ours_tol)
    assert diff <= tol, f"max |ours - official| = {diff:.3g} > {tol:.3g}"
    singles = torch.cat([fr(_to_ours(faces[i:i + 1]), batch_size=1) for i in range(3)])
    assert (singles - got).abs().max().item() <= ours_tol
    # A face of another size is resized to the network's 64 and back (pixel-aligned output of the input size).
    big = torch.nn.functional.interpolate(_to_ours(faces[:1]), size=(96, 96), mode="bilinear")
    assert fr(big).shape == (1, 3, 96, 96)


def test_gpen_512_layout_loads(reference_cls, tmp_path):
    """GPEN-BFR-512 keys and shapes (channel_multiplier 2, narrow 1): recognised, configured and loaded strictly."""
    net = reference_cls(512, 512, 8, 2, narrow=1)
    sd = net.state_dict()
    path = tmp_path / "GPEN-BFR-512.pth"
    torch.save(sd, path)
    del net
    fr = FaceRestorer.from_file(str(path))
    assert fr.arch == "GPEN" and fr.input_size == 512
    assert fr.net.config.channels == official_channels(512, 2, 1)
    assert fr.net.config.n_mlp == 8 and fr.net.config.style_dim == 512
    own = fr.net.state_dict()
    assert set(own) == set(sd) and all(torch.equal(own[k], sd[k]) for k in sd)


def test_half_precision(reference_cls, tmp_path):
    """fp16 / bf16 (the GPU settings) vs fp32 on a 32 px, narrow 0.125 network (half convs are slow on CPU)."""
    torch.save(_build_reference(reference_cls, 32, 1, 0.125, seed=7).state_dict(), tmp_path / "g32.pth")
    fr = FaceRestorer.from_file(str(tmp_path / "g32.pth"))
    x = _to_ours(_faces(2, 32, seed=6))
    ref = fr(x)
    for dtype in (torch.float16, torch.bfloat16):
        fr.to(dtype=dtype)
        try:
            assert fr.dtype == dtype
            got = fr(x)
        finally:
            fr.to(dtype=torch.float32)
        assert torch.isfinite(got).all()
        d = (got - ref).abs()
        tol_max, tol_mean = TOL_HALF[dtype]
        assert d.max().item() < tol_max and d.mean().item() < tol_mean, (dtype, d.max().item(), d.mean().item())


def test_gpen_wrong_files(small, tmp_path):
    net, _ = small
    sd = net.state_dict()
    # Missing tensor: named.
    broken = {k: v for k, v in sd.items() if k != "final_linear.0.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ModelFileInvalid, match="final_linear"):
        FaceRestorer.from_file(str(tmp_path / "broken.pth"))
    # The GPEN discriminator (GPEN-BFR-512-D.pth ships next to the generator): said what it is.
    disc = {"convs.0.0.weight": torch.zeros(8, 3, 1, 1), "convs.1.conv1.0.weight": torch.zeros(8, 8, 3, 3),
            "final_conv.0.weight": torch.zeros(8, 9, 3, 3), "final_linear.0.weight": torch.zeros(8, 128),
            "final_linear.1.weight": torch.zeros(1, 8)}
    torch.save(disc, tmp_path / "GPEN-BFR-512-D.pth")
    with pytest.raises(ModelFileInvalid, match="discriminator") as info:
        FaceRestorer.from_file(str(tmp_path / "GPEN-BFR-512-D.pth"))
    assert "GPEN-BFR-512.pth" in str(info.value)
