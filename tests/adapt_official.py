"""The official reference code for the adaptation tests, imported test-only from the pinned checkouts.

- zsyOAOA/DifFace (S-Lab licence): `models/unet.py` (+ basic_ops, fp16_util), the prior's network.
- SamsungLabs/unsupervised-face-restoration (CC BY-NC-SA): `models/gaussian_diffusion.py`, `models/respace.py`
  (the sampling loop with the low-frequency constraint), `resizer.py` (the ILVR filter) and `trainer.py`'s loss.

Both are pinned in tests/official_pins.json and fetched by tests/fetch_official.py (official_code.official_dir
finds the checkout or skips the test with the command to run). The few files needed are copied into a temporary
package with a private name (the repositories' own top-level names `models`, `utils` would clash), imported, and
the package path removed again. Nothing of them is copied into the project.
"""
from __future__ import annotations

import importlib
import shutil
import sys
import tempfile
from pathlib import Path

from official_code import official_dir

DIFFACE = "zsyOAOA/DifFace"
UFR = "SamsungLabs/unsupervised-face-restoration"
_cache: dict = {}


def official_file(name: str, path: str) -> Path:
    """One file of a pinned checkout (skips the test with the fetch command when the checkout is missing)."""
    return official_dir(name) / path


def _import(pkg: str, name: str, files: list[str], modules: list[str]):
    if pkg in _cache:
        return _cache[pkg]
    src = official_dir(name)
    root = Path(tempfile.mkdtemp(prefix=f"{pkg}_"))
    (root / pkg).mkdir()
    (root / pkg / "__init__.py").write_text("")
    for f in files:
        dst = root / pkg / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        init = dst.parent / "__init__.py"
        if not init.exists():
            init.write_text("")
        shutil.copyfile(src / f, dst)
    sys.path.insert(0, str(root))
    try:
        mods = [importlib.import_module(f"{pkg}.{m}") for m in modules]
    finally:
        sys.path.remove(str(root))
    _cache[pkg] = mods
    return mods


def difface_unet():
    """The official UNetModel class of DifFace."""
    (unet,) = _import("_difface_ref", DIFFACE,
                      ["models/unet.py", "models/basic_ops.py", "models/fp16_util.py"], ["models.unet"])
    return unet.UNetModel


def ufr_diffusion():
    """(create_gaussian_diffusion-like SpacedDiffusion factory, Resizer) of the pseudo-target code."""
    respace, gd, resizer = _import(
        "_ufr_ref", UFR,
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
