"""No-reference IQA metrics behind one small interface, weights from local files only.

``load_metric(name, weights_path, device)`` -> IQAMetric with
  ``score(images [N,3,H,W] in [0,1]) -> [N]`` (the metric's own scale; keeps the autograd graph when grad is
  enabled and the metric is differentiable) and
  ``as_loss(images) -> [N]`` differentiable badness, lower is better, scaled by the metric's range to about
  0..1 (higher-better metrics: (hi - s) / (hi - lo), e.g. 1 - CLIP-IQA; lower-better: (s - lo) / (hi - lo)).

NIQE is ours (pipelines/quality/niqe.py, needs only the 12 KB pristine parameters). CLIP-IQA, MANIQA and MUSIQ are
pyiqa's architectures (optional extra ``iqa``: pyiqa's code is PolyForm Noncommercial, its weights CC BY-NC-SA),
built with ``pretrained=False`` and filled from the user's local weight file: nothing is ever downloaded.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..io.checkpoints import load_weights, unwrap_state_dict
from ..io.errors import FaceMendError, ModelFileInvalid
from .niqe import NIQE, PARAMS_FILE

HF_WEIGHTS = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    file: str  # default weight-file name in the facemend_iqa folder
    lower_better: bool
    score_range: tuple
    differentiable: bool
    arch: str = ""  # pyiqa architecture class
    options: dict = field(default_factory=dict)  # pyiqa's default options for the NTIRE metric name


SPECS = {s.name: s for s in (
    MetricSpec("niqe", PARAMS_FILE, True, (0.0, 100.0), False),
    MetricSpec("clipiqa", "RN50.pt", False, (0.0, 1.0), True, "CLIPIQA", {}),
    MetricSpec("maniqa", "ckpt_koniq10k.pt", False, (0.0, 1.0), True, "MANIQA",
               {"train_dataset": "koniq", "scale": 0.8}),
    MetricSpec("musiq", "musiq_koniq_ckpt-e95806b9.pth", False, (0.0, 100.0), True, "MUSIQ", {}),
)}
METRIC_NAMES = tuple(SPECS)
NOT_SUPPORTED = {
    "qalign": "Q-Align (q-future/one-align, an mPLUG-Owl2 7B model) needs about 15 GB of GPU memory and a full "
              "Hugging Face snapshot; FaceMend does not load it. Score it with pyiqa directly "
              "(pyiqa.create_metric('qalign')) where that memory is available.",
}


class IQAMetric:
    """A loaded metric: ``score`` and ``as_loss`` on [N,3,H,W] images in [0,1] on any device."""

    def __init__(self, spec: MetricSpec, fn, module: torch.nn.Module | None = None, weights: str = ""):
        self.spec = spec
        self.name = spec.name
        self.lower_better = spec.lower_better
        self.score_range = spec.score_range
        self.differentiable = spec.differentiable
        self.weights = weights
        self._fn = fn
        self.module = module

    @property
    def device(self) -> torch.device:
        if self.module is not None:
            return next(self.module.parameters()).device
        return self._fn.device

    def to(self, device) -> "IQAMetric":
        if self.module is not None:
            self.module.to(device)
        else:
            self._fn = self._fn.to(device)
        return self

    def score(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images [N,3,H,W], got {tuple(images.shape)}")
        out = self._fn(images.to(self.device, torch.float32))
        return out.reshape(images.shape[0], -1).mean(1).float()

    def as_loss(self, images: torch.Tensor) -> torch.Tensor:
        if not self.differentiable:
            raise FaceMendError(f"{self.name} is not differentiable (rounded luma and a grid search, as the "
                                "reference) and cannot be used as a loss; use it as a validation score instead.")
        lo, hi = self.score_range
        s = self.score(images)
        return (s - lo) / (hi - lo) if self.lower_better else (hi - s) / (hi - lo)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.score(images)

    def __repr__(self) -> str:
        return f"IQAMetric({self.name}, {'lower' if self.lower_better else 'higher'} is better, {self.weights})"


@contextlib.contextmanager
def _pkg_resources_for_openai_clip():
    """openai-clip does `from pkg_resources import packaging` at import, and setuptools >= 81 no longer ships
    pkg_resources. Lend it a module holding only the standalone `packaging` while pyiqa imports it, then take
    it back, so nothing else in the process ever sees a partial pkg_resources."""
    import importlib.util
    import sys
    import types

    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        yield
        return
    import packaging.version  # noqa: F401  (clip uses packaging.version.parse)

    stand_in = types.ModuleType("pkg_resources")
    stand_in.packaging = sys.modules["packaging"]
    sys.modules["pkg_resources"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("pkg_resources") is stand_in:
            del sys.modules["pkg_resources"]


def _import_pyiqa_archs():
    try:
        with _pkg_resources_for_openai_clip():
            import pyiqa.archs  # noqa: F401  (registers the architectures)
            try:
                import pyiqa.archs.clipiqa_arch  # noqa: F401
            except ImportError:
                pass  # CLIP-IQA alone needs openai-clip: said when it is asked for
    except ImportError as exc:
        raise FaceMendError(
            f"This metric needs the optional 'iqa' extra (pyiqa, non-commercial licence): "
            f"pip install --no-deps pyiqa  (plus timm for MANIQA, openai-clip for CLIP-IQA). Import failed: {exc}"
        ) from exc


@contextlib.contextmanager
def _no_timm_download():
    """MANIQA builds its ViT with timm.create_model(..., pretrained=True); the checkpoint holds those weights too,
    so build it empty (a download would otherwise be attempted)."""
    import timm

    original = timm.create_model

    def create_model(*args, **kwargs):
        kwargs["pretrained"] = False
        return original(*args, **kwargs)

    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = original


def build_pyiqa_net(name: str, weights_path: str | None = None) -> torch.nn.Module:
    """The pyiqa architecture of `name` with pyiqa's default options, no weights loaded (random init), CPU.
    CLIP-IQA needs the CLIP file already at construction (pyiqa builds CLIP from it)."""
    spec = SPECS[name]
    _import_pyiqa_archs()
    if name == "clipiqa":
        try:
            with _pkg_resources_for_openai_clip():
                from pyiqa.archs import clipiqa_arch
        except ImportError as exc:
            raise FaceMendError(f"CLIP-IQA needs the openai-clip package (pip install openai-clip): {exc}") from exc
        from pyiqa.archs.clip_model import build_model

        state = _clip_state_dict(weights_path)
        original = clipiqa_arch.load
        # pyiqa's CLIP loader re-reads a half-consumed file handle when the file is not TorchScript; build the
        # CLIP network from the state dict read here instead.
        clipiqa_arch.load = lambda *_args, **_kwargs: build_model(dict(state)).float()
        try:
            net = clipiqa_arch.CLIPIQA(backbone=weights_path, pretrained=False)
        finally:
            clipiqa_arch.load = original
        # pyiqa keeps CLIP in a list (out of its state dict); register it too, so that .to(device), the
        # device lookup and requires_grad_(False) reach it.
        net.clip_backbone = net.clip_model[0]
        return net
    if name == "maniqa":
        from pyiqa.archs.maniqa_arch import MANIQA

        with _no_timm_download():
            return MANIQA(pretrained=False, **spec.options)
    if name == "musiq":
        from pyiqa.archs.musiq_arch import MUSIQ

        return MUSIQ(pretrained=False, **spec.options)
    raise KeyError(name)


def _clip_state_dict(path: str) -> dict:
    """OpenAI's RN50.pt is a TorchScript archive (tensors and TorchScript code, no pickle); a converted
    state dict (.pth / .safetensors) is read with load_weights."""
    try:
        return torch.jit.load(path, map_location="cpu").state_dict()
    except RuntimeError:
        return unwrap_state_dict(load_weights(path, "cpu"))


def _load_state(net: torch.nn.Module, path: str, name: str) -> None:
    sd = unwrap_state_dict(load_weights(path, "cpu"))
    own = net.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} of another shape (e.g. {k}: file {tuple(sd[k].shape)}, "
                          f"model {tuple(own[k].shape)})")
        raise ModelFileInvalid(f"{path} does not hold {name} weights in pyiqa's layout: {'; '.join(detail)} keys. "
                               f"Expected {SPECS[name].file}.")
    net.load_state_dict(sd, strict=True)


def load_metric(name: str, weights_path: str, device: torch.device | str = "cpu") -> IQAMetric:
    """Build metric `name` from its local weight file (see SPECS for the file each expects)."""
    # Built outside inference mode (ComfyUI runs loader nodes under it): weights made there are inference
    # tensors, which the per-image tuning's IQA losses cannot backpropagate through.
    with torch.inference_mode(False):
        return _load_metric(name, weights_path, device)


def _load_metric(name: str, weights_path: str, device) -> IQAMetric:
    if name in NOT_SUPPORTED:
        raise FaceMendError(NOT_SUPPORTED[name])
    if name not in SPECS:
        raise ValueError(f"unknown IQA metric {name!r}; choose from {', '.join(METRIC_NAMES)}")
    spec = SPECS[name]
    if name == "niqe":
        return IQAMetric(spec, NIQE.from_file(weights_path, device=device), weights=weights_path)
    if name == "clipiqa":
        try:
            net = build_pyiqa_net(name, weights_path)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ModelFileInvalid(f"{weights_path} is not an OpenAI CLIP RN50 file ({type(exc).__name__}: "
                                   f"{str(exc)[:300]}). CLIP-IQA expects {spec.file}.") from exc
    else:
        net = build_pyiqa_net(name)
        _load_state(net, weights_path, name)
    net = net.eval().to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    return IQAMetric(spec, net, module=net, weights=weights_path)
