"""The NTIRE 2025/2026 Real-World Face Restoration identity check: AdaFace IR-50 (MS1MV2) with the organisers'
alignment (reference/methods.md 7.2; zhengchen1999/NTIRE2025_RealWorld_Face_Restoration and
jkwang28/NTIRE2026_RealWorld_Face_Restoration, face_alignment/inference.py, inference_face).

What the organisers compute per image, and this module reproduces:
- the input's five landmarks (left eye, right eye, nose, mouth left, mouth right; from their landmark CSV);
- a similarity transform from those points to the 112x112 reference points, fitted as MATLAB's cp2tform does
  (AdaFace face_alignment/mtcnn_pytorch/src/align_trans.py + matlab_cp2tform.py, see ntire_transform);
- both the 8-bit input and the 8-bit output warped with it by cv2.warpAffine (bilinear, black border) — the same
  OpenCV call, so the crops are the organisers' own bytes for a given OpenCV;
- BGR, (x/255 - 0.5)/0.5, AdaFace IR-50 (mk-minchul/AdaFace net.py), and the dot product of the unit embeddings.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn

from ..io.errors import FaceMendError, ModelFileInvalid, ModelFileNotFound

INPUT_SIZE = 112
CHECKPOINT_FILE = "adaface_ir50_ms1mv2.ckpt"
# align_trans.py's REFERENCE_FACIAL_POINTS for a 96x112 crop, shifted by 8 px to centre them in 112x112
# (get_reference_facial_points(default_square=True)); the organisers read them as float32.
_REF_96x112 = np.array([[30.29459953, 51.69630051], [65.53179932, 51.50139999], [48.02519989, 71.73660278],
                        [33.54930115, 92.3655014], [62.72990036, 92.20410156]])
REFERENCE_112 = np.float32(_REF_96x112 + np.array([8.0, 0.0]))
# IR-50: (channels, units) per stage; the first unit of each stage halves the resolution (112 -> 7).
IR50_STAGES = ((64, 3), (128, 4), (256, 14), (512, 3))


# ----------------------------------------------------------------------------------------------- network
class _IRUnit(nn.Module):
    """net.py's BasicBlockIR: BN-conv-BN-PReLU-conv-BN plus an identity (strided) or 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        # MaxPool2d(1, stride) is a strided subsample; kept as a module so the layout matches net.py's.
        self.shortcut_layer = (nn.MaxPool2d(1, stride) if cin == cout else
                               nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class AdaFaceIRNet(nn.Module):
    """AdaFace's Backbone(input_size=(112,112), mode='ir') with its state-dict names (input_layer, body,
    output_layer). forward: [N,3,112,112] BGR in [-1,1] -> ([N,512] unit embeddings, [N,1] norms)."""

    def __init__(self, stages=IR50_STAGES):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        units, cin = [], 64
        for cout, n in stages:
            units += [_IRUnit(cin, cout, 2)] + [_IRUnit(cout, cout, 1) for _ in range(n - 1)]
            cin = cout
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(cin), nn.Dropout(0.4), nn.Flatten(),
                                          nn.Linear(cin * 7 * 7, 512), nn.BatchNorm1d(512, affine=False))

    def forward(self, x):
        x = self.output_layer(self.body(self.input_layer(x)))
        norm = torch.norm(x, 2, 1, True)
        return torch.div(x, norm), norm


# ----------------------------------------------------------------------------------------------- checkpoint
# Inert containers a Lightning checkpoint pickles besides tensors, allowed by name (Lightning's AttributeDict, a
# dict subclass holding the hyper-parameters, read as a dict); any other global is refused, nothing is executed.
_CKPT_GLOBALS = [(dict, "pytorch_lightning.utilities.parsing.AttributeDict"),
                 (dict, "lightning_fabric.utilities.data.AttributeDict"),
                 (dict, "lightning.fabric.utilities.data.AttributeDict")]


def _read_checkpoint(path: str):
    import argparse
    import pickle

    from ..io.checkpoints import load_weights

    if not path.lower().endswith((".ckpt", ".pth", ".pt")):
        return load_weights(path)  # .safetensors: a converted state dict
    with torch.serialization.safe_globals(_CKPT_GLOBALS + [argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Unsupported global" not in str(exc):  # junk bytes: the shared loader's message names the file
                return load_weights(path)
            # a global outside the list above: refuse, say which
            why = str(exc).split("WeightsUnpickler error:")[-1].strip()
            first = (why.splitlines() or ["(no message)"])[0][:300]
            raise ModelFileInvalid(f"{path} holds Python objects other than weights ({first}); AdaFace's "
                                   f"{CHECKPOINT_FILE} from the AdaFace README loads as it is, or save "
                                   "{k: v for k, v in ckpt['state_dict'].items()} as .safetensors") from exc
        except Exception:
            return load_weights(path)  # corrupt/truncated files: the shared loader's message names the file


def adaface_state_dict(obj, path: str) -> dict:
    """The backbone's weights from AdaFace's checkpoint layout: {'state_dict': {'model.<key>': ..., 'head.kernel':
    ...}} (a PyTorch Lightning checkpoint; inference.py keeps the 'model.' keys and strips the prefix). A plain
    state dict of the backbone (no prefix) is taken as it is."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ModelFileInvalid(f"{path} holds a {type(obj).__name__}, not an AdaFace checkpoint "
                               "(expected {'state_dict': {'model.input_layer.0.weight': ...}})")
    if any(isinstance(k, str) and k.startswith("model.") for k in sd):
        sd = {k[6:]: v for k, v in sd.items() if k.startswith("model.")}
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_adaface(path: str, device="cpu") -> AdaFaceIRNet:
    """AdaFace IR-50 from `path` (the official adaface_ir50_ms1mv2.ckpt, unchanged); strict keys and shapes."""
    from ..io.checkpoints import check_keys

    if not os.path.isfile(path):
        raise ModelFileNotFound(f"AdaFace model not found: {path}")
    sd = adaface_state_dict(_read_checkpoint(path), path)
    net = AdaFaceIRNet()
    check_keys(sd, net, path, "AdaFace IR-50 (adaface_ir50_ms1mv2.ckpt)")
    net.load_state_dict(sd, strict=True)
    return net.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------- alignment
def _fit_template_to_points(points: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Least-squares non-reflective similarity in cp2tform's direction: template -> image points, solved as
    [x y 1 0; y -x 0 1] r = [u; v]; returns the 3x3 row-vector matrix image -> template (its inverse with the
    last column set to (0, 0, 1), as cp2tform returns it)."""
    x, y = template[:, :1].astype(np.float64), template[:, 1:].astype(np.float64)
    one, zero = np.ones_like(x), np.zeros_like(x)
    a = np.vstack((np.hstack((x, y, one, zero)), np.hstack((y, -x, zero, one))))
    b = np.vstack((points[:, :1], points[:, 1:])).astype(np.float64)
    if np.linalg.matrix_rank(a) < 4:
        raise FaceMendError("the five landmarks need at least two distinct points")
    sc, ss, tx, ty = np.linalg.lstsq(a, b, rcond=None)[0][:, 0]
    t = np.linalg.inv(np.array([[sc, -ss, 0], [ss, sc, 0], [tx, ty, 1]]))
    t[:, 2] = (0, 0, 1)
    return t


def ntire_transform(points) -> np.ndarray:
    """2x3 float64 matrix (cv2.warpAffine's image -> crop) for five landmarks [5,2] in the input's pixels.

    As align_trans.warp_and_crop_face (align_type 'similarity') computes it: points and reference as float32, the
    non-reflective fit, and a reflective fit (to the mirrored reference, mirrored back); the smaller residual
    wins. The residuals are both measured against the *mirrored* reference (matlab_cp2tform.findSimilarity
    mirrors it in place before measuring), so on some faces the reflective, mirror-image crop is chosen; the
    gate then compares two mirrored crops, which we reproduce rather than "fix".
    """
    uv = np.float32(points).reshape(5, 2)
    xy = REFERENCE_112.copy()
    t1 = _fit_template_to_points(uv, xy)
    xy_mirrored = xy * np.float32([-1, 1])
    t2 = _fit_template_to_points(uv, xy_mirrored) @ np.diag([-1.0, 1.0, 1.0])
    uv1 = np.hstack((uv, np.ones((5, 1))))
    r1 = np.linalg.norm((uv1 @ t1)[:, :2] - xy_mirrored)
    r2 = np.linalg.norm((uv1 @ t2)[:, :2] - xy_mirrored)
    return (t1 if r1 <= r2 else t2)[:, :2].T


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] float in [0,1] -> HxWx3 uint8 RGB (exact for images read from 8-bit files)."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def ntire_crops(images_uint8, landmarks) -> np.ndarray:
    """The organisers' 112x112 crops: images HxWx3 uint8 RGB (a list, or [N,H,W,3]), landmarks [N,5,2] ->
    [N,112,112,3] uint8 RGB, each warped by cv2.warpAffine with ntire_transform(landmarks[i])."""
    import cv2

    pts = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
    if len(images_uint8) != len(pts):
        raise ValueError(f"{len(images_uint8)} images but {len(pts)} sets of landmarks")
    out = np.empty((len(pts), INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    for i, (img, p) in enumerate(zip(images_uint8, pts)):
        if not np.isfinite(p).all():
            raise FaceMendError(f"landmarks of face {i} are not finite numbers: {p.tolist()}")
        out[i] = cv2.warpAffine(np.ascontiguousarray(img), ntire_transform(p), (INPUT_SIZE, INPUT_SIZE))
    return out


def crops_to_input(crops_uint8: np.ndarray, device="cpu") -> torch.Tensor:
    """inference.to_input on a batch: RGB uint8 [N,112,112,3] -> BGR [N,3,112,112] float32 in [-1,1] (computed in
    float64 then rounded, as numpy does there)."""
    x = torch.from_numpy(np.ascontiguousarray(crops_uint8[..., ::-1])).to(device).double()
    return ((x / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2).float().contiguous()


# ----------------------------------------------------------------------------------------------- model
class AdaFaceIR50:
    """The challenge's ID model. Same interface as ArcFaceONNX (``embed``, ``similarity``) so every node and
    the evaluate CLI take either; ``similarity`` aligns as the organisers do (see the module docstring)."""

    name = "adaface"
    proxy = False

    def __init__(self, net: AdaFaceIRNet, path: str = "", device="cpu"):
        self.net, self.path, self.device = net, path, torch.device(device)

    @classmethod
    def from_file(cls, path: str, device="cpu") -> "AdaFaceIR50":
        return cls(load_adaface(path, device), path, device)

    def to(self, device) -> "AdaFaceIR50":
        self.net.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def embed_input(self, faces_bgr: torch.Tensor) -> torch.Tensor:
        """[N,3,112,112] BGR in [-1,1] (crops_to_input) -> [N,512] unit embeddings."""
        if faces_bgr.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"AdaFace expects [N,3,112,112] faces, got {tuple(faces_bgr.shape)}")
        return self.net(faces_bgr.to(self.device, torch.float32))[0]

    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        """ArcFaceONNX's interface: [N,3,112,112] RGB in [0,1], aligned to the 112 reference -> [N,512]."""
        return self.embed_input(faces.flip(1) * 2 - 1)

    def similarity(self, a: torch.Tensor, b: torch.Tensor, landmarks: torch.Tensor | None = None,
                   landmarks_b: torch.Tensor | None = None) -> torch.Tensor:
        """Dot product of the embeddings of a[i] (the input) and b[i] (the output), [N,3,H,W] RGB in [0,1].

        landmarks [N,5,2]: the five points of each input face in a[i]'s pixels; both are warped with them (b with
        landmarks_b when given, e.g. scaled for an output of another size). None: the faces are the pack's
        FFHQ-aligned square crops, whose landmarks are the FFHQ template at their size. The faces are rounded to
        8 bits first: the organisers read 8-bit PNG files and warp those.
        """
        from ..face.geometry import face_template

        n, _, h, w = a.shape
        if b.shape[0] != n:
            raise ValueError(f"{n} input faces but {b.shape[0]} output faces")
        if landmarks is None:
            if h != w or b.shape[-1] != b.shape[-2]:
                raise ValueError(f"without landmarks the faces must be square aligned crops, got {w}x{h}")
            landmarks = face_template(h).expand(n, 5, 2)
            landmarks_b = face_template(b.shape[-1]).expand(n, 5, 2)
        pts_a = landmarks.detach().double().cpu().reshape(n, 5, 2).numpy()
        pts_b = pts_a if landmarks_b is None else landmarks_b.detach().double().cpu().reshape(n, 5, 2).numpy()
        crops = np.concatenate([ntire_crops([to_uint8_hwc(x) for x in a], pts_a),
                                ntire_crops([to_uint8_hwc(x) for x in b], pts_b)])
        emb = self.embed_input(crops_to_input(crops, self.device))
        return (emb[:n] * emb[n:]).sum(1).to(a.device)

    def __call__(self, a, b, landmarks=None):
        return self.similarity(a, b, landmarks)
