"""Reading, validating and writing images for the CLI/Python API, and the checks every stage runs on
incoming tensors. Inside the pack an image batch is [B,3,H,W] float in [0,1] (RGB); alpha travels apart.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import InvalidImage

log = logging.getLogger("facemend")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif")
HEIF_EXTENSIONS = (".heic", ".heif")  # what phones write: read through the pillow-heif plugin (the `heif` extra)
# Above this many pixels a single image is refused with a message instead of exhausting memory.
MAX_PIXELS = 16384 * 16384


def _png_bit_depth(path: str) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, or None for other files."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return head[24], head[25]


def _read_png16(path: str) -> np.ndarray | None:
    """16-bit colour PNGs lose 8 bits in Pillow; OpenCV keeps them when it is installed."""
    try:
        import cv2
    except ImportError:
        log.warning("%s is a 16-bit colour PNG; Pillow reads it at 8-bit precision (install opencv to keep 16 bits)",
                    path)
        return None
    arr = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if arr is None:
        return None
    if arr.ndim == 3:  # OpenCV gives BGR(A)
        arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]]
    return arr.astype(np.float32) / 65535.0


def enable_image_plugins(path: str) -> None:
    """Make Pillow able to open `path`: HEIC/HEIF through pillow-heif (registered once), AVIF natively (Pillow >=
    11.3). A missing plugin is an InvalidImage that names the extra to install."""
    ext = os.path.splitext(path)[1].lower()
    if ext in HEIF_EXTENSIONS:
        try:
            import pillow_heif
        except ImportError:
            raise InvalidImage(f"cannot read image {path}: HEIC/HEIF photos need the pillow-heif plugin; install "
                               "the heif extra: pip install 'facemend[heif]' (or pip install pillow-heif)") from None
        if not getattr(enable_image_plugins, "_heif", False):
            pillow_heif.register_heif_opener()  # applies the photo's rotation (irot/imir) as it decodes
            enable_image_plugins._heif = True
    elif ext == ".avif":
        from PIL import features

        if not features.check("avif"):
            raise InvalidImage(f"cannot read image {path}: this Pillow has no AVIF support; pip install -U "
                               "'pillow>=11.3'")


def read_image(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read any common image file as ([1,3,H,W] float32 RGB in [0,1], alpha [1,1,H,W] or None).

    Grayscale is replicated to RGB, palette/CMYK converted, EXIF rotation applied, 16-bit kept as
    16-bit precision (grayscale always; colour with OpenCV). Errors name the file.
    """
    if not os.path.isfile(path):
        raise InvalidImage(f"image file not found: {path}")
    arr = None
    png = _png_bit_depth(path)
    if png is not None and png[0] == 16 and png[1] in (2, 6):
        arr = _read_png16(path)
    if arr is None:
        enable_image_plugins(path)
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                if im.width * im.height > MAX_PIXELS:
                    raise InvalidImage(f"{path}: {im.width}x{im.height} is larger than the {MAX_PIXELS} pixel limit")
                arr = _pil_to_float(im)
        except InvalidImage:
            raise
        except Exception as exc:  # PIL raises many types for broken files
            raise InvalidImage(f"cannot read image {path}: {exc}") from exc
    if arr.ndim == 2:
        arr = arr[..., None]
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]
    return split_alpha(t)


def _pil_to_float(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im).astype(np.float32)
        return a / (65535.0 if a.max() > 255 or im.mode.startswith("I;16") else 255.0)
    if im.mode == "F":
        return np.asarray(im).astype(np.float32)
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
        im = im.convert("RGB")
    if im.mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.mode else "RGB")
    return np.asarray(im).astype(np.float32) / 255.0


def split_alpha(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B,C,H,W] with C in 1..4 -> (RGB [B,3,H,W], alpha [B,1,H,W] or None)."""
    c = t.shape[1]
    if c == 1:
        return t.expand(-1, 3, -1, -1).contiguous(), None
    if c == 2:
        return t[:, :1].expand(-1, 3, -1, -1).contiguous(), t[:, 1:2]
    if c == 3:
        return t, None
    if c == 4:
        return t[:, :3].contiguous(), t[:, 3:4]
    raise InvalidImage(f"an image needs 1 to 4 channels, got {c}")


def check_images(images: torch.Tensor, what: str = "image") -> torch.Tensor:
    """Validate a [B,3,H,W] batch: non-empty, finite. Values outside [0,1] are clamped (other packs'
    upscalers overshoot slightly); NaN/Inf are an error because they would spread through every stage.
    Returns a new tensor (callers may write into it)."""
    return checked_view(images, what, copy=True)


def _flat_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a [B,C,H,W] tensor's memory when it is dense in standard or channels-last order (whole-tensor
    reductions then run over plain memory: torch.aminmax of a channels-last batch is 9x slower, measured on
    6x3x512x512), else the tensor itself."""
    if t.is_contiguous():
        return t.reshape(-1)
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t


def checked_view(images: torch.Tensor, what: str = "image", copy: bool = False) -> torch.Tensor:
    """check_images in one read of the data (min and max propagate NaN and show Inf), returning `images`
    itself when it is already a float batch within [0,1] and copy is False: for callers that only read it."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidImage(f"{what}: expected [B,3,H,W], got shape {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise InvalidImage(f"{what}: empty image batch {tuple(images.shape)}")
    if not images.is_floating_point():
        return (images.float() / 255.0).clamp(0, 1)
    lo, hi = torch.aminmax(_flat_view(images.detach()))
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
        raise InvalidImage(f"{what}: contains NaN or Inf values (batch items {bad}); "
                           "the node that produced it failed numerically")
    if copy or lo < 0 or hi > 1:
        return images.clamp(0, 1)
    return images


def to_uint8_array(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] or [1,3,H,W] float -> HxWx3 uint8 (round half up, as PIL/ComfyUI's SaveImage do)."""
    if image.ndim == 4:
        image = image[0]
    return (image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
            .permute(1, 2, 0).cpu().numpy())


def write_image(path, image: torch.Tensor, alpha: torch.Tensor | None = None, quality: int = 95,
                format: str | None = None) -> None:
    """Write [3,H,W] / [1,3,H,W] as 8-bit PNG/JPEG/WebP (alpha kept where the format has it). `path` may be an
    open binary file, then `format` ('PNG', 'JPEG', ...) names the format (else the path's extension does)."""
    arr = to_uint8_array(image)
    mode = "RGB"
    ext = "." + format.lower() if format else os.path.splitext(str(path))[1].lower()
    if alpha is not None and ext in (".png", ".webp", ".tif", ".tiff"):
        a = alpha.reshape(alpha.shape[-2:]).detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
        arr = np.concatenate([arr, a[..., None]], axis=2)
        mode = "RGBA"
    if isinstance(path, (str, os.PathLike)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extra = {"quality": quality} if ext in (".jpg", ".jpeg", ".webp") else {}
    Image.fromarray(arr, mode).save(path, format=format, **extra)


def list_images(folder: str) -> list[str]:
    """Image files of a folder, sorted by name (the CLI's folder mode)."""
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n)))


def side_by_side(before: torch.Tensor, after: torch.Tensor, gap: int = 8, labels: tuple = ()) -> torch.Tensor:
    """[3,H,W] before | gap | after (after resized to before's height) for the demo's comparison image;
    `labels` (before's, after's) are drawn into the top-left corner of each half."""
    import torch.nn.functional as F

    before = before.reshape(3, *before.shape[-2:])
    after = after.reshape(3, *after.shape[-2:])
    h = before.shape[1]
    if after.shape[1] != h:
        w = max(1, round(after.shape[2] * h / after.shape[1]))
        after = F.interpolate(after[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0]
    sep = torch.ones(3, h, gap, dtype=before.dtype, device=before.device)
    if labels:
        before, after = (label_image(im, text) for im, text in zip((before, after), labels))
    return torch.cat([before, sep, after.clamp(0, 1)], dim=2)


def label_image(image: torch.Tensor, text: str) -> torch.Tensor:
    """[3,H,W] with `text` in white on a dark box at the top left (Pillow's built-in font, sized to the image)."""
    from PIL import ImageDraw, ImageFont

    size = max(10, image.shape[-2] // 24)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font only
        font = ImageFont.load_default()
    im = Image.fromarray(to_uint8_array(image))
    draw = ImageDraw.Draw(im)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    pad = max(2, size // 4)
    draw.rectangle((0, 0, x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), fill=(0, 0, 0))
    draw.text((pad - x0, pad - y0), text, fill=(255, 255, 255), font=font)
    out = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).to(image.device, image.dtype) / 255
    return out

