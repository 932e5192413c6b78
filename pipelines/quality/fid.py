"""FID of a set of images against stored statistics (NTIRE 2025 computes it once over the whole output folder,
VQFR's calculate_fid_folder: FID Inception pool3 features of every image resized to 299 and mapped to [-1, 1]).

The network is pytorch-fid's FID Inception (Apache-2.0; optional extra ``iqa``) built from the local weight file
``pt_inception-2015-12-05-6726825d.pth``; the statistics are a file with the mean and covariance of the
reference set: pytorch-fid's ``.npz`` (mu, sigma) or BasicSR/VQFR's ``.pth`` (mean, cov) such as
``inception_FFHQ_512.pth``. The Frechet distance runs in float64 torch (eigen-decompositions, no scipy).
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from ..io.checkpoints import load_weights, unwrap_state_dict
from ..io.errors import FaceMendError, ModelFileInvalid

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
_STAT_KEYS = (("mu", "sigma"), ("mean", "cov"))


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) for Gaussians N(mu1, S1), N(mu2, S2).

    Tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2), a symmetric PSD matrix, so both steps are
    symmetric eigen-decompositions (stable, no complex parts, unlike a general matrix square root).
    """
    mu1, mu2 = mu1.double().reshape(-1), mu2.double().reshape(-1)
    s1, s2 = sigma1.double(), sigma2.double()
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"statistics do not match: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, sigma "
                         f"{tuple(s1.shape)} / {tuple(s2.shape)}")
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N,D] features -> (mean [D], covariance [D,D]) with N - 1 in the denominator, as numpy.cov."""
    f = features.double()
    if f.shape[0] < 2:
        raise FaceMendError(f"FID needs at least 2 images, got {f.shape[0]}")
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def load_stats(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference statistics from .npz (mu, sigma: pytorch-fid) or .pth/.pt (mean, cov: BasicSR/VQFR)."""
    if not os.path.isfile(path):
        raise ModelFileInvalid(f"FID statistics file not found: {path}")
    if path.lower().endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as d:
                data = {k: torch.from_numpy(d[k]) for k in d.files}
        except Exception as exc:
            raise ModelFileInvalid(f"Cannot read FID statistics {path}: {type(exc).__name__}: {exc}") from exc
    else:
        data = load_weights(path, "cpu")
    data = {k: torch.as_tensor(v) for k, v in data.items() if hasattr(v, "shape")}
    for mk, sk in _STAT_KEYS:
        if mk in data and sk in data:
            mu, sigma = data[mk].double().reshape(-1), data[sk].double()
            if sigma.shape != (mu.numel(), mu.numel()):
                raise ModelFileInvalid(f"{path}: {sk} has shape {tuple(sigma.shape)}, expected "
                                       f"({mu.numel()}, {mu.numel()}) to match {mk}")
            return mu, sigma
    raise ModelFileInvalid(f"{path} holds {sorted(data)}; FID statistics need 'mu' and 'sigma' (pytorch-fid .npz) "
                           "or 'mean' and 'cov' (BasicSR/VQFR .pth, e.g. inception_FFHQ_512.pth)")


@contextlib.contextmanager
def _local_weights(state_dict):
    """pytorch-fid fetches its weights by URL inside fid_inception_v3(); hand it the local file's instead."""
    from pytorch_fid import inception as pfi

    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        yield pfi
    finally:
        pfi.load_state_dict_from_url = original


class FIDInception:
    """``features(images [N,3,H,W] in [0,1]) -> [N,2048]`` pool3 features of the FID Inception."""

    def __init__(self, net: torch.nn.Module):
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str, device="cpu") -> "FIDInception":
        try:
            import pytorch_fid  # noqa: F401
        except ImportError as exc:
            raise FaceMendError("FID needs pytorch-fid (optional extra 'iqa'): pip install pytorch-fid") from exc
        sd = unwrap_state_dict(load_weights(path, "cpu"))
        with _local_weights(sd) as pfi:
            try:
                net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=True,
                                      normalize_input=True, use_fid_inception=True)
            except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or shapes
                raise ModelFileInvalid(f"{path} is not the FID Inception ({INCEPTION_FILE}): "
                                       f"{str(exc).splitlines()[0][:300]}") from exc
        return cls(net.to(device))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(self.device, torch.float32))[0].flatten(1)


def fid_from_features(features: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> float:
    mu, sigma = feature_statistics(features)
    return frechet_distance(mu, sigma, *stats)
