"""One-step refiner core: tiling exactness, official tile grid and weights, output size/alignment, seams, seed,
out-of-memory retry, progress and interruption."""
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from facemend.pipelines.io.errors import Interrupted
from facemend.pipelines.diffusion.refiner import OneStepSR, OutOfMemory, TileSettings
from facemend.pipelines.diffusion.tiling import blend_weights, tile_count, tile_starts, tiled_apply

from conftest import rounding_bound

# Normalised blending of up to 4 overlapping tiles per pixel: 4 weighted terms, their sum, the weights' sum and
# the division.
BLEND_OPS = 4 * 2 + 4 + 1

torch.set_num_threads(1)


# --- tiler ---------------------------------------------------------------------------------------------------
def _official_offsets(length, tile, overlap):
    """Offsets as TSD-SR's / OSEDiff's tile_sample loops compute them (one axis)."""
    n, cur = 0, 0
    while cur < length:
        cur = max(n * tile - overlap * n, 0) + tile
        n += 1
    offs = [max(i * tile - overlap * i, 0) for i in range(n)]
    offs[-1] = length - tile
    return offs


@pytest.mark.parametrize("length,tile,overlap", [(100, 64, 8), (128, 64, 8), (65, 64, 8), (300, 96, 32), (97, 96, 32)])
def test_tile_grid_is_the_official_one(length, tile, overlap):
    assert tile_starts(length, tile, overlap) == _official_offsets(length, tile, overlap)
    starts = tile_starts(length, tile, overlap)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all() and starts[-1] + tile == length


@pytest.mark.parametrize("length,tile,overlap,align", [(2048, 1024, 64, 8), (256, 128, 8, 1), (1000, 96, 32, 2)])
def test_even_tiles_cover_with_at_least_the_overlap(length, tile, overlap, align):
    starts = tile_starts(length, tile, overlap, align, even=True)
    assert len(starts) == len(tile_starts(length, tile, overlap, align))
    assert starts[0] == 0 and starts[-1] == length - tile and all(s % align == 0 for s in starts)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_gaussian_weights_are_the_official_ones():
    h = w = 64
    var = 0.01
    xs = [math.exp(-(x - (w - 1) / 2) ** 2 / (w * w) / (2 * var)) / math.sqrt(2 * math.pi * var) for x in range(w)]
    ys = [math.exp(-(y - h / 2) ** 2 / (h * h) / (2 * var)) / math.sqrt(2 * math.pi * var) for y in range(h)]
    ref = torch.outer(torch.tensor(ys, dtype=torch.float64), torch.tensor(xs, dtype=torch.float64))
    assert torch.allclose(blend_weights(h, w, "gaussian"), ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("blend", ["gaussian", "linear", "none"])
@pytest.mark.parametrize("scale", [1.0, 8.0, 1 / 8])
def test_tiling_a_local_function_equals_the_untiled_result(blend, scale):
    """Normalised blending is exact: any local function gives the untiled output, whatever the overlap."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 1)
    if scale == 8.0:
        x = torch.rand(2, 3, 37, 53, generator=g)
        fn = lambda t: F.interpolate(conv(t), scale_factor=8, mode="nearest")  # noqa: E731
        tile, align, ops = 16, 1, 6  # the 1x1 convolution: 3 products and 3 sums
    elif scale == 1 / 8:
        x = torch.rand(2, 3, 8 * 19, 8 * 23, generator=g)
        fn = lambda t: F.avg_pool2d(conv(t), 8)  # noqa: E731
        tile, align, ops = 64, 8, 6 + 64  # and the 8x8 average
    else:
        x = torch.rand(2, 3, 70, 45, generator=g)
        fn = conv
        tile, align, ops = 24, 1, 6
    calls = []
    out = tiled_apply(fn, x, tile, tile // 4, scale=scale, blend=blend, align=align, max_batch=4,
                      hook=lambda n: calls.append(n))
    spread = tiled_apply(fn, x, tile, tile // 4, scale=scale, blend=blend, align=align, max_batch=4, even=True)
    with torch.no_grad():
        # Values up to |bias| + 3 |weight| < 3 (PyTorch's default init for 3 inputs).
        tol = rounding_bound(ops + BLEND_OPS, 3)
        assert torch.allclose(out, fn(x), rtol=0, atol=tol) and torch.allclose(spread, fn(x), rtol=0, atol=tol)
    assert len(calls) == tile_count(x.shape[2], x.shape[3], tile, tile // 4, align) > 1


# --- the refiner with a transparent VAE: alignment and size are exact ------------------------------------------
class SpaceToDepthVAE(torch.nn.Module):
    """An 'autoencoder' that is exactly invertible: 8x8 pixel blocks <-> 192 latent channels, ~zero variance."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=0.5, block_out_channels=(1, 1, 1, 1))
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.quant_conv = None

    def encoder(self, x):
        mean = F.pixel_unshuffle(x, 8)
        return torch.cat([mean, torch.full_like(mean, -60.0)], dim=1)

    def decode(self, z, return_dict=False):
        return (F.pixel_shuffle(z, 8),)


def transparent_refiner(size_multiple=16, denoise=None):
    vae = SpaceToDepthVAE()
    return OneStepSR("test", vae, denoise or (lambda z: torch.zeros_like(z)), lambda z, p: z - p, [vae],
                     size_multiple=size_multiple)


SMALL_TILES = TileSettings(latent_tile=6, latent_overlap=2, encoder_tile=48, decoder_tile=5, vae_overlap=16,
                           max_batch=3)


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("tiles", [None, SMALL_TILES], ids=["one-tile", "many-tiles"])
def test_output_size_and_alignment_are_exact(scale, tiles):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 37, 50, generator=g)  # not a multiple of 8 or 16: padded, then cropped back
    ref = transparent_refiner()
    out = ref(x, scale=scale, seed=0, tiles=tiles)
    assert out.shape == (2, 3, 37 * scale, 50 * scale)
    expect = x if scale == 1 else F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    # No shift, no border loss, tiled or not: only rounding of the 4x4-tap bicubic (values < 1.5) and the blend.
    assert (out - expect.clamp(0, 1)).abs().max() <= rounding_bound(2 * 16 + BLEND_OPS, 1.5)


def test_progress_counts_every_tile_and_interrupt_stops():
    ref = transparent_refiner()
    x = torch.rand(1, 3, 96, 128)
    calls = []
    ref(x, scale=1, tiles=SMALL_TILES, hook=lambda n: calls.append(n))
    assert sum(calls) == ref.count_tiles(96, 128, 1, SMALL_TILES) > 10

    def hook(n, seen=[]):
        seen.append(n)
        if len(seen) == 3:
            raise Interrupted("stop")

    with pytest.raises(Interrupted):
        ref(x, scale=1, tiles=SMALL_TILES, hook=hook)


def test_tiled_apply_previews_the_blended_canvas_only_for_a_hook_that_wants_one():
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    made, shown = [], []

    class Hook:  # what ops/diffusion hands the pipeline: progress per tile, previews when hosted
        def __init__(self, wants):
            self.wants = wants

        def __call__(self, n=1):
            pass

        def wants_preview(self):
            return self.wants

        def preview(self, image):
            shown.append(image.clone())

    def to_image(canvas):
        made.append(1)
        return canvas / 2

    out = tiled_apply(lambda t: t * 2, x, 16, 4, blend="linear", hook=Hook(False), preview=to_image)
    assert not made and not shown  # standalone: no preview is even computed
    again = tiled_apply(lambda t: t * 2, x, 16, 4, blend="linear", hook=Hook(True), preview=to_image)
    assert torch.equal(again, out)
    assert len(shown) == tile_count(40, 56, 16, 4)  # one per tile (the hook's own rate limit decides what shows)
    assert torch.equal(shown[-1], out / 2)  # after the last tile the canvas is the result
    assert (shown[0] == 0).any() and not (shown[-1] == 0).any()  # earlier ones: tiles still missing


def test_out_of_memory_retries_with_smaller_batches_and_tiles_then_fails_clearly():
    seen = []

    def picky(z):
        seen.append(tuple(z.shape))
        if z.shape[0] * z.shape[2] * z.shape[3] > 1 * 32 * 32:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros_like(z)

    ref = transparent_refiner(denoise=picky)
    x = torch.rand(2, 3, 512, 512)
    retries = []
    out = ref(x, scale=1, tiles=TileSettings(latent_tile=64, latent_overlap=8, max_batch=4),
              on_retry=lambda t, e: retries.append(t))
    assert (out - x).abs().max() <= rounding_bound(BLEND_OPS)
    assert [t.max_batch for t in retries] == [2, 1, 1] and retries[-1].latent_tile == 32

    def always(z):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(OutOfMemory, match="out of memory.*Free memory.*fp16"):
        transparent_refiner(denoise=always)(x[:, :, :64, :64], scale=1)
    with pytest.raises(ValueError, match="boom"):  # other errors are not swallowed
        transparent_refiner(denoise=lambda z: (_ for _ in ()).throw(ValueError("boom")))(x[:, :, :64, :64])


def test_long_thin_images_are_tiled_not_run_in_one_piece():
    shapes = []

    def spy(z):
        shapes.append(tuple(z.shape[-2:]))
        return torch.zeros_like(z)

    ref = transparent_refiner(denoise=spy)
    t = TileSettings(latent_tile=16, latent_overlap=4)
    ref(torch.rand(1, 3, 64, 128), tiles=t)  # latent 8x16: within one tile's area and sides -> one piece
    assert shapes == [(8, 16)]
    shapes.clear()
    out = ref(torch.rand(1, 3, 16, 512), tiles=t)  # latent 2x64: area 128 <= 256, but 64 > 2 tiles wide
    assert out.shape == (1, 3, 16, 512) and all(w <= 16 for _, w in shapes) and len(shapes) >= 1


def test_bad_inputs():
    ref = transparent_refiner()
    with pytest.raises(ValueError, match="scale"):
        ref(torch.rand(1, 3, 16, 16), scale=3)
    from facemend.pipelines.io.errors import InvalidImage

    bad = torch.rand(1, 3, 16, 16)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidImage, match="NaN"):
        ref(bad)


# --- real (tiny, random) SD3 transformer + VAE: seams and seed -----------------------------------------------------
@pytest.fixture(scope="module")
def tsdsr(tmp_path_factory):
    pytest.importorskip("diffusers")
    from onestep_models import make_tsdsr
    from facemend.pipelines.diffusion.backends import load_tsdsr

    base, lora = make_tsdsr(str(tmp_path_factory.mktemp("models")))
    return load_tsdsr(base, lora)


def _seam_ratio(img, cut, period, axis=-1):
    """Mean |difference| of neighbouring pixels across the cut, relative to the median over the positions with
    the same phase (period = the model's pixel block: 8 for a VAE), so pattern inside blocks does not count.
    About 1 without a seam."""
    d = img.diff(dim=axis).abs().mean(dim=(0, 1, 2) if axis == -1 else (0, 1, 3))
    return float(d[cut - 1] / d[(cut - 1) % period::period].median())


def test_overlap_blending_removes_the_seams_of_a_tile_dependent_denoiser():
    """A denoiser whose output depends on tile statistics (as GroupNorm / attention do) leaves hard steps at
    tile borders when cut without overlap; with overlap and Gaussian or linear weights the steps disappear."""
    ramp = torch.linspace(0, 1, 512)
    x = (0.25 + 0.5 * ramp[None, None, None, :] * (0.5 + 0.5 * ramp[None, None, :, None])).expand(1, 3, 512, 512)

    def tile_dependent(z):
        return 0.2 * (z - z.mean(dim=(2, 3), keepdim=True))

    ref = transparent_refiner(denoise=tile_dependent)
    hard = TileSettings(latent_tile=32, latent_overlap=0, blend="none")
    ratios = {}
    for name, t in (("hard", hard), ("gaussian", replace(hard, latent_overlap=8, blend="gaussian")),
                    ("linear", replace(hard, latent_overlap=8, blend="linear"))):
        out = ref(x.contiguous(), tiles=t)
        ratios[name] = max(_seam_ratio(out, 256, 8, -1), _seam_ratio(out, 256, 8, -2))
    assert ratios["hard"] > 5, ratios  # the baseline does show the seam, so the statistic can fail
    assert ratios["gaussian"] < 1.5, ratios
    # A linear cross-fade spreads the tiles' disagreement over the overlap instead of hiding it in the tile.
    assert ratios["linear"] < ratios["hard"] / 8, ratios


def test_tiled_vae_decoder_has_no_seams(tsdsr):
    """The real (tiny) diffusers decoder normalises per tile (GroupNorm, mid-block attention): hard tile cuts
    show, blended tiles do not."""
    z = F.interpolate(torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)), size=(32, 32),
                      mode="bicubic")
    hard = TileSettings(decoder_tile=16, vae_overlap=0)
    soft = TileSettings(decoder_tile=16, vae_overlap=64)
    with torch.no_grad():
        r_hard = [_seam_ratio(tsdsr.decode(z, hard), 128, 8, a) for a in (-1, -2)]
        r_soft = [_seam_ratio(tsdsr.decode(z, soft), 128, 8, a) for a in (-1, -2)]
    assert max(r_hard) > 2.0, r_hard
    assert max(r_soft) < 1.5, r_soft


def test_single_tile_equals_the_untiled_call_and_seed_is_deterministic(tsdsr):
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    big = TileSettings(latent_tile=64, encoder_tile=1024, decoder_tile=128)
    a = tsdsr(x, seed=7, tiles=big)
    b = tsdsr(x, seed=7, tiles=big)
    c = tsdsr(x, seed=8, tiles=big)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-4
    # The same step written out by hand without any tiling code.
    with torch.no_grad():
        vae = tsdsr.vae
        moments = vae.encoder(x * 2 - 1)
        mean, logvar = moments.chunk(2, 1)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        z = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) * vae.config.scaling_factor
        z0 = tsdsr.update(z, tsdsr.denoise(z))
        ref = ((vae.decode(z0 / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2)
    # One tile runs the same network calls on the same shapes; what differs is the normalised blend (w*f / w)
    # of the latent and of the decoded image, and the [0,1] mapping.
    assert (a - ref).abs().max() <= rounding_bound(2 * BLEND_OPS + 2)
