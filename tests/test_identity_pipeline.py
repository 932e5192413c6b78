"""RestorerID files, reference identity, adaptive scale and restoration (pipelines/identity/), with tiny random
files in the official layouts (tests/restorerid_models.py) and real photos from ../shared/faces."""
from __future__ import annotations

import math
import os

import pytest
import torch

from facemend.pipelines.io.errors import InvalidImage, ModelFileInvalid
from facemend.pipelines.identity.adaptive_scale import adaptive_id_scale
from facemend.pipelines.identity.checkpoint import read_ip_adapter, read_restorerid
from facemend.pipelines.identity.reference import Reference, clip_pixels, combine, reference_identity
from facemend.pipelines.identity.restorer import RestorerID

from conftest import SHARED, load_image, need_shared, rounding_bound
from restorerid_models import export_tiny_arcface, image_proj_shapes, ldm_vae_shapes, make_restorerid_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_restorerid_files(str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def model(files):
    return RestorerID.load(**files)


def _ref(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Reference(torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=1),
                     torch.randn(1, 3, 224, 224, generator=g))


def test_adaptive_scale_matches_the_official_formula():
    assert round(adaptive_id_scale(27.6), 3) == 0.164
    assert adaptive_id_scale(9.5) == 1.0 and round(adaptive_id_scale(40.0), 3) == 0.047
    assert adaptive_id_scale(27.6) == pytest.approx(math.exp(0.1 * (9.5 - 27.6)), rel=1e-12)
    assert adaptive_id_scale(0.0, max_scale=1.5) == 1.5 and adaptive_id_scale(90.0, min_scale=0.01) == 0.01
    per_face = adaptive_id_scale(torch.tensor([9.5, 27.6]))
    # tensors: the same formula in float64 on the float32 scores, rounded once to float32 at the end
    want = torch.tensor([math.exp(0.1 * (9.5 - float(m))) for m in torch.tensor([9.5, 27.6])])
    assert torch.allclose(per_face, want, rtol=0, atol=rounding_bound(1, 1.0, evaluations=1))


def test_layout_generators_equal_the_official_dumps():
    folder = SHARED / "reference" / "layouts"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    vae = {k.split("\t")[0][len("first_stage_model."):]: tuple(eval(k.split("\t")[1]))
           for k in (folder / "keys_restorerid_first_stage_vae.txt").read_text().splitlines()}
    assert ldm_vae_shapes() == vae
    proj = {}
    for line in (folder / "keys_ip-adapter-faceid-plus_sd15_image_proj.txt").read_text().splitlines():
        key, shape = line.split("\t")
        proj[key.split("'")[1]] = tuple(eval(shape))
    assert image_proj_shapes(512, 768, 1280, 4, 4) == proj


def test_checkpoint_loads_with_and_without_optional_parts(tmp_path, files):
    full = read_restorerid(files["checkpoint"])
    plain = make_restorerid_files(str(tmp_path / "a"), optional_prefixes=False, checkpoint_only=True)
    assert read_restorerid(plain["checkpoint"]).keys() == full.keys()
    st = make_restorerid_files(str(tmp_path / "b"), fmt="safetensors", checkpoint_only=True)
    parts = read_restorerid(st["checkpoint"])
    assert all(torch.equal(parts["unet"][k], full["unet"][k]) for k in full["unet"])


def test_foreign_and_damaged_checkpoints_are_refused_by_name(tmp_path, files):
    sd = torch.load(files["checkpoint"], weights_only=True)["state_dict"]
    sd15 = {k: v for k, v in sd.items() if ".spade." not in k and ".IDBalance." not in k}
    torch.save({"state_dict": sd15}, tmp_path / "v1-5-pruned.ckpt")
    with pytest.raises(ModelFileInvalid, match="Stable Diffusion 1.x"):
        read_restorerid(str(tmp_path / "v1-5-pruned.ckpt"))
    torch.save({"params_ema": {"conv_body_first.weight": torch.zeros(1), "stylegan_decoder.x": torch.zeros(1)}},
               tmp_path / "GFPGANv1.4.pth")
    with pytest.raises(ModelFileInvalid, match="GFPGAN"):
        read_restorerid(str(tmp_path / "GFPGANv1.4.pth"))
    missing = dict(sd)
    key = "model.diffusion_model.input_blocks.1.0.IDBalance.mlp_beta.bias"
    del missing[key]
    torch.save({"state_dict": missing}, tmp_path / "missing.ckpt")
    with pytest.raises(ModelFileInvalid, match="mlp_beta.bias"):
        RestorerID.load(str(tmp_path / "missing.ckpt"), files["ip_adapter"], files["image_encoder"],
                        files["text_encoder"])
    extra = dict(sd, **{"model.diffusion_model.input_blocks.1.0.extra.weight": torch.zeros(1)})
    torch.save({"state_dict": extra}, tmp_path / "extra.ckpt")
    with pytest.raises(ModelFileInvalid, match="extra.weight"):
        RestorerID.load(str(tmp_path / "extra.ckpt"), files["ip_adapter"], files["image_encoder"],
                        files["text_encoder"])
    torch.save({"image_proj": {"proj.0.weight": torch.zeros(1), "norm.weight": torch.zeros(1)}},
               tmp_path / "ip-adapter-faceid_sd15.bin")
    with pytest.raises(ModelFileInvalid, match="without Plus"):
        read_ip_adapter(str(tmp_path / "ip-adapter-faceid_sd15.bin"))


class Hyper:  # stands for the Lightning/omegaconf objects a training checkpoint may pickle
    pass


def test_pickles_with_objects_are_refused_with_the_conversion_command(tmp_path):
    path = tmp_path / "RestorerIDFull.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Hyper()}, path)
    with pytest.raises(ModelFileInvalid, match="safetensors"):
        read_restorerid(str(path))


def test_restore_is_seeded_batched_and_keeps_the_size(model):
    faces = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = _ref()
    a = model.restore(faces, ref, ip_scale=0.5, steps=3, seed=1)
    assert a.shape == faces.shape and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, model.restore(faces, ref, ip_scale=0.5, steps=3, seed=1))
    assert not torch.equal(a, model.restore(faces, ref, ip_scale=0.5, steps=3, seed=2))
    # one scale per face: the same as one float when the values are equal
    # (x * 0.5 is exact, and the rest is the same sequence of operations, so exactly equal)
    assert torch.equal(a, model.restore(faces, ref, ip_scale=torch.tensor([0.5, 0.5]), steps=3, seed=1))
    odd = model.restore(torch.rand(1, 3, 30, 34), ref, steps=2)  # resized to multiples of 4 and back
    assert odd.shape == (1, 3, 30, 34)


def test_scale_zero_ignores_the_reference_in_the_attention_only(model):
    """Scale 0 removes the ID cross-attention; IDBalance still sees the ID tokens (as in the official code)."""
    faces = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    a = model.restore(faces, _ref(0), ip_scale=0.0, steps=2, seed=0)
    b = model.restore(faces, _ref(1), ip_scale=0.0, steps=2, seed=0)
    c = model.restore(faces, _ref(1), ip_scale=2.0, steps=2, seed=0)
    assert not torch.equal(a, b)  # IDBalance
    assert not torch.allclose(b, c)  # the ID attention


@pytest.fixture(scope="module")
def arcface(tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="onnxruntime (optional extra 'iqa') not installed")
    from facemend.pipelines.quality.id_similarity import ArcFaceONNX

    path = tmp_path_factory.mktemp("insightface") / "w600k_r50.onnx"
    export_tiny_arcface(path)
    return ArcFaceONNX.from_file(str(path))


def test_reference_from_real_photos(arcface):
    from facemend.pipelines.face.detectors import load_detector

    det = load_detector("mtcnn")
    a = load_image(need_shared("faces", "clean", "ffhq_00000000.png"))
    b = load_image(need_shared("faces", "aligned_lq_real", "0143.png"))
    ra, rb = reference_identity(a, det, arcface), reference_identity(b, det, arcface)
    # unit length up to the rounding of two 512-term sums of squares (normalising, then the check's norm)
    assert ra.id_embed.shape == (1, 512)
    assert abs(float(ra.id_embed.norm()) - 1) < rounding_bound(2 * 512 + 4, 1.0, evaluations=1)
    assert ra.clip_pixels.shape == (1, 3, 224, 224)
    both = combine([ra, rb])
    assert torch.equal(both.id_embed, (ra.id_embed + rb.id_embed) / 2)  # 0 + a*1 + b*1 and /2: the same roundings
    assert both.clip_pixels.shape[0] == 2
    with pytest.raises(InvalidImage, match="no face"):
        reference_identity(torch.full((1, 3, 256, 256), 0.5), det, arcface)
    group = load_image(need_shared("faces", "clean", "t1_six_faces.jpg"))
    rg = reference_identity(group, det, arcface)
    assert "largest" in rg.report[0]["note"]


def test_clip_input_reproduces_the_bgr_quirk():
    crop = torch.rand(1, 3, 224, 224)
    px = clip_pixels(crop)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.equal(px, (crop[:, [2, 1, 0]] - mean) / std)  # the same float32 operations on the same values


def test_clip_vision_single_file_equals_the_folder(tmp_path, files):
    """ComfyUI keeps CLIP vision models as single files (models/clip_vision/*.safetensors, transformers' names)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from facemend.pipelines.identity.restorer import load_image_encoder

    cfg = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=32, image_size=224, projection_dim=16, hidden_act="gelu")
    torch.manual_seed(0)
    ref = CLIPVisionModelWithProjection(cfg).eval()
    ref.save_pretrained(tmp_path / "folder")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "clip.safetensors")
    a = load_image_encoder(str(tmp_path / "folder"))
    b = load_image_encoder(str(tmp_path / "clip.safetensors"))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ha = a(x, output_hidden_states=True).hidden_states[-2]
        hb = b(x, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(ha, hb)
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(ModelFileInvalid, match="CLIP vision"):
        load_image_encoder(str(tmp_path / "vae.safetensors"))


# A half-precision run rounds weights and activations to the format: its distance to the float32 run is a multiple
# of the format's unit roundoff u (2^-11 fp16, 2^-8 bf16), the same multiple for both, since the computation is the
# same. Measured on this tiny model (2 steps, [0,1] outputs, 3 inputs): max 2.2-3.2 u, mean 0.43-0.47 u for fp16
# and bf16 alike. Bounds: 10 u and 2 u (3-4x the measurement, for other CPUs and kernels).
def _half_tol(dtype):
    u = torch.finfo(dtype).eps / 2
    return 10 * u, 2 * u


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_close(files, dtype):
    """Half-precision weights with GroupNorm in fp32 against fp32 on the same tiny model and noise (2 steps)."""
    half = RestorerID.load(**files, dtype=dtype)
    full = RestorerID.load(**files)
    faces = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    a = full.restore(faces, _ref(), ip_scale=0.5, steps=2, seed=0)
    b = half.restore(faces, _ref(), ip_scale=0.5, steps=2, seed=0)
    assert b.dtype == torch.float32
    tol_max, tol_mean = _half_tol(dtype)
    assert (a - b).abs().max() < tol_max and (a - b).abs().mean() < tol_mean


def test_text_encoder_from_an_sd15_single_file_equals_the_folder(tmp_path, files):
    """SD-1.x single files keep CLIP-L under cond_stage_model.transformer.*; the tokenizer comes separately
    (ComfyUI's sd1_tokenizer when hosted; here the tiny one)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from facemend.pipelines.identity.restorer import load_text_encoder

    tok_dir = os.path.join(files["text_encoder"], "tokenizer")
    cfg = CLIPTextConfig(vocab_size=56, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    torch.manual_seed(0)
    ref = CLIPTextModel(cfg).eval()
    sd = {f"cond_stage_model.transformer.text_model.{k.replace('text_model.', '', 1)}": v
          for k, v in ref.state_dict().items()}  # the names LDM saved (transformers 4)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # the rest of an SD file, ignored
    torch.save({"state_dict": sd}, tmp_path / "v1-5-pruned-emaonly.ckpt")
    te, tok = load_text_encoder(str(tmp_path / "v1-5-pruned-emaonly.ckpt"), tokenizer_dir=tok_dir)
    ids = tok(["best quality, high quality"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(te(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)
    with pytest.raises(ModelFileInvalid, match="no SD-1.x text encoder"):
        load_text_encoder(files["checkpoint"], tokenizer_dir=tok_dir)


def test_each_face_draws_its_own_noise_up_front_in_the_official_order():
    """Face k's noise comes from its own generator seeded seed + k: chunks of any size give the same draws, and
    face 0's are the official single-image run's after torch.manual_seed(seed) (posterior, x_T, one per step)."""
    from facemend.pipelines.identity.restorer import face_noise

    shape, steps = (4, 8, 8), 3
    whole = face_noise(7, 3, shape, steps)
    assert whole.shape == (steps + 2, 3, *shape) and whole.device.type == "cpu"
    assert torch.equal(whole, torch.cat([face_noise(7, 1, shape, steps), face_noise(7, 2, shape, steps, first=1)], 1))
    torch.manual_seed(7)
    official = torch.stack([torch.randn(1, *shape) for _ in range(steps + 2)])
    assert torch.equal(whole[:, :1], official)
    assert torch.equal(whole[:, 2], face_noise(9, 1, shape, steps)[:, 0])   # face 2 of seed 7 = face 0 of seed 9


def test_a_seed_gives_the_same_faces_whatever_the_batch_size(model, arcface):
    """CPU runs 1 face per sampler call, a GPU 8: the stage (and the node) must not depend on it."""
    from facemend.pipelines.identity.stage import IdentityStage

    faces = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))

    def run(bs, seed=11):
        return IdentityStage(model, _ref(), arcface, fixed_scale=0.5, steps=2, seed=seed, batch_size=bs)(faces)

    one, three = run(1), run(3)
    # Only the batched float32 convolutions' and attention's summation order differs (measured 1.2e-6 on outputs
    # in [0,1] over 3 steps); another seed moves the output by ~1. The bound sits between, 80x above the first.
    assert (one - three).abs().max() < 1e-4
    assert (one - run(1, seed=12)).abs().max() > 0.1


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_colour_fix_runs_on_the_unclamped_decode_then_clamps(model, monkeypatch, method):
    """Inference.py: x = decode(z); x = wavelet_reconstruction(x, lq) (or AdaIN); clamp((x + 1) / 2). The decode
    is scaled by 3 here so that more than half of it lies outside [-1, 1], where the two orders differ."""
    import importlib.util
    import types

    from official_code import official_dir

    path = official_dir("YingJiacheng/RestorerID") / "scripts" / "wavelet_color_fix.py"
    spec = importlib.util.spec_from_file_location("_restorerid_color_fix", path)
    off = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(off)
    fix = off.wavelet_reconstruction if method == "wavelet" else off.adaptive_instance_normalization
    decoded = {}
    orig = model.vae.decode

    def decode(z):
        decoded["x"] = orig(z).sample.float() * 3
        return types.SimpleNamespace(sample=decoded["x"])

    monkeypatch.setattr(model.vae, "decode", decode)
    faces = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    got = model.restore(faces, _ref(), ip_scale=0.5, steps=2, seed=3, color_fix=method)
    lq = 2 * faces - 1
    want = ((fix(decoded["x"], lq) + 1) / 2).clamp(0, 1)
    # Both sides: 5 levels of a 3x3 blur (17 operations each, ours as shifted sums) on the decode and on the LQ,
    # plus the combination (AdaIN: two 1024-term mean/variance sums); values up to max |decode|.
    mag = float(decoded["x"].abs().max()) + 1
    ops = 2 * 5 * 17 + 6 if method == "wavelet" else 2 * 2 * faces[0, 0].numel() + 8
    tol = rounding_bound(ops, mag)
    assert (got - want).abs().max() < tol
    old_order = ((fix(((decoded["x"] + 1) / 2).clamp(0, 1) * 2 - 1, lq) + 1) / 2).clamp(0, 1)
    assert (got - old_order).abs().max() > 50 * tol
