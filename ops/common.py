"""Shared by the ops modules: IMAGE/MASK layout conversion and device placement (ComfyUI-free)."""
from __future__ import annotations

import os

import torch

from ..host import device as dev
from ..pipelines.io.images import check_images, split_alpha

CATEGORY = "FaceMend"


def image_to_bchw(image: torch.Tensor, device: torch.device | None = None, what: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] (C 1..4; alpha dropped) -> validated [B,3,H,W] float on `device`."""
    if image.ndim == 3:  # a single image without batch dimension, as some nodes emit
        image = image[None]
    x = image.to(device or dev.compute_device()).permute(0, 3, 1, 2)
    x, _ = split_alpha(x)
    return check_images(x.float(), what)


def no_faces(image: torch.Tensor) -> bool:
    """True for the empty IMAGE batch Detect + Align emits when it finds no face: the face nodes then pass it
    on at once, without loading data onto the device or running a network."""
    return image.shape[0] == 0


def empty_faces(image: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """The empty batch a face node returns for an empty input (its crop size times `scale`)."""
    h, w = image.shape[1:3] if image.ndim == 4 else (1, 1)
    return torch.zeros(0, h * scale, w * scale, 3, dtype=torch.float32, device=dev.intermediate_device())


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> ComfyUI IMAGE [B,H,W,3] float32 on the intermediate device."""
    return x.detach().clamp(0, 1).permute(0, 2, 3, 1).float().contiguous().to(dev.intermediate_device())


def mask_out(m: torch.Tensor) -> torch.Tensor:
    """[B,1,H,W] -> ComfyUI MASK [B,H,W] on the intermediate device."""
    return m.detach()[:, 0].float().contiguous().to(dev.intermediate_device())


def mask_in(mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """ComfyUI MASK [B,H,W] or [H,W] -> [B,H,W] float on `device`."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask[None]
    return mask.to(device).float()


def model_file_problem(folder: str, name: str, choices) -> str | None:
    """What a loader's validate_inputs reports for its model name before a run: None when `name` is one of the files
    found (`choices`, the loader's list: naming the input in validate_inputs skips ComfyUI's own list check, so this
    is that check too), else the message naming the file, the folders searched and where to get it."""
    from ..host.model_paths import check_model_name, find_optional_file, missing_file_message
    from ..pipelines.io.errors import ModelFileNotFound

    try:
        check_model_name(folder, name)  # a name outside the model folders ('../x.pth') is refused, not searched
    except ModelFileNotFound as exc:
        return str(exc)
    if name in choices and find_optional_file(folder, name):
        return None
    return missing_file_message(folder, name)


def content_stamp(path) -> tuple:
    """What identifies a model file's or a folder's content cheaply, for loader caches and ComfyUI's fingerprints:
    the file's path, size and mtime; for a folder (diffusers models, photo albums) every file's relative name, size
    and mtime, so a file replaced, added or removed inside it counts as a change. ("missing", path) when absent."""
    if not path:
        return ("missing",)
    if os.path.isfile(path):
        st = os.stat(path)
        return (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if not os.path.isdir(path):
        return ("missing", path)
    listing = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:  # a dangling link
                continue
            listing.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return (os.path.abspath(path), tuple(listing))
