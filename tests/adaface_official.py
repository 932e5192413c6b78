"""The official AdaFace code (mk-minchul/AdaFace, pinned) for the ID-gate tests, and AdaFace checkpoints with
random weights in the official layout.

Why the AdaFace pin stands for the NTIRE organisers' code: their face_alignment/inference.py (zhengchen1999/
NTIRE2025_RealWorld_Face_Restoration @ b06055c, jkwang28/NTIRE2026_RealWorld_Face_Restoration @ d151d1d, the same
file but for the 2026 landmark CSV name) does `from . import net` and `from face_alignment.mtcnn_pytorch.src.
align_trans import get_reference_facial_points, warp_and_crop_face`: AdaFace's net.py and its face_alignment/
mtcnn_pytorch/src/align_trans.py (+ matlab_cp2tform.py), by the same module paths. Neither organisers' repository
has those files in its stored listing (2025: face_alignment/{align,inference,mtcnn}.py and the landmark CSVs; 2026:
face_alignment/inference.py and test_2026_face.csv only), so they come from AdaFace. The 2025 align.py and
mtcnn.py differ from AdaFace's (align returns the box and points too; align_multi has debug prints) but are off
the gate's path: the landmarks come from the CSV, not from MTCNN.
The organisers' steps on top (inference_face): PIL .convert('RGB') -> np.array -> warp_and_crop_face(img, points,
get_reference_facial_points(default_square=True), crop_size=(112, 112)) -> to_input (BGR, /255, -0.5, /0.5) ->
model(x)[0] for input and output -> (lq_feature @ pred_feature.T).item(); organisers_similarity below does the same.
"""
from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import torch

from official_code import official_dir

NAME = "mk-minchul/AdaFace"


def official_modules():
    """(net, align_trans, matlab_cp2tform) modules of the pinned AdaFace checkout."""
    root = official_dir(NAME)
    # on sys.path only while importing: face_alignment/ holds an mtcnn.py that would shadow the mtcnn package
    paths = [str(root), str(root / "face_alignment")]
    sys.path[:0] = paths
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # align_trans.py compares strings with `is`
            import net
            from mtcnn_pytorch.src import align_trans, matlab_cp2tform
    finally:
        for p in paths:
            sys.path.remove(p)
    return net, align_trans, matlab_cp2tform


def random_official_ir50(seed: int = 0):
    """net.build_model('ir_50') with every parameter and BN statistic random (AdaFace's init leaves BN at
    identity, which would hide a wrong BN order), in eval mode."""
    net = official_modules()[0]
    torch.manual_seed(seed)
    model = net.build_model("ir_50")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("weight") and t.dim() == 1:  # BN scales, PReLU slopes
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            else:  # conv / linear: variance-preserving so the 50 layers neither vanish nor explode
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (1.0 / fan_in) ** 0.5)
    return model.eval()


def save_lightning_checkpoint(model, path) -> None:
    """The layout of adaface_ir50_ms1mv2.ckpt: a PyTorch Lightning checkpoint whose state_dict holds the backbone
    as 'model.*' and the AdaFace head as 'head.kernel', with Lightning's AttributeDict of hyper-parameters
    (pickled under its Lightning module path: saved here from a stand-in module of that name)."""
    mod = types.ModuleType("pytorch_lightning.utilities.parsing")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__ = mod.__name__
    AttributeDict.__qualname__ = "AttributeDict"
    mod.AttributeDict = AttributeDict
    saved = {k: sys.modules.get(k) for k in ("pytorch_lightning", "pytorch_lightning.utilities", mod.__name__)}
    sys.modules.update({"pytorch_lightning": types.ModuleType("pytorch_lightning"),
                        "pytorch_lightning.utilities": types.ModuleType("pytorch_lightning.utilities"),
                        mod.__name__: mod})
    try:
        sd = {"model." + k: v for k, v in model.state_dict().items()}
        sd["head.kernel"] = torch.randn(512, 16)
        torch.save({"epoch": 25, "global_step": 1000, "pytorch-lightning_version": "1.8.6", "state_dict": sd,
                    "hyper_parameters": AttributeDict(arch="ir_50", head="adaface", m=0.4, h=0.333)}, path)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def organisers_crop(image_uint8: np.ndarray, points) -> np.ndarray:
    """inference_face's warp: warp_and_crop_face with the square 112 reference (official code)."""
    align_trans = official_modules()[1]
    ref = align_trans.get_reference_facial_points(default_square=True)
    return align_trans.warp_and_crop_face(image_uint8, [list(map(float, p)) for p in points], ref,
                                          crop_size=(112, 112))


def organisers_similarity(model, lq_uint8: np.ndarray, out_uint8: np.ndarray, points) -> float:
    """inference_face on arrays: both crops with the input's points, to_input, the official net, dot product."""
    def to_input(crop):
        return torch.tensor(((crop[:, :, ::-1] / 255.0) - 0.5) / 0.5).permute(2, 0, 1)[None].float()

    with torch.no_grad():
        a = model(to_input(organisers_crop(lq_uint8, points)))[0]
        b = model(to_input(organisers_crop(out_uint8, points)))[0]
    return (a @ b.T).item()
