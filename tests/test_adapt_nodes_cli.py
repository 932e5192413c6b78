"""Adaptation through the CLI (`python -m facemend adapt`) and the nodes, with tiny random-weight files laid out
as a user's models folder: facerestore_models/tiny_gfpgan.pth (GFPGAN v1.4 layout, 32 px, narrow 0.125),
facemend_priors/iddpm_ffhq512_ema500000.pth (a small guided-diffusion UNet in the official key layout that
runs at the prior's 512 px: attention only at 16 px) and facemend_priors/vgg16-397923af.pth (random VGG-16
features). One prior step (5 s at 512 px on one CPU thread even for this small UNet) and two training steps:
this checks the wiring, files and messages, not quality (the computation is tested in test_adapt_*.py).
"""
from __future__ import annotations

import os

import pytest
import torch

from facemend import cli
from facemend.host import model_paths
from facemend.pipelines.adapt.prior import PriorUNet, PriorUNetConfig
from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean
from facemend.pipelines.io.images import write_image
from facemend.pipelines.restore.restorer import FaceRestorer

from conftest import FACES, load_image, need_shared

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


def test_nodes_make_targets_and_adapt(models):
    from facemend.nodes.adapt import AdaptRestorer, DiffusionPriorLoader, PseudoTargets
    from facemend.ops.restore import load_restorer

    root, faces = models
    model_paths.set_models_dirs([str(root)])
    assert "iddpm_ffhq512_ema500000.pth" in DiffusionPriorLoader.INPUT_TYPES()["required"]["model"][0]
    (prior,) = DiffusionPriorLoader().load("iddpm_ffhq512_ema500000.pth")
    restorer = load_restorer("tiny_gfpgan.pth", "fp32")
    image = torch.rand(1, 48, 48, 3)
    targets, restored = PseudoTargets().run(image, restorer, prior, start_step=1, reg_end_step=1, down_factor=16)
    assert targets.shape == image.shape == restored.shape
    assert (targets - restored).abs().mean() > 1e-3        # the prior changed the reference
    res = AdaptRestorer().run(restorer, prior, "node_model", steps=1, lpips_weight=0.0, micro_batch=1,
                              accumulate=1, start_step=1, reg_end_step=1, down_factor=16, face_crops=image)
    name, plot, adapted = res["result"]
    assert name == "node_model.safetensors" and plot.ndim == 4 and plot.shape[-1] == 3
    assert FaceRestorer.from_file(str(root / "facerestore_models" / name)).arch == "GFPGANv1Clean"
    assert adapted.arch == "GFPGANv1Clean" and adapted(image.permute(0, 3, 1, 2)).shape == (1, 3, 48, 48)
    assert os.path.isfile(os.path.join("output", "facemend_adapt", "node_model", "node_model.log.json"))
