"""RetinaFace face detector in plain PyTorch, loading facexlib's / biubug6's checkpoints unchanged.

Supported weight files (the module names below reproduce their state-dict keys exactly):
  * facexlib `detection_Resnet50_Final.pth`      ResNet-50 backbone, anchors "facexlib"
  * facexlib `detection_mobilenet0.25_Final.pth` MobileNet-0.25 backbone, anchors "facexlib"
  * biubug6 Face-Detector-1MB `mobilenet0.25_Final.pth` (shipped here as `retinaface_mobilenet0.25_1mb.pth`):
    the same MobileNet-0.25 keys, but another training ("1mb"): smaller anchors and plain ReLU activations
    where Pytorch_Retinaface/facexlib use LeakyReLU(0.1). Decoding it with the facexlib config gives
    wrong boxes, so the config is chosen from the file name and the weights (or forced with `anchors=`).

What the network expects and returns (as in facexlib's RetinaFace.detect_faces):
  input  BGR pixel values 0..255 minus the per-channel mean (104, 117, 123); no division.
  output per anchor: box offsets (4), two-class logits (background, face), 5 landmark offsets (10).
  Anchors ("priors") are laid out per pyramid level (strides 8, 16, 32), row-major over the feature map,
  two sizes per cell. Decoding uses variances (0.1, 0.2): centre = prior centre + d * 0.1 * prior size,
  size = prior size * exp(d * 0.2); landmarks = prior centre + d * 0.1 * prior size.
  Candidates with face probability > threshold go through NMS (IoU 0.4, no +1 pixel area convention,
  like torchvision.ops.nms that facexlib 0.3 calls). Landmarks come out as left eye, right eye, nose,
  left mouth corner, right mouth corner as seen in the image.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io.checkpoints import check_keys, load_weights, unwrap_state_dict
from .detection import nms, rescale_detections, resize_for_detection
from ..io.errors import InvalidImage, ModelFileInvalid, ModelFileNotFound

log = logging.getLogger("facemend")

# Anchor configurations: minimum sizes per level (pixels), level strides, decode variances.
# "leaky": the MobileNet / FPN / SSH activations are LeakyReLU(0.1) in Pytorch_Retinaface (facexlib), while
# Face-Detector-1MB's copy of the same network uses plain ReLU everywhere (same keys, other activations).
ANCHOR_CONFIGS: dict[str, dict] = {
    "facexlib": {"min_sizes": ((16, 32), (64, 128), (256, 512)), "steps": (8, 16, 32), "variance": (0.1, 0.2),
                 "leaky": True},
    "1mb": {"min_sizes": ((10, 20), (32, 64), (128, 256)), "steps": (8, 16, 32), "variance": (0.1, 0.2),
            "leaky": False},
}
ANCHOR_CHOICES = ("auto",) + tuple(ANCHOR_CONFIGS)

BGR_MEAN = (104.0, 117.0, 123.0)

# ClassHead.0.conv1x1.bias of biubug6's Face-Detector-1MB mobilenet0.25_Final.pth: identifies that training
# whatever the file is called (the original name is the same as Pytorch_Retinaface's facexlib-config model).
_FINGERPRINT_1MB = (0.6874, -0.7005, 0.5787, -0.5041)

EXPECTED = ("RetinaFace (facexlib detection_Resnet50_Final.pth / detection_mobilenet0.25_Final.pth, "
            "or biubug6 Face-Detector-1MB mobilenet0.25_Final.pth)")


# --------------------------------------------------------------------------------------------------------
# Building blocks. Sequential indices matter: they are part of the checkpoint keys.

def _conv_norm(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, slope: float | None = 0.0):
    """conv (no bias) -> BN -> optional LeakyReLU(slope); keys .0 (conv) / .1 (bn)."""
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if slope is not None:
        layers.append(nn.LeakyReLU(slope, inplace=True))
    return nn.Sequential(*layers)


def _depthwise_separable(cin: int, cout: int, stride: int, slope: float = 0.1) -> nn.Sequential:
    """3x3 depthwise conv, BN, act, 1x1 pointwise conv, BN, act (keys .0,.1 / .3,.4)."""
    dw = _conv_norm(cin, cin, 3, stride, groups=cin, slope=slope)
    pw = _conv_norm(cin, cout, 1, 1, slope=slope)
    return nn.Sequential(*dw, *pw)


class MobileNetBody(nn.Module):
    """MobileNet-0.25 trunk cut after its three stages (strides 8, 16, 32; 64/128/256 channels)."""

    def __init__(self, slope: float = 0.1):
        super().__init__()

        def dws(cin, cout, stride):
            return _depthwise_separable(cin, cout, stride, slope)

        self.stage1 = nn.Sequential(
            _conv_norm(3, 8, 3, 2, slope=slope),
            dws(8, 16, 1), dws(16, 32, 2), dws(32, 32, 1), dws(32, 64, 2), dws(64, 64, 1),
        )
        self.stage2 = nn.Sequential(dws(64, 128, 2), *[dws(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(dws(128, 256, 2), dws(256, 256, 1))

    def forward(self, x):
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class Bottleneck(nn.Module):
    """torchvision ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(y + skip)


class ResNet50Body(nn.Module):
    """ResNet-50 trunk returning layer2/3/4 (strides 8, 16, 32; 512/1024/2048 channels)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for idx, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layer = [Bottleneck(cin, width, stride)] + [Bottleneck(width * 4, width, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{idx}", nn.Sequential(*layer))
            cin = width * 4

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class FPN(nn.Module):
    """Top-down feature pyramid: 1x1 lateral convs, nearest upsampling + add, 3x3 merge convs."""

    def __init__(self, in_channels: tuple[int, int, int], out_channels: int, slope: float = 0.0):
        super().__init__()
        self.output1 = _conv_norm(in_channels[0], out_channels, 1, slope=slope)
        self.output2 = _conv_norm(in_channels[1], out_channels, 1, slope=slope)
        self.output3 = _conv_norm(in_channels[2], out_channels, 1, slope=slope)
        self.merge1 = _conv_norm(out_channels, out_channels, 3, slope=slope)
        self.merge2 = _conv_norm(out_channels, out_channels, 3, slope=slope)

    def forward(self, feats):
        p1, p2, p3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        p2 = self.merge2(p2 + F.interpolate(p3, size=p2.shape[-2:], mode="nearest"))
        p1 = self.merge1(p1 + F.interpolate(p2, size=p1.shape[-2:], mode="nearest"))
        return [p1, p2, p3]


class SSH(nn.Module):
    """Single-stage context module: 3x3 branch (C/2) + stacked 5x5- and 7x7-equivalent branches (C/4 each)."""

    def __init__(self, cin: int, cout: int, slope: float = 0.0):
        super().__init__()
        half, quarter = cout // 2, cout // 4
        self.conv3X3 = _conv_norm(cin, half, 3, slope=None)
        self.conv5X5_1 = _conv_norm(cin, quarter, 3, slope=slope)
        self.conv5X5_2 = _conv_norm(quarter, quarter, 3, slope=None)
        self.conv7X7_2 = _conv_norm(quarter, quarter, 3, slope=slope)
        self.conv7x7_3 = _conv_norm(quarter, quarter, 3, slope=None)  # lower-case x: as in the checkpoints

    def forward(self, x):
        mid = self.conv5X5_1(x)
        b5 = self.conv5X5_2(mid)
        b7 = self.conv7x7_3(self.conv7X7_2(mid))
        return F.relu(torch.cat([self.conv3X3(x), b5, b7], dim=1))


class _Head(nn.Module):
    """1x1 conv predicting `per_anchor` values for each of 2 anchors; output [N, H*W*2, per_anchor]."""

    def __init__(self, cin: int, per_anchor: int, anchors: int = 2):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(cin, anchors * per_anchor, 1)

    def forward(self, x):
        y = self.conv1x1(x).permute(0, 2, 3, 1)
        return y.reshape(y.shape[0], -1, self.per_anchor)


class RetinaFaceNet(nn.Module):
    """The RetinaFace network; forward returns raw (box deltas [N,P,4], logits [N,P,2], landmark deltas [N,P,10]).

    leaky=True: Pytorch_Retinaface/facexlib activations (LeakyReLU 0.1 in the MobileNet trunk, and in FPN/SSH
    when they have <= 64 channels); leaky=False: plain ReLU everywhere (Face-Detector-1MB)."""

    def __init__(self, backbone: str = "mobilenet0.25", leaky: bool = True):
        super().__init__()
        if backbone == "resnet50":
            self.body = ResNet50Body()
            in_ch, out_ch = (512, 1024, 2048), 256
        elif backbone == "mobilenet0.25":
            self.body = MobileNetBody(0.1 if leaky else 0.0)
            in_ch, out_ch = (64, 128, 256), 64
        else:
            raise ValueError(f"unknown RetinaFace backbone {backbone!r}")
        self.backbone = backbone
        self.leaky = leaky
        slope = 0.1 if (leaky and out_ch <= 64) else 0.0
        self.fpn = FPN(in_ch, out_ch, slope)
        self.ssh1, self.ssh2, self.ssh3 = (SSH(out_ch, out_ch, slope) for _ in range(3))
        self.ClassHead = nn.ModuleList([_Head(out_ch, 2) for _ in range(3)])
        self.BboxHead = nn.ModuleList([_Head(out_ch, 4) for _ in range(3)])
        self.LandmarkHead = nn.ModuleList([_Head(out_ch, 10) for _ in range(3)])

    def forward(self, x):
        p = self.fpn(self.body(x))
        feats = [self.ssh1(p[0]), self.ssh2(p[1]), self.ssh3(p[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], dim=1)
        logits = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], dim=1)
        ldm = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], dim=1)
        return loc, logits, ldm


# --------------------------------------------------------------------------------------------------------
# Inference copy: the same function, fewer passes over memory.

def _fold_batchnorms(module: nn.Module) -> None:
    """Fold every eval-mode BatchNorm into the convolution before it, in place: in Sequentials (conv, bn) and in
    the ResNet blocks' convN/bnN pairs (the BN becomes an Identity). One pass over each feature map less."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        _fold_batchnorms(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[a], module._modules[b] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    for name, bn in list(module.named_children()):
        conv = getattr(module, name.replace("bn", "conv"), None) if name.startswith("bn") else None
        if isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d):
            setattr(module, name.replace("bn", "conv"), fuse_conv_bn_eval(conv, bn))
            setattr(module, name, nn.Identity())


def _first_conv(net: RetinaFaceNet) -> nn.Conv2d:
    return net.body.conv1 if net.backbone == "resnet50" else net.body.stage1[0][0]


def inference_copy(net: RetinaFaceNet) -> RetinaFaceNet:
    """A copy of `net` computing the same outputs from RGB [0,1] images minus BGR_MEAN/255 (channel order RGB):
    BatchNorms folded into the convolutions, the RGB->BGR swap and the x255 scale folded into the first
    convolution's weights (its zero padding still means "the mean colour", as in the original's input space),
    LeakyReLU(0) as ReLU, channels-last memory (measured on a 2-core CPU, MobileNet-0.25 on a 24 MP photo: 1.22 s -> 0.63 s)."""
    import copy

    fast = copy.deepcopy(net).eval()
    _fold_batchnorms(fast)
    for m in fast.modules():  # Face-Detector-1MB's LeakyReLU(0): the same values, ReLU's faster kernel
        for name, act in m.named_children():
            if isinstance(act, nn.LeakyReLU) and act.negative_slope == 0.0:
                setattr(m, name, nn.ReLU(inplace=act.inplace))
    first = _first_conv(fast)
    with torch.no_grad():
        first.weight.copy_(first.weight.flip(1) * 255.0)
    return fast.to(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------------
# Checkpoint inspection.

def _backbone_of(state_dict: Mapping) -> str | None:
    keys = list(state_dict)
    if any(k.startswith("body.layer") for k in keys):
        return "resnet50"
    if any(k.startswith("body.stage") for k in keys):
        return "mobilenet0.25"
    return None


def _is_1mb_training(state_dict: Mapping) -> bool:
    bias = state_dict.get("ClassHead.0.conv1x1.bias")
    if not isinstance(bias, torch.Tensor) or bias.numel() != len(_FINGERPRINT_1MB):
        return False
    ref = torch.tensor(_FINGERPRINT_1MB)
    return bool(torch.allclose(bias.detach().float().cpu(), ref, atol=2e-3))


def infer_anchor_config(path: str, state_dict: Mapping) -> str:
    """'1mb' or 'facexlib' for a RetinaFace checkpoint, from the file name and the weights themselves."""
    if _backbone_of(state_dict) == "resnet50":
        return "facexlib"  # the only published ResNet-50 RetinaFace of this layout (Pytorch_Retinaface)
    name = os.path.basename(path).lower()
    if "1mb" in name or "face-detector" in name or _is_1mb_training(state_dict):
        return "1mb"
    return "facexlib"


def _fill_batchnorm_counters(state_dict: dict, model: nn.Module) -> dict:
    """Old checkpoints may lack BN `num_batches_tracked` buffers (unused at inference): add them."""
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in state_dict:
            prefix = k[: -len("num_batches_tracked")]
            if prefix + "running_mean" in state_dict:
                state_dict[k] = v.clone()
    return state_dict


# --------------------------------------------------------------------------------------------------------
# Anchors and decoding.

def prior_boxes(height: int, width: int, anchors: str, device=None) -> torch.Tensor:
    """Anchors [P,4] as (cx, cy, w, h) in *pixels*, in the order the heads emit them."""
    cfg = ANCHOR_CONFIGS[anchors]
    out = []
    for step, sizes in zip(cfg["steps"], cfg["min_sizes"]):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(fh, device=device, dtype=torch.float32) + 0.5) * step
        cx = (torch.arange(fw, device=device, dtype=torch.float32) + 0.5) * step
        gy, gx = torch.meshgrid(cy, cx, indexing="ij")                       # [fh, fw]
        n_sizes = len(sizes)
        wh = torch.tensor(sizes, device=device, dtype=torch.float32)          # [S]
        centres = torch.stack([gx, gy], -1)[:, :, None, :].expand(fh, fw, n_sizes, 2)
        dims = wh[None, None, :, None].expand(fh, fw, n_sizes, 2)
        out.append(torch.cat([centres, dims], -1).reshape(-1, 4))
    return torch.cat(out, 0)


def decode(loc: torch.Tensor, ldm: torch.Tensor, priors: torch.Tensor, variance=(0.1, 0.2)):
    """Box deltas [...,P,4] and landmark deltas [...,P,10] -> boxes x1y1x2y2 and 5 points, in pixels."""
    centre, size = priors[..., :2], priors[..., 2:]
    c = centre + loc[..., :2] * variance[0] * size
    wh = size * torch.exp(loc[..., 2:] * variance[1])
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=-1)
    pts = ldm.unflatten(-1, (5, 2)) * (variance[0] * size).unsqueeze(-2) + centre.unsqueeze(-2)
    return boxes, pts.flatten(-2)


# --------------------------------------------------------------------------------------------------------

class RetinaFaceDetector:
    """Batched RetinaFace detector implementing the FaceDetector contract of pipelines/face/detection.py."""

    def __init__(self, net: RetinaFaceNet, anchors: str = "facexlib", name: str | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if anchors not in ANCHOR_CONFIGS:
            raise ValueError(f"anchors must be one of {tuple(ANCHOR_CONFIGS)}, got {anchors!r}")
        self.net = net.eval()
        self.anchors = anchors
        self.backbone = net.backbone
        self.name = name or f"retinaface_{net.backbone}_{anchors}"
        self.dtype = dtype
        self.device = torch.device(device)
        self._priors: dict[tuple, torch.Tensor] = {}
        self.net.to(device=self.device, dtype=dtype)
        self._fast: RetinaFaceNet | None = None  # inference_copy(net), built on first use

    @classmethod
    def from_file(cls, path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  anchors: str = "auto") -> "RetinaFaceDetector":
        """Load a facexlib / biubug6 RetinaFace checkpoint (`module.` prefixes and wrappers are accepted).

        anchors: the training configuration: "auto" (from the file name and weights), "facexlib"
        (anchors 16..512, LeakyReLU) or "1mb" (anchors 10..256, plain ReLU; biubug6 Face-Detector-1MB).
        Raises ModelFileNotFound / ModelFileInvalid naming the file.
        """
        if anchors not in ANCHOR_CHOICES:
            raise ValueError(f"anchors must be one of {ANCHOR_CHOICES}, got {anchors!r}")
        try:
            raw = load_weights(path, "cpu")
        except (ModelFileNotFound, ModelFileInvalid):
            raise
        except Exception as exc:  # torch.load on arbitrary bytes can raise almost anything (IndexError, ...)
            raise ModelFileInvalid(
                f"Cannot read model file {path}: {type(exc).__name__}: {str(exc)[:200]}. The file is corrupt, "
                f"truncated or not a weight file; expected a {EXPECTED} checkpoint.") from exc
        try:
            sd = unwrap_state_dict(raw)
        except ModelFileInvalid as exc:
            raise ModelFileInvalid(f"{path}: {exc} Expected a {EXPECTED} checkpoint.") from exc
        backbone = _backbone_of(sd)
        # Unknown layouts are compared with the MobileNet variant so the message lists what is missing.
        probe = RetinaFaceNet(backbone or "mobilenet0.25")
        sd = _fill_batchnorm_counters(dict(sd), probe)
        check_keys(sd, probe, path, EXPECTED)
        chosen = infer_anchor_config(path, sd) if anchors == "auto" else anchors
        leaky = ANCHOR_CONFIGS[chosen]["leaky"]
        net = probe if leaky else RetinaFaceNet(probe.backbone, leaky=False)
        net.load_state_dict(sd, strict=True)
        log.debug("RetinaFace %s: backbone %s, config %s", path, net.backbone, chosen)
        base = os.path.splitext(os.path.basename(path))[0]
        return cls(net, anchors=chosen, name=f"retinaface:{base}", device=device, dtype=dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "RetinaFaceDetector":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self.net.to(device=self.device, dtype=self.dtype)
        self._priors.clear()
        self._fast = None
        return self

    def priors(self, height: int, width: int) -> torch.Tensor:
        key = (height, width, self.device)
        p = self._priors.get(key)
        if p is None:
            if len(self._priors) > 16:
                self._priors.clear()
            p = self._priors[key] = prior_boxes(height, width, self.anchors, self.device)
        return p

    @torch.no_grad()
    def raw_outputs(self, images: torch.Tensor):
        """Network outputs for RGB [0,1] images, in float32: (box deltas, face probability, landmark deltas)."""
        if self._fast is None:
            self._fast = inference_copy(self.net)
        # RGB [0,1] minus the mean colour in one pass (the channel swap and x255 live in the first conv); the
        # result keeps the images' layout when it is channels-last (ComfyUI's and read_image's are).
        mean = torch.tensor(BGR_MEAN[::-1], device=self.device, dtype=torch.float32).view(1, 3, 1, 1) / 255.0
        x = torch.sub(images.to(device=self.device, dtype=torch.float32), mean)
        loc, logits, ldm = self._fast(x.to(self.dtype, memory_format=torch.channels_last))
        prob = torch.softmax(logits.float(), dim=-1)[..., 1]
        return loc.float(), prob, ldm.float()

    @torch.no_grad()
    def detect(self, images: torch.Tensor, score_threshold: float = 0.8, nms_threshold: float = 0.4,
               max_side: int | None = None, pre_nms_top_k: int = 5000) -> list[torch.Tensor]:
        """images [B,3,H,W] RGB float in [0,1] -> per image float32 [K,15] on the detector's device:
        x1,y1,x2,y2, score, then (x,y) of left eye, right eye, nose, left and right mouth corners;
        highest score first; pixel coordinates of the given images.

        One forward pass for the whole batch (any float dtype; cast to the model's dtype), decoding and NMS
        in float32 on the device. Candidates are those with face probability > score_threshold (as facexlib);
        at most `pre_nms_top_k` of them (highest scores) enter NMS, which bounds memory at very low thresholds.
        max_side > 0 detects on a copy downscaled so its longer side is at most max_side (faster on big photos;
        tiny faces may be lost) and maps the results back to the given images' coordinates."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InvalidImage(f"RetinaFace expects images [B,3,H,W], got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            return []
        images = images.to(self.device)
        h0, w0 = images.shape[-2:]
        scale_x = scale_y = 1.0
        if max_side is not None and max_side > 0:
            images, _ = resize_for_detection(images.float(), int(max_side))
            scale_x, scale_y = images.shape[-1] / w0, images.shape[-2] / h0
        h, w = images.shape[-2:]
        loc, prob, ldm = self.raw_outputs(images)
        priors = self.priors(h, w)
        if priors.shape[0] != loc.shape[1]:
            raise RuntimeError(f"RetinaFace produced {loc.shape[1]} anchors for {w}x{h}, expected {priors.shape[0]}")
        variance = ANCHOR_CONFIGS[self.anchors]["variance"]
        results = []
        for b in range(images.shape[0]):
            idx = torch.nonzero(prob[b] > score_threshold).squeeze(1)
            if pre_nms_top_k > 0 and idx.numel() > pre_nms_top_k:
                idx = idx[torch.topk(prob[b][idx], pre_nms_top_k).indices]
            boxes, pts = decode(loc[b][idx], ldm[b][idx], priors[idx], variance)
            scores = prob[b][idx]
            order = nms(boxes, scores, nms_threshold, plus_one=False)
            results.append(torch.cat([boxes[order], scores[order, None], pts[order]], dim=1))
        if scale_x != 1.0 or scale_y != 1.0:
            results = rescale_detections(results, scale_x, scale_y)
        return results

    __call__ = detect
