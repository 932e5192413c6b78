"""The official RestorerID modules (YingJiacheng/RestorerID, pinned in tests/official_pins.json), imported test-only.

The repository is not packaged. Its `ldm` tree is imported from the pinned checkout that tests/fetch_official.py
leaves in the cache (official_code.official_dir finds it, or skips the test with the command to run) as the
top-level package `ldm` it expects; every `ldm*` module is removed from sys.modules again afterwards. Nothing of
it is copied into the pack.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types

from official_code import official_dir

NAME = "YingJiacheng/RestorerID"
MODULES = ("ldm.modules.diffusionmodules.openaimodel", "ldm.modules.attention", "ldm.modules.IDBalance",
           "ldm.modules.spade", "ldm.modules.diffusionmodules.util", "ldm.models.diffusion.ddim")


def _ldm_root(tmp_root: str = "") -> str:
    """The checkout holding ldm/ (tmp_root: kept for callers, unused)."""
    return str(official_dir(NAME))


def load_official(tmp_root: str) -> dict:
    """{short name: module} for the official modules; sys.path / sys.modules are restored afterwards."""
    root = _ldm_root(tmp_root)
    saved = {k: v for k, v in sys.modules.items() if k == "ldm" or k.startswith("ldm.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, root)
    try:
        import importlib

        mods = {name.rsplit(".", 1)[1]: importlib.import_module(name) for name in MODULES}
    finally:
        sys.path.remove(root)
        for k in [k for k in sys.modules if k == "ldm" or k.startswith("ldm.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return mods


@contextlib.contextmanager
def omegaconf_stub():
    """UNetModelRestorerID's constructor imports omegaconf.listconfig.ListConfig only for an isinstance check;
    a stand-in is registered while it runs when omegaconf is not installed."""
    if importlib.util.find_spec("omegaconf") is not None:
        yield
        return
    pkg, sub = types.ModuleType("omegaconf"), types.ModuleType("omegaconf.listconfig")
    sub.ListConfig = type("ListConfig", (list,), {})
    pkg.listconfig = sub
    sys.modules.update({"omegaconf": pkg, "omegaconf.listconfig": sub})
    try:
        yield
    finally:
        del sys.modules["omegaconf"], sys.modules["omegaconf.listconfig"]


def official_nets(mods: dict, unet, encoder, unet_args: dict, struct_args: dict):
    """The official UNetModelRestorerID and EncoderUNetModelWT holding our networks' weights as float32 (strictly
    loaded). Built on the meta device and the tensors assigned, so a full-size UNet is not initialised twice;
    float32 tensors are shared with ours, not copied."""
    import torch

    with torch.device("meta"):
        with omegaconf_stub():
            o_unet = mods["openaimodel"].UNetModelRestorerID(**unet_args)
        o_enc = mods["openaimodel"].EncoderUNetModelWT(**struct_args)
    for official, own in ((o_unet, unet), (o_enc, encoder)):
        official.load_state_dict({k: v.float() for k, v in own.state_dict().items()}, strict=True, assign=True)
    return o_unet.eval(), o_enc.eval()


def official_definitions(tmp_root: str, relpath: str, names, namespace: dict) -> dict:
    """Execute only the named top-level definitions of an official file whose imports pull packages this
    environment lacks (encoders/modules.py imports clip, kornia, open_clip; model.py basicsr)."""
    import ast

    root = _ldm_root(tmp_root)
    source = open(os.path.join(root, relpath)).read()
    tree = ast.parse(source)
    keep = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    missing = set(names) - {n.name for n in keep}
    assert not missing, f"{relpath} lacks {missing}"
    ns = dict(namespace)
    exec(compile(ast.Module(body=keep, type_ignores=[]), relpath, "exec"), ns)
    return ns
