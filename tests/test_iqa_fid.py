"""FID (pipelines/quality/fid.py): the Frechet distance against scipy and closed forms, statistics files in both layouts,
the FID Inception loaded from a local file in pytorch-fid's layout (random weights) without any download."""
import numpy as np
import pytest
import torch

from facemend.pipelines.io.errors import FaceMendError, ModelFileInvalid
from facemend.pipelines.quality.fid import FIDInception, feature_statistics, fid_from_features, frechet_distance, load_stats

from conftest import rounding_bound


def _random_cov(d, seed):
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_matches_scipy_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    d = 64
    mu1 = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mu2 = torch.randn(d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s1, s2 = _random_cov(d, 3), _random_cov(d, 4)
    covmean = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy())
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * np.trace(covmean))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_distance_closed_forms():
    d = 16
    a = torch.rand(d, dtype=torch.float64) + 0.5
    b = torch.rand(d, dtype=torch.float64) + 0.5
    mu = torch.zeros(d, dtype=torch.float64)
    shift = torch.full((d,), 0.5, dtype=torch.float64)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2, plus the squared mean shift
    expected = float((shift ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(mu, torch.diag(a), shift, torch.diag(b)) == pytest.approx(expected, rel=1e-10)
    s = _random_cov(d, 5)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)


def test_statistics_files_in_both_layouts(tmp_path):
    feats = torch.randn(50, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, sigma = feature_statistics(feats)
    # float64, two summation orders of 50 products of values up to max|x|^2.
    tol = rounding_bound(2 * 50 + 2, float(feats.abs().max()) ** 2, dtype=torch.float64)
    assert np.abs(sigma.numpy() - np.cov(feats.numpy(), rowvar=False)).max() <= tol
    np.savez(tmp_path / "ffhq.npz", mu=mu.numpy(), sigma=sigma.numpy())
    torch.save({"mean": mu, "cov": sigma}, tmp_path / "inception_FFHQ_512.pth")
    for name in ("ffhq.npz", "inception_FFHQ_512.pth"):
        m, s = load_stats(str(tmp_path / name))
        assert torch.equal(m.double(), mu) and torch.equal(s.double(), sigma)  # stored and read back exactly
    assert fid_from_features(feats, (mu, sigma)) == pytest.approx(0.0, abs=1e-9)
    np.savez(tmp_path / "bad.npz", mean_wrong=mu.numpy())
    with pytest.raises(ModelFileInvalid, match="'mu' and 'sigma'"):
        load_stats(str(tmp_path / "bad.npz"))
    with pytest.raises(FaceMendError, match="at least 2 images"):
        feature_statistics(feats[:1])


def test_fid_inception_loads_local_pytorch_fid_layout_without_download(tmp_path):
    pytest.importorskip("pytorch_fid", reason="pytorch-fid (optional extra 'iqa') not installed")
    from torchvision.models.inception import Inception3

    torch.manual_seed(0)
    # The FID Inception has torchvision's Inception-v3 parameters with 1008 classes and no aux head: its layout.
    ref = Inception3(num_classes=1008, aux_logits=False, init_weights=False).eval()
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(ref.state_dict(), path)
    net = FIDInception.from_file(str(path))
    loaded = net.net.state_dict()
    # every tensor of the file arrived in the network (pytorch-fid names blocks differently: compare by value)
    def fingerprint(sd):
        return sorted((t.numel(), round(float(t.double().sum()), 6)) for t in sd.values())

    kept = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}  # pool3 needs no classifier
    assert len(loaded) == len(kept) and fingerprint(loaded) == fingerprint(kept)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = net.features(x)
    assert f.shape == (3, 2048) and torch.isfinite(f).all()
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(ModelFileInvalid, match="not the FID Inception"):
        FIDInception.from_file(str(bad))
