"""Adaptation through the CLI (`python -m facemend adapt`) and the nodes, with tiny random-weight files laid out
as a user's models folder: facerestore_models/tiny_gfpgan.pth (GFPGAN v1.4 layout, 32 px, narrow 0.125),
facemend_priors/iddpm_ffhq512_ema500000.pth (a small guided-diffusion UNet in the official key layout that
runs at the prior's 512 px: attention only at 16 px) and facemend_priors/vgg16-397923af.pth (random VGG-16
features). One prior step (5 s at 512 px on one CPU thread even for this small UNet) and two training steps:
this checks the wiring, files and messages, not quality (the computation is tested in test_adapt_*.py).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from facemend import cli
from facemend.host import model_paths
from facemend.pipelines.adapt.prior import PriorUNet, PriorUNetConfig
from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean
from facemend.pipelines.io.images import write_image
from facemend.pipelines.restore.restorer import FaceRestorer

from conftest import FACES, facemend_nodes, load_image, need_shared, node_class

pytest.importorskip("lpips")
SMALL_512 = PriorUNetConfig(image_size=512, model_channels=32, channel_mult=(1, 1, 1, 1, 1, 2),
                            num_res_blocks=(1, 1, 1, 1, 1, 1), attention_resolutions=(16,), num_head_channels=64)


@pytest.fixture
def models(tmp_path, monkeypatch):
    import torchvision

    root = tmp_path / "models"
    (root / "facerestore_models").mkdir(parents=True)
    (root / "facemend_priors").mkdir()
    torch.manual_seed(0)
    torch.save({"params_ema": GFPGANv1Clean(GFPGANConfig(out_size=32, num_style_feat=64, narrow=0.125)).state_dict()},
               root / "facerestore_models" / "tiny_gfpgan.pth")
    prior = PriorUNet(SMALL_512)
    torch.save({f"module.{k}": v for k, v in prior.state_dict().items()},
               root / "facemend_priors" / "iddpm_ffhq512_ema500000.pth")
    feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()},
               root / "facemend_priors" / "vgg16-397923af.pth")
    faces = tmp_path / "faces"
    faces.mkdir()
    need_shared("faces", "aligned_lq_real")
    for n in sorted(os.listdir(FACES / "aligned_lq_real"))[:1]:
        img = load_image(FACES / "aligned_lq_real" / n)[:, :3]
        img = torch.nn.functional.interpolate(img, size=(64, 64), mode="bilinear", antialias=True)
        write_image(str(faces / n), img[0])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    yield root, faces
    model_paths.set_models_dirs([])


ARGS = ["--steps", "2", "--micro-batch", "1", "--accumulate", "2", "--checkpoint-every", "1", "--start-step", "1",
        "--reg-end-step", "1", "--down-factor", "16"]


def test_cli_adapt_saves_a_new_restorer_and_never_overwrites(models, capsys):
    root, faces = models
    rc = cli.main(["--models-dir", str(root), "adapt", str(faces), "--restorer", "tiny_gfpgan.pth", "--name", "mine",
                   *ARGS])
    assert rc == 0, capsys.readouterr().err
    out = root / "facerestore_models" / "mine.safetensors"
    adapted = FaceRestorer.from_file(str(out))
    assert adapted.arch == "GFPGANv1Clean"
    work = faces.parent / "adapt_runs" / "mine"
    assert {"mine.loss.png", "mine.log.json", "targets.pt", "step_000001.pt", "step_000002.pt"} <= \
        set(os.listdir(work))
    before = out.read_bytes()
    rc = cli.main(["--models-dir", str(root), "adapt", str(faces), "--restorer", "tiny_gfpgan.pth", "--name", "mine",
                   *ARGS])
    assert rc == 2 and "mine.safetensors exists" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_cli_adapt_missing_files_are_named(models, capsys):
    root, faces = models
    os.remove(root / "facemend_priors" / "vgg16-397923af.pth")
    rc = cli.main(["--models-dir", str(root), "adapt", str(faces), "--restorer", "tiny_gfpgan.pth", "--name", "x",
                   *ARGS])
    assert rc == 2 and "vgg16-397923af.pth" in capsys.readouterr().err
    rc = cli.main(["--models-dir", str(root), "adapt", str(faces), "--restorer", "tiny_gfpgan.pth", "--name", "x",
                   "--prior", "nope.pth", "--lpips-weight", "0", *ARGS])
    assert rc == 2 and "nope.pth" in capsys.readouterr().err
    assert not (root / "facerestore_models" / "x.safetensors").exists()


def _hosted_previews(monkeypatch) -> list:
    """Progress as under ComfyUI, every update recorded as (done, total, preview IMAGE or None); previews allowed at
    every update (hosted: at most one a second)."""
    from facemend.host import device as dev

    shown: list = []
    monkeypatch.setattr(dev, "is_hosted", lambda: True)
    monkeypatch.setattr(dev, "_reporter", lambda done, total, image: shown.append((done, total, image)))
    monkeypatch.setattr(dev, "PREVIEW_INTERVAL_S", 0.0)
    return shown


def test_ops_make_targets_and_adapt_with_live_previews(models, monkeypatch):
    """What the three nodes compute (ops/adapt.py), hosted: each finished batch of pseudo targets and, at each
    training checkpoint, the adapted restorer's output on the first face are shown live on the node."""
    from facemend.host import device as dev
    from facemend.ops import adapt as op
    from facemend.ops.restore import load_restorer

    root, faces = models
    model_paths.set_models_dirs([str(root)])
    assert op.prior_files() == ["iddpm_ffhq512_ema500000.pth"]  # the LPIPS VGG file beside it is no choice
    (prior,) = op.OPS["FaceMend_DiffusionPriorLoader"](model="iddpm_ffhq512_ema500000.pth")
    restorer = load_restorer("tiny_gfpgan.pth", "fp32")
    shown = _hosted_previews(monkeypatch)
    image = torch.rand(2, 48, 48, 3)
    targets, restored = op.OPS["FaceMend_PseudoTargets"](image, restorer, prior, start_step=1, reg_end_step=1,
                                                         down_factor=16)
    assert targets.shape == image.shape == restored.shape
    assert (targets - restored).abs().mean() > 1e-3        # the prior changed the reference
    # 2 restorer faces, then one prior step per face (batch_size 1): each face's target once it is made
    previews = [(done, img) for done, _, img in shown if img is not None]
    assert [done for done, _ in previews] == [3, 4] and shown[-1][:2] == (4, 4)
    for k, (_, img) in enumerate(previews):
        assert torch.equal(img, dev.preview_image(targets[k:k + 1]))

    shown.clear()
    res = op.adapt(restorer, prior, "node_model", steps=2, lpips_weight=0.0, micro_batch=1, accumulate=1,
                   checkpoint_every=1, start_step=1, reg_end_step=1, down_factor=16, face_crops=image[:1])
    name, plot, adapted = res.outputs
    assert name == "node_model.safetensors" and plot.ndim == 4 and plot.shape[-1] == 3
    assert res.path == str(root / "facerestore_models" / name)
    assert FaceRestorer.from_file(res.path).arch == "GFPGANv1Clean"
    assert adapted.arch == "GFPGANv1Clean" and adapted(image.permute(0, 3, 1, 2)).shape == (2, 3, 48, 48)
    work = os.path.join("output", "facemend_adapt", "node_model")
    assert os.path.isfile(os.path.join(work, "node_model.log.json"))
    # total 1 prior step + 2 training steps: the face's target, then the adapted output at checkpoints 1 and 2
    previews = [(done, img) for done, total, img in shown if img is not None]
    assert [done for done, _ in previews] == [1, 1, 2] and shown[-1][:2] == (3, 3)
    saved = torch.load(os.path.join(work, "targets.pt"), weights_only=True)["targets"]
    assert torch.equal(previews[0][1], dev.preview_image(saved))
    # the last checkpoint is the saved model: its preview is what the adapted restorer outputs on the face
    first = image[:1].permute(0, 3, 1, 2)
    assert torch.equal(previews[2][1], dev.preview_image(adapted(first, seed=0)))
    assert torch.equal(res.after, adapted(first, seed=0).permute(0, 2, 3, 1))
    assert torch.equal(res.before, restorer(first, seed=0).permute(0, 2, 3, 1))
    assert not torch.equal(previews[1][1], previews[2][1])  # step 1's weights restore differently


@pytest.fixture
def comfy_temp(tmp_path, monkeypatch):
    """ComfyUI's temp folder, where node previews are written, moved to a fresh folder (skips without ComfyUI)."""
    facemend_nodes()
    import folder_paths

    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path / "comfy_temp"))
    return tmp_path / "comfy_temp"


def _png(folder, ref) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    assert ref["type"] == "temp"
    png = np.asarray(Image.open(folder / ref["subfolder"] / ref["filename"]))
    return torch.from_numpy(png.astype(np.float32) / 255)


def test_prior_loader_validates_and_fingerprints_the_file(models):
    """A missing prior is named before the run (file, folders searched, where to get it); ComfyUI's list check,
    skipped for the named input, is redone; a replaced file loads again, an unchanged one is not re-read."""
    cls = node_class("FaceMend_DiffusionPriorLoader")
    root, _ = models
    model_paths.set_models_dirs([str(root)])
    assert cls.GET_NODE_INFO_V1()["input"]["required"]["model"][1]["options"] == ["iddpm_ffhq512_ema500000.pth"]
    assert cls.validate_inputs(model="iddpm_ffhq512_ema500000.pth") is True and cls.validate_inputs(None) is True
    assert "not one of the priors" in cls.validate_inputs(model="other.pth")
    path = root / "facemend_priors" / "iddpm_ffhq512_ema500000.pth"
    before = cls.fingerprint_inputs(model="iddpm_ffhq512_ema500000.pth")
    assert cls.fingerprint_inputs(model="iddpm_ffhq512_ema500000.pth") == before
    data = path.read_bytes()
    path.write_bytes(data + b"\0")
    assert cls.fingerprint_inputs(model="iddpm_ffhq512_ema500000.pth") != before
    path.unlink()  # the empty folder still offers the default name: running it would fail in the loader
    msg = cls.validate_inputs(model="iddpm_ffhq512_ema500000.pth")
    assert "'iddpm_ffhq512_ema500000.pth' was not found" in msg and str(root / "facemend_priors") in msg


def test_pseudo_settings_the_generator_refuses_are_refused_before_the_run():
    """What failed after the restorer had run (ddimN, a malformed respacing, a start step beyond the respaced
    schedule, a low-pass factor that does not divide 512) is refused when the prompt is queued; the ranges ComfyUI
    skips for inputs named in validate_inputs are checked; linked inputs (None) are left to the run."""
    for node_id, faces in (("FaceMend_PseudoTargets", {}), ("FaceMend_AdaptRestorer", {"face_crops": None})):
        def check(**kw):
            return node_class(node_id).validate_inputs(**faces, **kw)  # AdaptRestorer: face_crops connected

        assert check() is True and check(respacing="10,15,20", start_step=40, reg_end_step=20) is True
        assert "ddim" in check(respacing="ddim25")
        assert "expected e.g." in check(respacing="fast")
        assert "start_step must be in 1..99" in check(respacing="100")  # start_step 150 > 100 respaced steps
        assert "must divide the image size" in check(down_factor=3)
        assert "start_step must be between 1 and 249" in check(start_step=250)
        assert "down_factor must be between 1 and 64" in check(down_factor=0)
        assert check(respacing=None, start_step=None, reg_end_step=None, down_factor=None) is True


def test_adapt_node_refuses_names_and_folders_before_the_run(models):
    """An existing model name, a folder that is not there (read only when face_crops is not connected), no faces at
    all, a GAN folder that is not there (when the GAN term is on): refused when the prompt is queued, not after
    minutes of pseudo targets or training."""
    cls = node_class("FaceMend_AdaptRestorer")
    root, faces = models
    model_paths.set_models_dirs([str(root)])
    check = cls.validate_inputs
    album = dict(folder=str(faces))
    assert check(name="album", **album) is True
    assert "plain file name" in check(name="../album", **album)
    (root / "facerestore_models" / "taken.safetensors").write_bytes(b"someone's model")
    assert "taken.safetensors exists; FaceMend never overwrites" in check(name="taken", **album)
    assert "face folder not found" in check(folder=str(root / "nope"))
    assert check(folder=str(root / "nope"), face_crops=None) is True  # face_crops linked: the folder is not read
    assert "connect face_crops or give a folder" in check(folder=" ")
    assert check(folder="", face_crops=None) is True
    assert check(gan_real_folder=str(root / "nope"), **album) is True  # not used without the GAN term
    assert "GAN real-face folder not found" in check(gan_weight=0.1, gan_real_folder=str(root / "nope"), **album)
    assert "gan_weight must be between 0 and 10" in check(gan_weight=11.0, **album)
    assert check(name=None, folder=None, gan_weight=None, gan_real_folder=None) is True


def test_adapt_node_fingerprints_the_folders_listing(models):
    """Re-queued on an unchanged folder the node may come from ComfyUI's cache; a photo added, changed or removed
    makes it run again (the folder's name alone does not change)."""
    cls = node_class("FaceMend_AdaptRestorer")
    _, faces = models
    args = dict(name="album", folder=str(faces), gan_real_folder="")
    first = cls.fingerprint_inputs(**args)
    assert cls.fingerprint_inputs(**args) == first
    photo = next(faces.iterdir())
    data = photo.read_bytes()
    (faces / "another.png").write_bytes(data)
    added = cls.fingerprint_inputs(**args)
    assert added != first
    time.sleep(0.01)
    photo.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same name and size, new content (mtime)
    assert cls.fingerprint_inputs(**args) != added
    assert cls.fingerprint_inputs(**{**args, "gan_real_folder": str(faces)}) != cls.fingerprint_inputs(**args)


def test_adapt_node_shows_the_loss_curve_and_a_face_before_and_after(models, comfy_temp, monkeypatch):
    """The output node shows the loss curve and the first face as the restorer gave it | as the adapted one does,
    and says where the model went; standalone nothing is rendered for live previews. The model it saved is not
    refused when the graph is queued again (ComfyUI may take the node from its cache); a file put there otherwise
    is."""
    from facemend.ops import adapt as op
    from facemend.ops.restore import load_restorer
    from facemend.pipelines.adapt.finetune import Finetuner
    from facemend.pipelines.adapt.run import load_face_folder

    cls = node_class("FaceMend_AdaptRestorer")
    root, faces = models
    model_paths.set_models_dirs([str(root)])
    (prior,) = op.OPS["FaceMend_DiffusionPriorLoader"](model="iddpm_ffhq512_ema500000.pth")
    restorer = load_restorer("tiny_gfpgan.pth", "fp32")
    renders = []
    monkeypatch.setattr(Finetuner, "render", lambda self, x: renders.append(x))
    res = cls.execute(restorer, prior, "shown", steps=1, lpips_weight=0.0, micro_batch=1, accumulate=1,
                      checkpoint_every=1, start_step=1, reg_end_step=1, down_factor=16, folder=str(faces))
    assert renders == []  # not hosted: no preview, so no extra restorer call
    name, plot, adapted = res.result
    path = root / "facerestore_models" / "shown.safetensors"
    assert name == "shown.safetensors" and res.ui["text"] == [f"saved {path}"]
    curve, pair = (_png(comfy_temp, ref) for ref in res.ui["images"])
    assert curve.shape == plot.shape[1:] and (curve - plot[0]).abs().max() < 1 / 255
    face = load_face_folder(str(faces), restorer.input_size)[:1]
    s = restorer.input_size
    assert pair.shape == (s, 2 * s + 8, 3)  # before | 8 px gap | after
    below_labels = slice(s * 3 // 4, s)   # the labels cover the top left of each half
    for half, made_by in ((pair[:, :s], restorer), (pair[:, s + 8:], adapted)):
        expect = made_by(face, seed=0)[0].permute(1, 2, 0)
        assert (half[below_labels] - expect[below_labels]).abs().max() < 1 / 255
    assert cls.validate_inputs(name="shown", folder=str(faces)) is True
    time.sleep(0.01)
    path.write_bytes(path.read_bytes())  # replaced after the run (new mtime)
    assert "exists" in cls.validate_inputs(name="shown", folder=str(faces))


def test_pseudo_targets_node_shows_the_targets(models, comfy_temp):
    from facemend.ops import adapt as op
    from facemend.ops.restore import load_restorer

    cls = node_class("FaceMend_PseudoTargets")
    root, _ = models
    model_paths.set_models_dirs([str(root)])
    (prior,) = op.OPS["FaceMend_DiffusionPriorLoader"](model="iddpm_ffhq512_ema500000.pth")
    restorer = load_restorer("tiny_gfpgan.pth", "fp32")
    res = cls.execute(torch.rand(1, 40, 40, 3), restorer, prior, start_step=1, reg_end_step=1, down_factor=16)
    targets, restored = res.result
    (ref,) = res.ui.as_dict()["images"]
    assert (_png(comfy_temp, ref) - targets[0]).abs().max() < 1 / 255
