"""The few basicsr helpers GFPGANer (gfpgan/utils.py) imports, for the benchmarks only.

basicsr is source-only and imports a torchvision module that no longer exists (see the README), so GFPGANer's
module is loaded with these stand-ins instead. They reproduce basicsr 1.4.2's `img2tensor` and `tensor2img`
(basicsr/utils/img_util.py) for the arguments GFPGANer passes: HWC BGR float64 in [0,1] -> float32 CHW RGB; CHW
tensor -> clamp to min_max, rescale to [0,1], RGB->BGR, *255, round, uint8. `load_file_from_url` refuses: the
benchmark must never download.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch


def img2tensor(imgs, bgr2rgb=True, float32=True):
    def one(img):
        if img.shape[2] == 3 and bgr2rgb:
            if img.dtype == "float64":
                img = img.astype("float32")
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        t = torch.from_numpy(img.transpose(2, 0, 1))
        return t.float() if float32 else t

    return [one(i) for i in imgs] if isinstance(imgs, list) else one(imgs)


def tensor2img(tensor, rgb2bgr=True, out_type=np.uint8, min_max=(0, 1)):
    t = tensor.squeeze(0).float().detach().cpu().clamp_(*min_max)
    t = (t - min_max[0]) / (min_max[1] - min_max[0])
    if t.dim() != 3:
        raise TypeError(f"shim: only CHW tensors are supported, got {tuple(t.shape)}")
    img = t.numpy().transpose(1, 2, 0)
    if img.shape[2] == 1:
        img = np.squeeze(img, axis=2)
    elif rgb2bgr:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if out_type == np.uint8:
        img = (img * 255.0).round()
    return img.astype(out_type)


def load_file_from_url(url, *args, **kwargs):
    raise RuntimeError(f"benchmark shim: refusing to download {url}")
