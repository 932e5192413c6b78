"""Reading weight files: .safetensors preferred, .pth/.pt/.ckpt/.bin only through torch.load(weights_only=True).

Real user checkpoints often hold CUDA storages (saved on a GPU), so everything is mapped onto the requested
device at load time; a CPU-only machine must be able to read them.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Mapping

import torch

from .errors import ModelFileInvalid, ModelFileNotFound

SAFE_EXTENSIONS = (".safetensors",)
PICKLE_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin")
WEIGHT_EXTENSIONS = SAFE_EXTENSIONS + PICKLE_EXTENSIONS


def load_weights(path: str, device: torch.device | str = "cpu") -> dict:
    """Load a weight file into a dict of tensors (nesting such as {'params_ema': {...}} is kept)."""
    if not os.path.isfile(path):
        raise ModelFileNotFound(f"Model file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    device = torch.device(device)
    size = os.path.getsize(path)
    if size == 0 and ext in WEIGHT_EXTENSIONS:
        raise ModelFileInvalid(f"Model file {path} is empty (0 bytes): an interrupted download or copy? "
                               "Download it again.")
    try:
        if ext in SAFE_EXTENSIONS:
            from safetensors.torch import load_file

            return load_file(path, device=str(device))
        if ext in PICKLE_EXTENSIONS:
            return torch.load(path, map_location=device, weights_only=True)
    except _unreadable_errors() as exc:  # the loaders' errors on junk bytes
        first_line = (str(exc).strip().splitlines() or ["(no message)"])[0][:300]
        raise ModelFileInvalid(
            f"Cannot read model file {path} ({size} bytes): {type(exc).__name__}: {first_line}. "
            "The file is corrupt, truncated (interrupted download?) or not a plain weight file "
            "(pickles with custom classes are refused for safety: convert them to .safetensors)."
        ) from exc
    raise ModelFileInvalid(
        f"Unsupported model file type '{ext}' for {path}; expected one of {', '.join(WEIGHT_EXTENSIONS)}."
    )


def _unreadable_errors() -> tuple:
    """What torch.load and safetensors raise for a corrupt, truncated or foreign file."""
    errors = (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError, IndexError,
              KeyError, TypeError, AttributeError, UnicodeDecodeError)
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors: the Rust error type lives in the private module only
        from safetensors._safetensors_rust import SafetensorError
    return errors + (SafetensorError,)


def unwrap_state_dict(obj: Mapping, preferred_keys=("params_ema", "params", "state_dict", "model")) -> dict:
    """Return the tensor dict inside common checkpoint wrappers, with DataParallel 'module.' prefixes removed."""
    sd = obj
    for key in preferred_keys:
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping):
        raise ModelFileInvalid(f"Checkpoint holds a {type(sd).__name__}, not a state dict.")
    out = {}
    for k, v in sd.items():
        if isinstance(k, str) and k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def check_keys(state_dict: Mapping, model: torch.nn.Module, path: str, expected: str) -> None:
    """Raise ModelFileInvalid naming what was found when the keys/shapes do not match the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        sample = list(state_dict)[:4]
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} keys with other shapes (e.g. {wrong[0]}: file "
                         f"{tuple(state_dict[wrong[0]].shape)} vs model {tuple(own[wrong[0]].shape)})")
        raise ModelFileInvalid(
            f"{os.path.basename(path)} is not a {expected} checkpoint: {'; '.join(parts)}. "
            f"The file's first keys are {sample}."
        )
