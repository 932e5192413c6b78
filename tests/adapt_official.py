"""The official reference code for the adaptation tests, imported test-only from git snapshots.

- zsyOAOA/DifFace (S-Lab licence): `models/unet.py` (+ basic_ops, fp16_util), the prior's network.
- SamsungLabs/unsupervised-face-restoration (CC BY-NC-SA): `models/gaussian_diffusion.py`, `models/respace.py`
  (the sampling loop with the low-frequency constraint) and `resizer.py` (the ILVR filter).

The files are read from the snapshots' git directories (FACEMEND_DIFFACE_GIT / FACEMEND_UFR_GIT, by default the
session mirrors /work/.mirror/<owner>+<name>/repo) into a temporary package with a private name, imported, and
the package path removed again. Nothing of them is copied into the project. Without a snapshot the tests skip.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

DIFFACE_GIT = os.environ.get("FACEMEND_DIFFACE_GIT", "/work/.mirror/zsyOAOA+DifFace/repo")
UFR_GIT = os.environ.get("FACEMEND_UFR_GIT", "/work/.mirror/SamsungLabs+unsupervised-face-restoration/repo")
_cache: dict = {}


def _show(git_dir: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"HEAD:{path}"], check=True, capture_output=True,
                          text=True).stdout


def _import(pkg: str, git_dir: str, files: list[str], modules: list[str]):
    if pkg in _cache:
        return _cache[pkg]
    if not os.path.isdir(git_dir):
        pytest.skip(f"needs a snapshot of the official code at {git_dir} (fetch it, or set the env variable)")
    root = Path(tempfile.mkdtemp(prefix=f"{pkg}_"))
    (root / pkg).mkdir()
    (root / pkg / "__init__.py").write_text("")
    for f in files:
        dst = root / pkg / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        init = dst.parent / "__init__.py"
        if not init.exists():
            init.write_text("")
        dst.write_text(_show(git_dir, f))
    sys.path.insert(0, str(root))
    try:
        mods = [importlib.import_module(f"{pkg}.{m}") for m in modules]
    finally:
        sys.path.remove(str(root))
    _cache[pkg] = mods
    return mods


def difface_unet():
    """The official UNetModel class of DifFace."""
    (unet,) = _import("_difface_ref", DIFFACE_GIT,
                      ["models/unet.py", "models/basic_ops.py", "models/fp16_util.py"], ["models.unet"])
    return unet.UNetModel


def ufr_diffusion():
    """(create_gaussian_diffusion-like SpacedDiffusion factory, Resizer) of the pseudo-target code."""
    respace, gd, resizer = _import(
        "_ufr_ref", UFR_GIT,
        ["models/respace.py", "models/gaussian_diffusion.py", "models/basic_ops.py", "models/losses.py",
         "resizer.py"],
        ["models.respace", "models.gaussian_diffusion", "resizer"])

    def create(respacing: str = "250"):
        # models/script_util.create_gaussian_diffusion with the configs/targets/*.yaml parameters.
        betas = gd.get_named_beta_schedule("linear", 1000)
        return respace.SpacedDiffusion(
            use_timesteps=respace.space_timesteps(1000, respacing), betas=betas,
            model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
            loss_type=gd.LossType.RESCALED_MSE, rescale_timesteps=False)

    return create, resizer.Resizer
