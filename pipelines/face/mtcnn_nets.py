"""The three MTCNN networks (P-, R-, O-Net) in PyTorch and their weights, read from the PyPI package `mtcnn`
(MIT licence, version 1.x: `mtcnn/assets/weights/{pnet,rnet,onet}.lz4`, each a joblib/lz4 pickle of the Keras
`model.get_weights()` list). That package imports TensorFlow when imported, so it is never imported: its folder is
located with `importlib.util.find_spec` and only the three files are read. Keras conv kernels [kh,kw,in,out] become
[out,in,kh,kw], dense kernels are transposed, R-/O-Net's `Permute((2,1,3))` + `Flatten` (NHWC -> W,H,C order) and
TF's 'same' max pooling (padding at the end) are reproduced exactly. The detector around them is mtcnn.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io.errors import ModelFileInvalid, ModelFileNotFound

__all__ = ["mtcnn_weight_files", "load_mtcnn_weights"]

_INSTALL_HINT = ("The embedded MTCNN face detector uses the weights shipped in the PyPI package 'mtcnn' (MIT); "
                 "install it with `pip install mtcnn` (it brings joblib and lz4; TensorFlow is not needed).")

# Keras get_weights() shapes, in order, for each network (checked against mtcnn 1.0.0).
_EXPECTED_SHAPES = {
    "pnet": [(3, 3, 3, 10), (10,), (1, 1, 10), (3, 3, 10, 16), (16,), (1, 1, 16), (3, 3, 16, 32), (32,), (1, 1, 32),
             (1, 1, 32, 4), (4,), (1, 1, 32, 2), (2,)],
    "rnet": [(3, 3, 3, 28), (28,), (1, 1, 28), (3, 3, 28, 48), (48,), (1, 1, 48), (2, 2, 48, 64), (64,), (1, 1, 64),
             (576, 128), (128,), (128,), (128, 4), (4,), (128, 2), (2,)],
    "onet": [(3, 3, 3, 32), (32,), (1, 1, 32), (3, 3, 32, 64), (64,), (1, 1, 64), (3, 3, 64, 64), (64,), (1, 1, 64),
             (2, 2, 64, 128), (128,), (1, 1, 128), (1152, 256), (256,), (256,), (256, 4), (4,), (256, 10), (10,),
             (256, 2), (2,)],
}


# --------------------------------------------------------------------------------------------- weights

def mtcnn_weight_files() -> dict[str, Path]:
    """Paths of pnet/rnet/onet.lz4 inside the installed `mtcnn` package, without importing it."""
    try:
        spec = importlib.util.find_spec("mtcnn")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileNotFound("Python package 'mtcnn' is not installed. " + _INSTALL_HINT)
    roots = [Path(p) for p in spec.submodule_search_locations]
    files = {}
    for name in ("pnet", "rnet", "onet"):
        for root in roots:
            path = root / "assets" / "weights" / f"{name}.lz4"
            if path.is_file():
                files[name] = path
                break
        else:
            raise ModelFileNotFound(
                f"MTCNN weight file {name}.lz4 not found in {roots[0] / 'assets' / 'weights'} "
                f"(the 'mtcnn' package there is incomplete or too old). Reinstall it: `pip install -U mtcnn`. "
                + _INSTALL_HINT)
    return files


def load_mtcnn_weights(files: dict[str, Path] | None = None) -> dict[str, list]:
    """The three Keras weight lists (numpy float32 arrays) as stored by the `mtcnn` package, shape-checked.

    The files are joblib pickles; they are read only from the installed `mtcnn` package (code the user installed),
    never from user-supplied model folders."""
    files = files or mtcnn_weight_files()
    try:
        import joblib
    except ImportError as e:
        raise ModelFileNotFound(f"reading the MTCNN weights needs joblib ({e}). " + _INSTALL_HINT) from e
    out = {}
    for name, path in files.items():
        try:
            arrays = joblib.load(path)
        except Exception as e:  # noqa: BLE001 - say which file, and whether a package is missing
            if "lz4" in str(e).lower() and importlib.util.find_spec("lz4") is None:  # joblib raises ValueError
                raise ModelFileNotFound(f"reading {path} needs the Python package 'lz4'. " + _INSTALL_HINT) from e
            raise ModelFileInvalid(f"cannot read MTCNN weight file {path}: {type(e).__name__}: {e}. "
                                   "Reinstall the package: `pip install --force-reinstall mtcnn`.") from e
        shapes = [tuple(getattr(a, "shape", ())) for a in arrays] if isinstance(arrays, (list, tuple)) else None
        if shapes != _EXPECTED_SHAPES[name]:
            raise ModelFileInvalid(f"MTCNN weight file {path} does not hold the expected {name.upper()} layout "
                                   f"(got {shapes if shapes is not None else type(arrays).__name__}); "
                                   "reinstall `pip install --force-reinstall mtcnn`.")
        out[name] = list(arrays)
    return out


def _conv(kernel) -> torch.Tensor:  # Keras [kh, kw, in, out] -> torch [out, in, kh, kw]
    return torch.from_numpy(kernel.copy()).permute(3, 2, 0, 1).contiguous()


def _dense(kernel) -> torch.Tensor:  # Keras [in, out] -> torch Linear [out, in]
    return torch.from_numpy(kernel.copy()).t().contiguous()


def _vec(a) -> torch.Tensor:  # bias / PReLU alpha ([C] or [1,1,C]) -> [C]
    return torch.from_numpy(a.copy()).reshape(-1)


# --------------------------------------------------------------------------------------------- networks

def _max_pool_same(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow MaxPooling2D(padding='same'): output ceil(n/s), padding split floor/ceil, pads ignored."""
    def pads(n: int) -> tuple[int, int]:
        total = max((-(-n // s) - 1) * s + k - n, 0)
        return total // 2, total - total // 2
    (t, b), (l, r) = pads(x.shape[-2]), pads(x.shape[-1])
    if not t and not l and all(-(-n // s) == -(-(n - k) // s) + 1 for n in x.shape[-2:]):
        # padding only at the end: ceil_mode's last window, cut at the border, takes the maximum of the same
        # elements (the -inf pads never win), without the padded copy
        return F.max_pool2d(x, k, s, ceil_mode=True)
    if t or b or l or r:
        x = F.pad(x, (l, r, t, b), value=float("-inf"))
    return F.max_pool2d(x, k, s)


def _max_pool_2x2_same(x: torch.Tensor) -> torch.Tensor:
    """TF MaxPooling2D(2, 2, 'same') (pads only at the end when odd), as strided maxima: about 3x faster on CPU
    than max_pool2d and identical."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), value=float("-inf"))
    return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                         torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


def _keras_flatten(x: torch.Tensor) -> torch.Tensor:
    """Keras Permute((2,1,3)) + Flatten on NHWC == [N,C,H,W] -> [N,W,H,C] -> flat."""
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class _PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 4, 1)
        self.conv4_2 = nn.Conv2d(32, 2, 1)

    def forward(self, x):
        x = _max_pool_2x2_same(self.prelu1(self.conv1(x)))
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        reg = self.conv4_1(x).float()                                   # [B,4,h,w]: dx1, dy1, dx2, dy2
        prob = torch.softmax(self.conv4_2(x).float(), dim=1)[:, 1]       # [B,h,w]
        return reg, prob

    def load_keras(self, w):
        layers = [(self.conv1, self.prelu1), (self.conv2, self.prelu2), (self.conv3, self.prelu3)]
        i = 0
        for conv, prelu in layers:
            conv.weight.data, conv.bias.data, prelu.weight.data = _conv(w[i]), _vec(w[i + 1]), _vec(w[i + 2])
            i += 3
        self.conv4_1.weight.data, self.conv4_1.bias.data = _conv(w[9]), _vec(w[10])
        self.conv4_2.weight.data, self.conv4_2.bias.data = _conv(w[11]), _vec(w[12])


class _RNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.fc4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.fc5_1 = nn.Linear(128, 4)
        self.fc5_2 = nn.Linear(128, 2)

    def forward(self, x):                                                # [N,3,24,24]
        x = _max_pool_same(self.prelu1(self.conv1(x)), 3, 2)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)               # 'valid'
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.fc4(_keras_flatten(x)))
        return self.fc5_1(x).float(), torch.softmax(self.fc5_2(x).float(), dim=1)[:, 1]

    def load_keras(self, w):
        i = 0
        for conv, prelu in [(self.conv1, self.prelu1), (self.conv2, self.prelu2), (self.conv3, self.prelu3)]:
            conv.weight.data, conv.bias.data, prelu.weight.data = _conv(w[i]), _vec(w[i + 1]), _vec(w[i + 2])
            i += 3
        self.fc4.weight.data, self.fc4.bias.data, self.prelu4.weight.data = _dense(w[9]), _vec(w[10]), _vec(w[11])
        self.fc5_1.weight.data, self.fc5_1.bias.data = _dense(w[12]), _vec(w[13])
        self.fc5_2.weight.data, self.fc5_2.bias.data = _dense(w[14]), _vec(w[15])


class _ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.fc5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.fc6_1 = nn.Linear(256, 4)
        self.fc6_2 = nn.Linear(256, 10)
        self.fc6_3 = nn.Linear(256, 2)

    def forward(self, x):                                                # [N,3,48,48]
        x = _max_pool_same(self.prelu1(self.conv1(x)), 3, 2)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)               # 'valid'
        x = _max_pool_same(self.prelu3(self.conv3(x)), 2, 2)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.fc5(_keras_flatten(x)))
        # box offsets [N,4]; landmarks [N,10] as x1..x5, y1..y5 (relative to the box); face probability [N]
        return self.fc6_1(x).float(), self.fc6_2(x).float(), torch.softmax(self.fc6_3(x).float(), dim=1)[:, 1]

    def load_keras(self, w):
        i = 0
        for conv, prelu in [(self.conv1, self.prelu1), (self.conv2, self.prelu2), (self.conv3, self.prelu3),
                            (self.conv4, self.prelu4)]:
            conv.weight.data, conv.bias.data, prelu.weight.data = _conv(w[i]), _vec(w[i + 1]), _vec(w[i + 2])
            i += 3
        self.fc5.weight.data, self.fc5.bias.data, self.prelu5.weight.data = _dense(w[12]), _vec(w[13]), _vec(w[14])
        self.fc6_1.weight.data, self.fc6_1.bias.data = _dense(w[15]), _vec(w[16])
        self.fc6_2.weight.data, self.fc6_2.bias.data = _dense(w[17]), _vec(w[18])
        self.fc6_3.weight.data, self.fc6_3.bias.data = _dense(w[19]), _vec(w[20])
