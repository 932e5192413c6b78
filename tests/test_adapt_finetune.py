"""Fine-tuning (pipelines/adapt/finetune.py, perceptual.py) on real faces, end to end at a tiny size.

Chain: real degraded faces of ../shared/faces/aligned_lq_real (resized to 32 px) -> a tiny random-weight GFPGAN
(v1.4 layout, narrow 0.125, saved as the official {'params_ema': ...} file) -> pseudo targets from the tiny
random prior of test_adapt_prior.py (32 px, factor 4, 15 of 25 respaced steps) -> fine-tuning with L1 + LPIPS
(LPIPS-VGG with a random backbone in torchvision's file layout and the real calibration layers of the lpips
wheel). The weights are random, so the test checks the mechanics a user relies on: the loss goes down, the saved
file loads through the restorer loader as GFPGAN and restores, nothing is overwritten, an interrupted run
resumes from its last checkpoint and ends with exactly the weights of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.nn.functional as F

from facemend.pipelines.adapt.finetune import AlreadyExists, FinetuneConfig, Finetuner
from facemend.pipelines.adapt.perceptual import VGG16_FILE, find_vgg16, load_lpips_vgg
from facemend.pipelines.adapt.prior import load_prior_unet
from facemend.pipelines.adapt.pseudo_targets import PseudoTargetConfig, PseudoTargetGenerator
from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean
from facemend.pipelines.io.errors import FaceMendError, ModelFileNotFound
from facemend.pipelines.restore.restorer import FaceRestorer

from conftest import FACES, load_image, modules_reorder_tol, need_shared, reorder_tol, rounding_bound
from test_adapt_prior import tiny_config, tiny_prior

pytest.importorskip("lpips")
S = 32


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    need_shared("faces", "aligned_lq_real")
    names = sorted(os.listdir(FACES / "aligned_lq_real"))[:4]
    faces = torch.cat([load_image(FACES / "aligned_lq_real" / n)[:, :3] for n in names])
    faces = F.interpolate(faces, size=(S, S), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(out_size=S, num_style_feat=64, narrow=0.125))
    with torch.no_grad():
        for p in net.parameters():          # no zero layers (the official init has some)
            p.add_(torch.randn_like(p) * 0.02)
    base = root / "tiny_gfpgan.pth"
    torch.save({"params_ema": net.state_dict()}, base)
    restorer = FaceRestorer.from_file(str(base))
    # Pseudo targets with the tiny random prior (ours: the mechanics need no official code).
    prior_path = root / "prior.pth"
    torch.save(tiny_prior(seed=2).state_dict(), prior_path)
    prior = load_prior_unet(str(prior_path), config=tiny_config())
    gen = PseudoTargetGenerator(prior, PseudoTargetConfig(image_size=S, down_factor=4, start_step=15,
                                                          reg_end_step=9, respacing="25"))
    targets = gen(restorer(faces, seed=0), batch_size=4)
    # LPIPS backbone: random VGG-16 features in torchvision's file layout.
    import torchvision

    torch.manual_seed(1)
    feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    vgg_path = root / VGG16_FILE
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, vgg_path)
    lpips_net = load_lpips_vgg(str(vgg_path))
    return dict(root=root, faces=faces, targets=targets, restorer=restorer, lpips=lpips_net, vgg=vgg_path)


CFG = FinetuneConfig(steps=12, lr=2e-3, lr_min=2e-4, micro_batch=2, accumulate=2, checkpoint_every=5, seed=5)
# Resume test: shorter (6 steps, a checkpoint every 2, interrupted after step 5).
CFG_RESUME = FinetuneConfig(steps=6, lr=2e-3, lr_min=2e-4, micro_batch=2, accumulate=2, checkpoint_every=2, seed=5)


def _dataset_loss(tuner, faces, targets) -> float:
    with torch.no_grad():
        return float(tuner.loss_terms(faces, targets, torch.Generator().manual_seed(0))["total"])


def test_finetune_lowers_loss_saves_and_reloads(setup, tmp_path):
    s = setup
    tuner = Finetuner(s["restorer"], s["lpips"], CFG)
    before = _dataset_loss(tuner, s["faces"], s["targets"])
    out = tmp_path / "facerestore_models" / "my_album.safetensors"
    res = tuner.run(s["faces"], s["targets"], "my_album", str(out), str(tmp_path / "work"))
    after = _dataset_loss(tuner, s["faces"], s["targets"])
    # The targets of a random prior are noise-heavy, so the loss has a high floor: measured 0.415 -> 0.366
    # (L1 -11 %, LPIPS -20 %) in 12 steps; 0.92 leaves room for other CPUs' rounding, not for no learning.
    assert after < 0.92 * before, (before, after)
    assert len(res.losses) == CFG.steps and os.path.isfile(res.plot_path) and os.path.isfile(res.log_path)
    # The base restorer is untouched; the saved file is a GFPGAN the loader recognises, with the trained weights.
    base_sd = torch.load(s["root"] / "tiny_gfpgan.pth", weights_only=True)["params_ema"]
    assert all(torch.equal(v, base_sd[k]) for k, v in s["restorer"].net.state_dict().items())
    adapted = FaceRestorer.from_file(str(out))
    assert adapted.arch == "GFPGANv1Clean" and adapted.input_size == S
    assert all(torch.equal(v, tuner.net.state_dict()[k]) for k, v in adapted.net.state_dict().items())
    restored = adapted(s["faces"], seed=0)
    assert restored.shape == s["faces"].shape and torch.isfinite(restored).all()
    assert (restored - s["restorer"](s["faces"], seed=0)).abs().max() > 1e-3
    # Never overwrite: a second run to the same name is refused before any training, the file stays.
    digest = _sha(out)
    with pytest.raises(AlreadyExists, match="my_album.safetensors"):
        Finetuner(s["restorer"], s["lpips"], CFG).run(s["faces"], s["targets"], "my_album", str(out),
                                                        str(tmp_path / "work2"))
    assert _sha(out) == digest


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_from_last_checkpoint(setup, tmp_path):
    s = setup
    full = Finetuner(s["restorer"], s["lpips"], CFG_RESUME)
    full.run(s["faces"], s["targets"], "a", str(tmp_path / "full.safetensors"), str(tmp_path / "w_full"))

    steps = []

    def hook(n):
        steps.append(n)
        if len(steps) == 5:               # interrupt after step 5: the last checkpoint is step 4
            raise _Stop

    work = tmp_path / "w_int"
    with pytest.raises(_Stop):
        Finetuner(s["restorer"], s["lpips"], CFG_RESUME).run(s["faces"], s["targets"], "a",
                                                        str(tmp_path / "int.safetensors"), str(work), hook=hook)
    assert sorted(os.listdir(work)) == ["step_000002.pt", "step_000004.pt"]
    assert not (tmp_path / "int.safetensors").exists()
    digests = {f: _sha(work / f) for f in os.listdir(work)}
    res = Finetuner(s["restorer"], s["lpips"], CFG_RESUME).run(s["faces"], s["targets"], "a",
                                                         str(tmp_path / "int.safetensors"), str(work))
    assert res.resumed_from == 4
    assert all(_sha(work / f) == d for f, d in digests.items())      # earlier files intact
    assert {"step_000002.pt", "step_000004.pt", "step_000006.pt"} <= set(os.listdir(work))
    a = FaceRestorer.from_file(str(tmp_path / "full.safetensors")).net.state_dict()
    b = FaceRestorer.from_file(str(tmp_path / "int.safetensors")).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed: the same operations on the same saved state
    # Resuming with other settings is refused with a message naming the folder.
    with pytest.raises(Exception, match="w_int"):
        Finetuner(s["restorer"], s["lpips"], FinetuneConfig(**{**CFG_RESUME.__dict__, "lr": 5e-4})).run(
            s["faces"], s["targets"], "a", str(tmp_path / "other.safetensors"), str(work))
    # ... and so is resuming on other pseudo targets (same faces, same count: the old check let it through).
    with pytest.raises(FaceMendError, match=r"w_int holds a run on other \(face, pseudo target\) pairs"):
        Finetuner(s["restorer"], s["lpips"], CFG_RESUME).run(
            s["faces"], (s["targets"] * 0.9).clamp(0, 1), "a", str(tmp_path / "other.safetensors"), str(work))
    assert not (tmp_path / "other.safetensors").exists()


def test_cached_pseudo_targets_are_keyed_on_everything_that_makes_them(setup, tmp_path):
    """targets.pt is reused only for the same photos, restorer weights, prior weights and settings; a new prior
    file (or any other change) used to reuse the old targets silently when only the prior changed."""
    import copy

    from facemend.pipelines.adapt.run import make_or_load_targets

    s = setup
    cfg = PseudoTargetConfig(image_size=S, down_factor=4, start_step=15, reg_end_step=9, respacing="25")

    def gen(seed=2, config=cfg):
        path = tmp_path / f"prior{seed}.pth"
        torch.save(tiny_prior(seed=seed).state_dict(), path)
        return PseudoTargetGenerator(load_prior_unet(str(path), config=tiny_config()), config)

    faces, work, logs = s["faces"][:2], str(tmp_path / "work"), []
    first = make_or_load_targets(faces, s["restorer"], gen(), work)
    again = make_or_load_targets(faces, s["restorer"], gen(), work, log=logs.append)   # same file content
    assert torch.equal(first, again) and logs and "pseudo targets from" in logs[0]
    other_restorer = copy.copy(s["restorer"])
    other_restorer.net = copy.deepcopy(s["restorer"].net)
    with torch.no_grad():
        next(other_restorer.net.parameters()).add_(1e-3)                 # same name, other weights
    for why, args in (("the prior's weights", (faces, s["restorer"], gen(seed=5))),
                      ("the generator settings", (faces, s["restorer"], gen(config=PseudoTargetConfig(
                          **{**cfg.__dict__, "seed": 7})))),
                      ("the photos", (s["faces"][1:3], s["restorer"], gen())),
                      ("the restorer's weights", (faces, other_restorer, gen()))):
        with pytest.raises(FaceMendError, match=f"targets.pt holds pseudo targets made from other inputs "
                                                f"\\(not the same: {why}\\)"):
            make_or_load_targets(*args, work)


def _official_lpips(vgg_path):
    """The lpips package's LPIPS-VGG (its calibration layers) with the random VGG-16 features of vgg_path."""
    import lpips

    ref = lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False).eval()
    feats = torch.load(vgg_path, weights_only=True)
    for i in range(5):
        sl = getattr(ref.net, f"slice{i + 1}")
        sl.load_state_dict({k: feats[f"features.{k}"] for k in sl.state_dict()})
    return ref


def test_lpips_loads_like_the_official_package_and_never_downloads(setup, tmp_path, monkeypatch):
    s = setup
    ref = _official_lpips(s["vgg"])
    a, b = torch.rand(2, 3, S, S) * 2 - 1, torch.rand(2, 3, S, S) * 2 - 1
    with torch.no_grad():
        # each side's own float32 error (against its float64 copy), 2x for another summation order
        tol = (modules_reorder_tol(lambda m, *v: m(*v), s["lpips"], a, b, margin=2.0)
               + modules_reorder_tol(lambda m, *v: m(*v), ref, a, b, margin=2.0))
        assert (s["lpips"](a, b) - ref(a, b)).abs().max() < tol
    # No backbone anywhere: an error that names the file, and no network access.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("LPIPS tried to download"))
    with pytest.raises(ModelFileNotFound, match=VGG16_FILE):
        find_vgg16((str(tmp_path / "facemend_priors" / VGG16_FILE),))


def _official_discriminator():
    """Real-ESRGAN's UNetDiscriminatorSN from DifFace's vendored basicsr, with its registry import stubbed."""
    import types

    from adapt_official import DIFFACE, official_file

    src = official_file(DIFFACE, "basicsr/archs/discriminator_arch.py").read_text()
    src = src.replace("from basicsr.utils.registry import ARCH_REGISTRY",
                      "class ARCH_REGISTRY:\n    register = staticmethod(lambda *a, **k: (lambda c: c))")
    mod = types.ModuleType("_official_discriminator_arch")
    exec(compile(src, "discriminator_arch.py", "exec"), mod.__dict__)
    return mod.UNetDiscriminatorSN


def test_discriminator_equals_official():
    from facemend.pipelines.adapt.discriminator import UNetDiscriminatorSN

    torch.manual_seed(0)
    ref = _official_discriminator()(3, num_feat=16, skip_connection=True)
    ours = UNetDiscriminatorSN(3, 16)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)

    def tol():
        # each side's float32 error against a float64 run, 2x for another order; fresh copies from the state dict
        # (a training call updates u/v, and spectral-norm modules cannot be deep-copied after a call)
        def err(make, net):
            sd = {k: v.clone() for k, v in net.state_dict().items()}

            def run(dtype):
                m = make()
                m.load_state_dict(sd)
                return m.train(net.training).to(dtype)(x.to(dtype))

            return reorder_tol(run, margin=2.0)

        return (err(lambda: UNetDiscriminatorSN(3, 16), ours)
                + err(lambda: _official_discriminator()(3, num_feat=16, skip_connection=True), ref))

    ref.train(), ours.train()          # training mode: one power iteration per call, same u/v updates
    t = tol()
    assert (ours(x) - ref(x)).abs().max() < t
    ref.eval(), ours.eval()
    t = tol()
    assert (ours(x) - ref(x)).abs().max() < t


def test_gan_finetune_runs_and_resumes_exactly(setup, tmp_path):
    s = setup
    cfg = FinetuneConfig(steps=4, lr=2e-3, lr_min=2e-4, micro_batch=2, accumulate=2, checkpoint_every=2, seed=5,
                         gan_weight=0.1, d_num_feat=16)
    res = Finetuner(s["restorer"], s["lpips"], cfg).run(s["faces"], s["targets"], "g", str(tmp_path / "a.safetensors"),
                                                      str(tmp_path / "wa"))
    log = __import__("json").loads(open(res.log_path).read())
    assert all({"gan", "d_real", "d_fake"} <= set(h) for h in log["history"])
    assert "disc" in torch.load(tmp_path / "wa" / "step_000002.pt", weights_only=True)

    def stop_after_3(n, seen=[]):
        seen.append(n)
        if len(seen) == 3:
            raise _Stop

    with pytest.raises(_Stop):
        Finetuner(s["restorer"], s["lpips"], cfg).run(s["faces"], s["targets"], "g", str(tmp_path / "b.safetensors"),
                                                      str(tmp_path / "wb"), hook=stop_after_3)
    res = Finetuner(s["restorer"], s["lpips"], cfg).run(s["faces"], s["targets"], "g",
                                                        str(tmp_path / "b.safetensors"), str(tmp_path / "wb"))
    assert res.resumed_from == 2
    a = FaceRestorer.from_file(str(tmp_path / "a.safetensors")).net.state_dict()
    b = FaceRestorer.from_file(str(tmp_path / "b.safetensors")).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed: the same operations on the same saved state


def test_gpen_fine_tunes_and_reloads_and_codeformer_is_refused(setup, tmp_path):
    from facemend.pipelines.io.errors import FaceMendError
    from facemend.pipelines.restore.archs.gpen import GPEN, GPENConfig, official_channels

    s = setup
    arch = "GPEN"
    torch.manual_seed(3)
    net = GPEN(GPENConfig(size=S, channels=official_channels(S, 1, 0.125), style_dim=64, n_mlp=2))
    first = "ecd0.0.0.weight"
    base = tmp_path / f"{arch}.pth"
    torch.save({"params_ema": net.state_dict()}, base)
    restorer = FaceRestorer.from_file(str(base))
    assert restorer.arch == arch
    cfg = FinetuneConfig(steps=2, lr=1e-3, micro_batch=2, accumulate=1, checkpoint_every=2)
    res = Finetuner(restorer, s["lpips"], cfg).run(s["faces"], s["targets"], "x", str(tmp_path / "x.safetensors"),
                                                   str(tmp_path / "w"))
    assert all(torch.isfinite(torch.tensor(res.losses)))
    adapted = FaceRestorer.from_file(str(tmp_path / "x.safetensors"))
    assert adapted.arch == arch
    key = next(k for k in adapted.net.state_dict() if k == first or k.endswith(first))
    assert not torch.equal(adapted.net.state_dict()[key], restorer.net.state_dict()[key])
    assert adapted(s["faces"]).shape == s["faces"].shape
    codeformer = type("R", (), {"arch": "CodeFormer", "name": "codeformer.pth",
                                "spec": type("S", (), {"family": "CodeFormer"})()})()
    with pytest.raises(FaceMendError, match="codeformer.pth is CodeFormer"):
        Finetuner(codeformer, s["lpips"], cfg)


def _official_generator_loss(lpips_ref, gan_weight):
    """trainer.py's compute_loss (and loss_fun_l1 / _l2) with configs/main/swinir_gan.yaml's loss settings, plus its
    generator GAN term (basicsr GANLoss, vanilla, loss_weight 0.1) when gan_weight > 0: pred and target in [0, 1]
    (the data config's mean 0 / std 1), the discriminator on pred. The methods are taken from the file alone (the
    trainer's module imports the whole training stack)."""
    import ast
    import types

    from adapt_official import UFR, official_file

    def defs(path, names, namespace):
        tree = ast.parse(official_file(UFR, path).read_text())
        found = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
        for n in found:
            n.decorator_list = []                                  # the basicsr registry
        assert {n.name for n in found} == set(names), path
        ns = dict(namespace)
        exec(compile(ast.Module(body=found, type_ignores=[]), path, "exec"), ns)
        return ns

    tr = defs("trainer.py", ("compute_loss", "loss_fun_l1", "loss_fun_l2"), {"F": F, "torch": torch})
    gl = defs("basicsr/losses/gan_loss.py", ("GANLoss",), {"nn": torch.nn, "F": F, "torch": torch})
    loss_cfg = types.SimpleNamespace(lpips=0.1, l1_loss=1.0, l2_loss=0.0, reduction="mean")
    trainer = types.SimpleNamespace(configs=types.SimpleNamespace(train=types.SimpleNamespace(loss=loss_cfg)),
                                    lpips_loss=lpips_ref)
    for name in ("loss_fun_l1", "loss_fun_l2"):
        setattr(trainer, name, types.MethodType(tr[name], trainer))
    cri_gan = gl["GANLoss"]("vanilla", real_label_val=1.0, fake_label_val=0.0, loss_weight=gan_weight)

    def loss(pred, target, disc):
        total = tr["compute_loss"](trainer, pred, target, pred.shape[0])
        return total + cri_gan(disc(pred), True, is_disc=False) if gan_weight > 0 else total

    return loss


@pytest.mark.parametrize("gan_weight", [0.0, 0.1])
def test_finetune_loss_and_gradient_equal_the_official_compute_loss(setup, gan_weight):
    """One micro-batch: the total loss of Finetuner.loss_terms (L1 + 0.1 * sum LPIPS [+ 0.1 GAN]) and its gradient
    with respect to the restorer's output equal the official trainer's on the same output and pseudo targets.
    The network is replaced by a fixed output tensor: what is compared is the loss, not the network."""
    s = setup
    ref = _official_lpips(s["vgg"])
    tuner = Finetuner(s["restorer"], s["lpips"], FinetuneConfig(gan_weight=gan_weight, seed=3))
    if tuner.disc is not None:
        with torch.no_grad():            # a few power iterations, so that the spectral norms hold (logits of size ~1)
            for _ in range(5):
                tuner.disc(torch.rand(1, 3, S, S))
        tuner.disc.eval()                # then no update any more: the same D on both sides
    g = torch.Generator().manual_seed(8)
    out0 = (torch.rand(2, 3, S, S, generator=g) * 2.2 - 1.1)   # a restorer output in [-1, 1], a little beyond
    y = s["targets"][:2]

    class Fixed(torch.nn.Module):
        def forward(self, x, noise=None, generator=None):
            return leaf

    tuner.net = Fixed()
    leaf = out0.clone().requires_grad_(True)
    ours = tuner.loss_terms(s["faces"][:2], y, g)["total"]
    (g_ours,) = torch.autograd.grad(ours, leaf)
    leaf2 = out0.clone().requires_grad_(True)
    official = _official_generator_loss(ref, gan_weight)((leaf2 + 1) / 2, y, tuner.disc)
    (g_off,) = torch.autograd.grad(official, leaf2)
    # LPIPS: each side's float32 error against its float64 run (2x), summed over the 2 faces, weight 0.1; the value
    # and the gradient alike. L1: a mean of n terms each rounded a few times. The GAN term is the same computation
    # on the same values on both sides (the discriminator gets (out + 1) / 2 in both).
    a, b = out0, y * 2 - 1

    def lp_sum(m, x_, y_):
        return m(x_, y_).sum()

    def lp_grad(m, x_, y_):
        with torch.enable_grad():        # reorder_tol runs under no_grad
            x_ = x_.clone().requires_grad_(True)
            return torch.autograd.grad(m(x_, y_).sum(), x_)[0]

    tol_v = 0.1 * (modules_reorder_tol(lp_sum, s["lpips"], a, b, margin=2.0)
                   + modules_reorder_tol(lp_sum, ref, a, b, margin=2.0)) + rounding_bound(a.numel() + 4, 2.2)
    tol_g = 0.1 * (modules_reorder_tol(lp_grad, s["lpips"], a, b, margin=2.0)
                   + modules_reorder_tol(lp_grad, ref, a, b, margin=2.0)) + rounding_bound(4, 1.0 / a.numel())
    assert 0.1 < float(ours) < 10 and abs(float(ours) - float(official)) < tol_v
    assert g_ours.abs().max() > 100 * tol_g and (g_ours - g_off).abs().max() < tol_g
