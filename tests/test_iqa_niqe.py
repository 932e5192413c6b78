"""NIQE (pipelines/quality/niqe.py) against two independent references on real photos.

1. pyiqa's own ``calculate_niqe`` (the function behind pyiqa's ``niqe``, which the NTIRE challenge used), fed the
   same pristine parameters: our default variant must give its numbers (skips when pyiqa is not installed).
2. BasicSR's algorithm (basicsr/metrics/niqe.py + basicsr/utils/matlab_functions.py, v1.4.2) re-expressed in
   numpy/scipy for this test in double precision: loops over blocks, argmin over the gamma grid, scipy's
   convolve, the general MATLAB imresize weight table. Our 'matlab' variant must give its numbers. (BasicSR
   itself does not import with current torchvision, and rounds its MSCN stage to float32.)
"""
import copy
import math
import types

import numpy as np
import pytest
import torch

from facemend.pipelines.io.errors import InvalidImage, ModelFileInvalid
from facemend.pipelines.quality.niqe import NIQE, matlab_half

from conftest import load_image, need_shared, rounding_bound


# ---------------------------------------------------------------- reference (BasicSR's algorithm, numpy)
def _ref_cubic(x):
    ax = np.abs(x)
    return ((1.5 * ax ** 3 - 2.5 * ax ** 2 + 1) * (ax <= 1)
            + (-0.5 * ax ** 3 + 2.5 * ax ** 2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _ref_weights_indices(in_len, out_len, scale, kernel_width=4.0):
    kernel_width = kernel_width / scale  # antialiasing when shrinking
    x = np.linspace(1, out_len, out_len)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    p = math.ceil(kernel_width) + 2
    idx = left[:, None] + np.arange(p)[None]
    w = scale * _ref_cubic((u[:, None] - idx) * scale)
    w = w / w.sum(1, keepdims=True)
    zeros = (w == 0).sum(0)
    # BasicSR narrows to p - 2 columns: from column 1 if the first is all zero, then the first p - 2 columns
    if zeros[0] != 0:
        idx, w = idx[:, 1:p - 1], w[:, 1:p - 1]
    if zeros[-1] != 0:
        idx, w = idx[:, :p - 2], w[:, :p - 2]
    sym_s = int(-idx.min() + 1)
    sym_e = int(idx.max() - in_len)
    return w, (idx + sym_s - 1).astype(int), sym_s, sym_e


def _ref_resize_axis(img, scale, axis):
    in_len = img.shape[axis]
    out_len = math.ceil(in_len * scale)
    w, idx, s, e = _ref_weights_indices(in_len, out_len, scale)
    a = np.moveaxis(img, axis, 0)
    padded = np.concatenate([a[:s][::-1], a, a[in_len - e:][::-1]], 0)
    out = np.einsum("ok,ok...->o...", w, padded[idx])
    return np.moveaxis(out, 0, axis)


def ref_imresize(img, scale):
    """MATLAB imresize (bicubic, antialias) as BasicSR's matlab_functions.imresize: rows first, then columns."""
    return _ref_resize_axis(_ref_resize_axis(img.astype(np.float64), scale, 0), scale, 1)


def _ref_aggd(block):
    from scipy.special import gamma

    block = block.flatten()
    gam = np.arange(0.2, 10.001, 0.001)
    r_gam = np.square(gamma(2 / gam)) / (gamma(1 / gam) * gamma(3 / gam))
    left = np.sqrt(np.mean(block[block < 0] ** 2))
    right = np.sqrt(np.mean(block[block > 0] ** 2))
    gammahat = left / right
    rhat = np.mean(np.abs(block)) ** 2 / np.mean(block ** 2)
    rhatnorm = rhat * (gammahat ** 3 + 1) * (gammahat + 1) / (gammahat ** 2 + 1) ** 2
    alpha = gam[np.argmin((r_gam - rhatnorm) ** 2)]
    k = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, left * k, right * k


def _ref_features(block):
    from scipy.special import gamma

    alpha, bl, br = _ref_aggd(block)
    feat = [alpha, (bl + br) / 2]
    for shift in ([0, 1], [1, 0], [1, 1], [1, -1]):
        alpha, bl, br = _ref_aggd(block * np.roll(block, shift, axis=(0, 1)))
        feat += [alpha, (br - bl) * (gamma(2 / alpha) / gamma(1 / alpha)), bl, br]
    return feat


def ref_niqe(bgr_u8, params):
    """BasicSR calculate_niqe(img, crop_border=0, input_order='HWC', convert_to='y')."""
    from scipy.ndimage import convolve

    img = bgr_u8.astype(np.float64) / 255.0
    img = np.dot(img, [24.966, 128.553, 65.481]) + 16.0  # bgr2ycbcr y_only
    img = img.round()
    mu_p, cov_p, win = params["mu_pris_param"], params["cov_pris_param"], params["gaussian_window"]
    h, w = img.shape
    nbh, nbw = h // 96, w // 96
    img = img[: nbh * 96, : nbw * 96]
    dist = []
    for scale in (1, 2):
        mu = convolve(img, win, mode="nearest")
        sigma = np.sqrt(np.abs(convolve(np.square(img), win, mode="nearest") - np.square(mu)))
        z = (img - mu) / (sigma + 1)
        feat = []
        for iw in range(nbw):
            for ih in range(nbh):
                feat.append(_ref_features(z[ih * 96 // scale:(ih + 1) * 96 // scale,
                                            iw * 96 // scale:(iw + 1) * 96 // scale]))
        dist.append(np.array(feat))
        if scale == 1:
            img = ref_imresize(img / 255.0, 0.5) * 255.0
    dist = np.concatenate(dist, axis=1)
    mu_d = np.nanmean(dist, axis=0)
    cov_d = np.cov(dist[~np.isnan(dist).any(axis=1)], rowvar=False)
    inv = np.linalg.pinv((cov_p + cov_d) / 2)
    return float(np.sqrt((mu_p - mu_d) @ inv @ (mu_p - mu_d).T).squeeze())


# ---------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def params_path():
    return str(need_shared("models", "iqa", "niqe_pris_params.npz"))


@pytest.fixture(scope="module")
def ref_params(params_path):
    with np.load(params_path) as d:
        return {k: d[k] for k in d.files}


PHOTOS = [("clean", "ffhq_00000000.png"), ("clean", "t1_six_faces.jpg"), ("aligned_lq_real", "0143.png"),
          ("aligned_lq_real", "Adele_crop.png"), ("aligned_gray_old", "Einstein01.png"), ("whole_lq_real", "03.jpg")]


def _u8(path):
    img = load_image(path)
    return (img * 255).round().clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)


def _tensor(rgb):
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255


def _direct_mscn_blocks(self, y, block):
    """NIQE._mscn_blocks with the Gaussian window's 49 taps summed one after the other (another summation order
    than conv2d's, which itself differs between CPUs)."""
    k = self.window.shape[-1]
    yp, yq = (torch.nn.functional.pad(t, (k // 2,) * 4, mode="replicate") for t in (y, y * y))
    h, w = y.shape[-2:]
    mu, sq = torch.zeros_like(y), torch.zeros_like(y)
    for i in range(k):
        for j in range(k):
            mu += self.window[0, 0, i, j] * yp[..., i:i + h, j:j + w]
            sq += self.window[0, 0, i, j] * yq[..., i:i + h, j:j + w]
    z = ((y - mu) / ((sq - mu * mu).abs().sqrt() + 1))[:, 0]
    n, h, w = z.shape
    return z.reshape(n, h // block, block, w // block, block).permute(0, 1, 3, 2, 4).reshape(n, -1, block, block)


def _order_tol(metric, x, expected: float) -> float:
    """NIQE counts the signs of MSCN coefficients, and in flat regions y - mu is a rounding residual whose sign
    depends on the order the window sums are taken in (conv2d's differs between CPUs; scipy's is another): the
    score moves by up to ~1e-3 with the order alone. Tolerance: that movement measured on this image (conv2d against
    a direct sum), times 4 as in conftest.reorder_tol, plus the float32 rounding of the returned score."""
    got = float(metric(x))
    direct = copy.copy(metric)
    direct._mscn_blocks = types.MethodType(_direct_mscn_blocks, direct)
    spread = abs(got - float(direct(x)))
    return 4 * spread + rounding_bound(1, abs(expected), evaluations=1)


@pytest.mark.parametrize("folder,name", PHOTOS)
def test_niqe_matches_pyiqa_on_real_photos(params_path, ref_params, folder, name):
    pyiqa_niqe = pytest.importorskip("pyiqa.archs.niqe_arch", reason="pyiqa (optional extra 'iqa') not installed")
    x = _tensor(_u8(need_shared("faces", folder, name)))
    expected = pyiqa_niqe.calculate_niqe(x, 0, True, "yiq", torch.from_numpy(ref_params["mu_pris_param"]).ravel(),
                                         torch.from_numpy(ref_params["cov_pris_param"]))
    got = NIQE.from_file(params_path)(x)
    print(f"{folder}/{name} {x.shape[-1]}x{x.shape[-2]}: NIQE ours {float(got):.6f} pyiqa {float(expected):.6f}")
    assert got.shape == (1,)
    assert abs(float(got) - float(expected)) < 1e-3


@pytest.mark.parametrize("folder,name", PHOTOS[:4])
def test_niqe_matlab_variant_matches_basicsr_algorithm(params_path, ref_params, folder, name):
    rgb = _u8(need_shared("faces", folder, name))
    expected = ref_niqe(rgb[..., ::-1], ref_params)
    metric = NIQE.from_file(params_path, variant="matlab")
    got = metric(_tensor(rgb))
    print(f"{folder}/{name}: NIQE ours (matlab) {float(got):.6f} BasicSR algorithm {expected:.6f}")
    assert abs(float(got) - expected) <= _order_tol(metric, _tensor(rgb), expected)


def test_niqe_batch_equals_single_and_orders_quality(params_path):
    """A batch scores like its images one by one; a clean face scores better (lower) than blurred/noisy copies."""
    clean = load_image(need_shared("faces", "clean", "ffhq_00000000.png"))[..., 64:448, 64:448]
    blur = torch.nn.functional.avg_pool2d(clean, 5, stride=1, padding=2, count_include_pad=False)
    noisy = (clean + torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)) * 0.08).clamp(0, 1)
    batch = torch.cat([clean, blur, noisy])
    niqe = NIQE.from_file(params_path)
    together = niqe(batch)
    alone = torch.cat([niqe(im[None]) for im in batch])
    assert torch.allclose(together, alone, atol=1e-5)
    assert together[0] < together[1] and together[0] < together[2], together


def test_matlab_half_matches_reference_imresize():
    x = torch.rand(2, 1, 40, 62, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = np.stack([ref_imresize(x[i, 0].numpy(), 0.5) for i in range(2)])
    # float64, two implementations: per output 8x8 taps applied separably (2 x 16 operations) with weights from
    # the cubic kernel (about 10 operations each, normalised): about 50 roundings on values below 2.
    assert np.abs(matlab_half(x)[:, 0].numpy() - ref).max() <= rounding_bound(50, 2, dtype=torch.float64)


def test_niqe_errors(params_path, tmp_path):
    niqe = NIQE.from_file(params_path)
    with pytest.raises(InvalidImage, match="at least two whole 96x96 blocks"):
        niqe(torch.rand(1, 3, 95, 200))
    with pytest.raises(InvalidImage, match="two whole"):
        niqe(torch.rand(1, 3, 160, 160))  # one block: the references' covariance is undefined too
    with pytest.raises(InvalidImage, match=r"image\(s\) \[1\]"):
        niqe(torch.cat([torch.rand(1, 3, 96, 192), torch.full((1, 3, 96, 192), 0.5)]))  # flat image
    with pytest.raises(ValueError, match="variant"):
        NIQE.from_file(params_path, variant="basicsr")
    bad = tmp_path / "niqe_pris_params.npz"
    np.savez(bad, mu_pris_param=np.zeros((1, 18)))
    with pytest.raises(ModelFileInvalid, match=r"mu_pris_param of shape \(1, 36\)"):
        NIQE.from_file(str(bad))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelFileInvalid, match="Cannot read NIQE parameters"):
        NIQE.from_file(str(junk))
