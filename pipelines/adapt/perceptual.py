"""LPIPS (VGG) for fine-tuning, built offline from two local files; nothing is ever downloaded.

- The linear calibration layers ship inside the `lpips` wheel (lpips 0.1.4: lpips/weights/v0.1/vgg.pth, 7 KB,
  BSD-2-Clause): read from the installed package, strictly.
- The VGG-16 backbone is torchvision's ImageNet file `vgg16-397923af.pth` (528 MB; only its `features.*` are
  used): from a path the caller gives (FaceMend looks in models/facemend_priors/) or from torchvision's own cache
  (`torch.hub.get_dir()/checkpoints/`), where an earlier torchvision download left it. Missing: an error that
  names the file and both places.
"""
from __future__ import annotations

import os

import torch

from ..io.checkpoints import load_weights, unwrap_state_dict
from ..io.errors import ModelFileInvalid, ModelFileNotFound

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))   # lpips' split of vgg16.features into five stages


def torch_cache_vgg16() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)


def find_vgg16(candidates: tuple = ()) -> str:
    """The first existing file among `candidates` and torchvision's cache, else ModelFileNotFound naming them."""
    places = [c for c in candidates if c] + [torch_cache_vgg16()]
    for p in places:
        if os.path.isfile(p):
            return p
    raise ModelFileNotFound(
        f"LPIPS needs the VGG-16 ImageNet weights {VGG16_FILE} (torchvision, BSD-3-Clause, 528 MB), not found in: "
        f"{'; '.join(places)}. Download {VGG16_URL} and put it in one of those places (FaceMend never downloads).")


def _lpips_module():
    try:
        import lpips
    except ImportError as exc:
        raise ModelFileNotFound("The LPIPS loss needs the `lpips` package (its calibration weights ship in the "
                                "wheel): pip install 'lpips>=0.1.4'  (or pip install -e '.[adapt]').") from exc
    return lpips


def load_lpips_vgg(backbone_path: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """lpips.LPIPS(net='vgg') with the backbone from `backbone_path` and the wheel's linear layers, both loaded
    strictly. Frozen, eval mode; call it on images in [-1, 1] (normalize=False), it returns [B,1,1,1]."""
    lpips = _lpips_module()
    net = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
    lin_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    lin = load_weights(lin_path)
    own = net.state_dict()
    lin_keys = [k for k in own if k.startswith("lin") and not k.startswith("lins.")]
    if sorted(lin) != sorted(lin_keys) or any(tuple(lin[k].shape) != tuple(own[k].shape) for k in lin_keys):
        raise ModelFileInvalid(f"{lin_path} does not hold LPIPS-VGG v0.1 linear layers (keys {list(lin)[:5]}); "
                               "reinstall lpips 0.1.4.")
    raw = unwrap_state_dict(load_weights(backbone_path))
    feats = {k[len("features."):]: v for k, v in raw.items() if k.startswith("features.")}
    mapped = {}
    for i, (lo, hi) in enumerate(_SLICES):
        for k in own:
            if k.startswith(f"net.slice{i + 1}."):
                idx_param = k[len(f"net.slice{i + 1}."):]
                if idx_param not in feats:
                    raise ModelFileInvalid(f"{os.path.basename(backbone_path)} is not torchvision's VGG-16 "
                                           f"({VGG16_FILE}): no features.{idx_param} (first keys {list(raw)[:4]}).")
                if tuple(feats[idx_param].shape) != tuple(own[k].shape):
                    raise ModelFileInvalid(f"{os.path.basename(backbone_path)}: features.{idx_param} has shape "
                                           f"{tuple(feats[idx_param].shape)}, VGG-16 needs {tuple(own[k].shape)}.")
                mapped[k] = feats[idx_param]
    expected = {k for k in own if k.startswith("net.")}
    if set(mapped) != expected:
        raise ModelFileInvalid(f"{os.path.basename(backbone_path)} is not a VGG-16 backbone.")
    full = dict(own)
    full.update(mapped)
    full.update({k: lin[k] for k in lin_keys})
    full.update({f"lins.{k[3]}{k[4:]}": lin[k] for k in lin_keys})   # `lins` aliases lin0..lin4
    net.load_state_dict(full, strict=True)
    return net.eval().requires_grad_(False).to(device)
