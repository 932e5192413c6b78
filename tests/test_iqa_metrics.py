"""pyiqa metrics loaded from local files in the official layout (pipelines/quality/metrics.py).

No real IQA weights exist offline: each test builds the real pyiqa architecture with random weights, saves it
as the official checkpoint is laid out (a flat state dict, as pyiqa's load_pretrained_network reads it),
loads it through our loader and checks the score equals pyiqa's own loading path on the same file, with
HF_HUB_OFFLINE=1 (conftest) and no network. CLIP-IQA needs the `clip` package (openai-clip), which needs
setuptools' pkg_resources (setuptools < 81): its test skips where that is missing. Q-Align (~15 GB) is not
loadable by design.
"""
import pytest
import torch

from facemend.pipelines.io.errors import FaceMendError, ModelFileInvalid

pytest.importorskip("pyiqa", reason="pyiqa (optional extra 'iqa') not installed")
from facemend.pipelines.quality import metrics as M  # noqa: E402

from conftest import rounding_bound  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _random_net(name, seed=0):
    torch.manual_seed(seed)
    net = M.build_pyiqa_net(name)
    with torch.no_grad():  # pyiqa zero-initialises some heads: give every tensor random values
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net.eval()


def test_musiq_loads_official_layout_and_equals_pyiqa(tmp_path):
    from pyiqa.archs.arch_util import load_pretrained_network
    from pyiqa.archs.musiq_arch import MUSIQ

    path = tmp_path / M.SPECS["musiq"].file
    torch.save(_random_net("musiq").state_dict(), path)
    metric = M.load_metric("musiq", str(path))
    ref = MUSIQ(pretrained=False).eval()
    load_pretrained_network(ref, str(path), True)  # what pyiqa does with the downloaded file
    x = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = metric.score(x)
        expected = ref(x).reshape(-1)
    assert got.shape == (2,)
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    assert not metric.lower_better and metric.score_range == (0.0, 100.0)


def test_musiq_as_loss_is_differentiable_and_lower_is_better(tmp_path):
    path = tmp_path / "musiq.pth"
    torch.save(_random_net("musiq").state_dict(), path)
    metric = M.load_metric("musiq", str(path))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss = metric.as_loss(x)
    loss.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # The same forward pass, then a division and a subtraction.
    assert torch.allclose(loss.detach(), 1 - metric.score(x.detach()) / 100, rtol=0, atol=rounding_bound(2))


def test_maniqa_loads_official_layout_without_timm_download(tmp_path, monkeypatch):
    """Every tensor of the saved random network arrives, and the metric scores offline (pyiqa's own loading path
    is compared in the MUSIQ test; MANIQA is a 136M-parameter ViT-B/8 + Swin, about 10 s per 224 crop here)."""
    pytest.importorskip("timm", reason="MANIQA needs timm")
    import timm

    path = tmp_path / M.SPECS["maniqa"].file
    ref = _random_net("maniqa")
    torch.save(ref.state_dict(), path)
    calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k.get("pretrained")) or real(*a, **k))
    metric = M.load_metric("maniqa", str(path))
    assert calls == [False]  # the ViT was built empty: no hub download attempted
    saved, loaded = ref.state_dict(), metric.module.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    metric.module.test_sample = 1  # one 224 crop instead of 20: CPU time
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = metric.score(x)
    assert got.shape == (1,) and torch.isfinite(got).all()


def test_clipiqa_loads_a_local_clip_file(tmp_path):
    import importlib.util
    import sys

    if importlib.util.find_spec("clip") is None:
        pytest.skip("CLIP-IQA needs openai-clip (the iqa extra)")
    M._import_pyiqa_archs()
    from pyiqa.archs.clip_model import CLIP

    assert "pkg_resources" not in sys.modules or importlib.util.find_spec("pkg_resources") is not None

    torch.manual_seed(0)
    clip_net = CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12)  # OpenAI RN50 hyper-parameters
    # OpenAI's release is a traced TorchScript archive; converted state dicts exist too: both must load.
    archive, plain = tmp_path / "RN50.pt", tmp_path / "RN50_state.pth"
    clip_net.eval()
    with torch.no_grad():
        traced = torch.jit.trace(clip_net, (torch.rand(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)),
                                 check_trace=False)
    torch.jit.save(traced, archive)
    torch.save(clip_net.state_dict(), plain)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    scores = []
    for path in (archive, plain):
        metric = M.load_metric("clipiqa", str(path))
        scores.append(metric.score(x))
        assert scores[-1].shape == (2,) and ((0 <= scores[-1]) & (scores[-1] <= 1)).all()
    assert torch.allclose(scores[0], scores[1], atol=1e-5)
    loss = metric.as_loss(x.clone().requires_grad_(True))
    assert loss.requires_grad


def test_wrong_or_junk_weight_files_are_refused(tmp_path):
    path = tmp_path / "musiq_koniq_ckpt-e95806b9.pth"
    sd = _random_net("musiq").state_dict()
    sd.pop(next(iter(sd)))
    sd["head.extra"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(ModelFileInvalid, match=r"1 missing .*1 unexpected"):
        M.load_metric("musiq", str(path))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileInvalid, match="Cannot read model file"):
        M.load_metric("musiq", str(junk))
    with pytest.raises(FaceMendError, match="15 GB"):
        M.load_metric("qalign", "x")
    with pytest.raises(ValueError, match="unknown IQA metric"):
        M.load_metric("brisque", "x")


def test_a_metric_loaded_under_inference_mode_still_works_as_a_loss(tmp_path):
    """ComfyUI runs the IQA loader node under torch.inference_mode(); the NTIRE tuning then backpropagates
    through the metric (found by running the ntire_full graph in a real ComfyUI)."""
    path = tmp_path / "musiq.pth"
    torch.save(_random_net("musiq").state_dict(), path)
    with torch.inference_mode():
        metric = M.load_metric("musiq", str(path))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    metric.as_loss(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
