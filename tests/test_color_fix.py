"""Colour fix: wavelet low/high split and AdaIN statistics, batched, any size."""
import pytest
import torch

from facemend.pipelines.color.fix import adain_color_fix, color_fix, wavelet_decompose, wavelet_color_fix
from facemend.pipelines.io.errors import InvalidImage

from conftest import load_image, need_shared, rounding_bound

# Float operations on the way to one output value of the 5-level wavelet fix: per level a separable 3-tap blur
# (about 5 operations each way) and the high band's update (2), for the image and for the reference, and the
# final sum; values stay within [-1, 2].
WAVELET_OPS = 5 * 12 * 2 + 1
# high + low = x telescopes: the blur's own rounding cancels, only the 5 levels' updates and the sum remain.
TELESCOPE_OPS = 5 * 2 + 1


def _img(b, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def test_wavelet_split_is_exact_and_low_band_is_smooth():
    x = _img(2, 64, 48, 0)
    high, low = wavelet_decompose(x, 5)
    assert torch.allclose(high + low, x, rtol=0, atol=rounding_bound(TELESCOPE_OPS, 2, evaluations=1))
    assert low.std() < x.std() / 4  # five blur levels (up to dilation 16) leave only slow variation


def test_wavelet_fix_takes_colour_from_reference_and_detail_from_image():
    photo = load_image(need_shared("faces", "clean", "ffhq_00000000.png"))
    tinted = (photo * torch.tensor([0.6, 1.0, 1.3])[None, :, None, None] + 0.05).clamp(0, 1)
    fixed = wavelet_color_fix(tinted, photo)
    assert (fixed - photo).abs().mean() < 0.35 * (tinted - photo).abs().mean()
    # Detail (high band) is the restored image's own.
    kept = (wavelet_decompose(fixed)[0] - wavelet_decompose(tinted)[0]).abs().mean()
    assert kept < 0.1 * wavelet_decompose(tinted)[0].abs().mean()  # only the final clamp to [0,1] differs


def test_fix_against_itself_is_identity_and_batch_equals_singles():
    x = _img(3, 40, 56, 1)
    ref = _img(3, 20, 28, 2)
    assert torch.allclose(wavelet_color_fix(x, x), x, rtol=0, atol=rounding_bound(TELESCOPE_OPS, 2, evaluations=1))
    batched = wavelet_color_fix(x, ref)
    singles = torch.cat([wavelet_color_fix(x[i:i + 1], ref[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, singles, rtol=0, atol=rounding_bound(WAVELET_OPS, 2))
    # AdaIN: mean and std are sums over the H*W pixels (a mean's error is at most (n-1)u times the largest
    # value), the normalised value scales errors by |x - mean| / std < 2.
    n = 40 * 56
    assert torch.allclose(adain_color_fix(x, ref), torch.cat([adain_color_fix(x[i:i + 1], ref[i:i + 1])
                                                             for i in range(3)]),
                          rtol=0, atol=rounding_bound(2 * n + 4, 2))


def test_adain_matches_reference_statistics():
    x = _img(2, 32, 32, 3) * 0.5
    ref = _img(2, 32, 32, 4) * 0.3 + 0.6
    out = adain_color_fix(x, ref)
    # Statistics over 32*32 pixels, taken of the input and reference, then again of the output (see above).
    tol = rounding_bound(3 * 2 * 32 * 32 + 4, 2)
    assert torch.allclose(out.mean((2, 3)), ref.mean((2, 3)), rtol=0, atol=tol)
    assert torch.allclose(out.std((2, 3)), ref.std((2, 3)), rtol=0, atol=tol)


@pytest.mark.parametrize("hw", [(1, 1), (3, 17), (7, 7), (600, 9)])
def test_any_size_and_reference_size(hw):
    x = _img(1, *hw, 5)
    for method in ("wavelet", "adain"):
        out = color_fix(x, _img(1, 33, 21, 6), method)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_strength_blends_and_bad_reference_batch_is_an_error():
    x, ref = _img(2, 16, 16, 7), _img(2, 16, 16, 8)
    half = color_fix(x, ref, "wavelet", 0.5)
    assert torch.allclose(half, (x + wavelet_color_fix(x, ref)) / 2, rtol=0, atol=rounding_bound(3))
    assert torch.equal(color_fix(x, ref, "none"), x)
    with pytest.raises(InvalidImage, match="batch"):
        color_fix(x, _img(3, 16, 16, 9))


def _stablesr_wavelet_fix(target, reference, levels=5):
    """StableSR's wavelet_color_fix written as the original does it: a dilated 3x3 binomial depthwise conv with
    replicate padding per level, the per-level high bands accumulated, the reference's low band added."""
    import torch.nn.functional as F

    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    kernel = ((k1[:, None] * k1[None, :]) / 16).expand(3, 1, 3, 3).to(target)  # the inputs' dtype and device

    def decompose(x):
        high, low = torch.zeros_like(x), x
        for i in range(levels):
            r = 2 ** i
            blurred = F.conv2d(F.pad(low, (r, r, r, r), mode="replicate"), kernel, groups=3, dilation=r)
            high, low = high + (low - blurred), blurred
        return high, low

    return (decompose(target)[0] + decompose(reference)[1]).clamp(0, 1)


def test_wavelet_fix_equals_stablesr_formulation_in_batches_and_small_images(monkeypatch):
    from facemend.pipelines.color import fix as C

    monkeypatch.setattr(C, "_CPU_CHUNK_ELEMENTS", 2 * 3 * 96 * 80)  # chunks of 2, 2 and 1 images
    g = torch.Generator().manual_seed(0)
    for shape in ((5, 3, 96, 80), (2, 3, 7, 9)):  # several chunks; smaller than the largest radius (16)
        t, r = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
        want = _stablesr_wavelet_fix(t.double(), r.double()).float()
        # float32 against the float64 formulation (rounded to float32 once more).
        assert (C.wavelet_color_fix(t, r) - want).abs().max() <= rounding_bound(WAVELET_OPS + 1, 2, evaluations=1)
