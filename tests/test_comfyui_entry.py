"""How ComfyUI picks the pack up: a ComfyUI too old for the V3 node API gets one log line naming the minimum version
(no traceback, no failed import), and a current one registers every node through comfy_entrypoint.

Each test runs a fresh Python process that loads the pack the way ComfyUI does (nodes.load_custom_node: the folder's
__init__.py executed as a package, then NODE_CLASS_MAPPINGS, else comfy_entrypoint), so nothing of a host leaks
into the test process."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import facemend
from conftest import ROOT, comfyui_dir, comfyui_skip_reason

# A ComfyUI older than 0.3.48 as a custom node sees it: comfy.model_management loaded (so the pack knows it is
# hosted), folder_paths, and no versioned node API. Its loader does what every ComfyUI version does with a pack's
# module (nodes.py load_custom_node): exec it, log a traceback on an exception, register NODE_CLASS_MAPPINGS, or warn
# that there is none.
OLD_LOADER = r'''
import importlib.util, logging, os, sys, traceback
logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(message)s", stream=sys.stdout)
import comfy.model_management  # noqa: F401  (ComfyUI imports it before any custom node)
NODE_CLASS_MAPPINGS = {}
path = sys.argv[1]
try:
    spec = importlib.util.spec_from_file_location("custom_nodes_pack", os.path.join(path, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["custom_nodes_pack"] = module
    spec.loader.exec_module(module)
    if getattr(module, "NODE_CLASS_MAPPINGS", None) is not None:
        NODE_CLASS_MAPPINGS.update(module.NODE_CLASS_MAPPINGS)
    else:
        logging.warning(f"Skip {path} module for custom nodes due to the lack of NODE_CLASS_MAPPINGS.")
except Exception as e:
    logging.warning(traceback.format_exc())
    logging.warning(f"Cannot import {path} module for custom nodes: {e}")
print("REGISTERED", len(NODE_CLASS_MAPPINGS))
'''


def _old_comfyui(tmp_path, with_comfy_api: bool):
    tree = tmp_path / "ComfyUI"
    (tree / "comfy").mkdir(parents=True)
    (tree / "comfy" / "__init__.py").write_text("")
    (tree / "comfy" / "model_management.py").write_text("")
    (tree / "folder_paths.py").write_text(textwrap.dedent(f"""
        import os
        models_dir = {str(tree / 'models')!r}
        folder_names_and_paths = {{}}

        def get_folder_paths(name):
            return folder_names_and_paths.get(name, ([],))[0]
        """))
    if with_comfy_api:  # a ComfyUI with the first, unversioned V3 preview but no comfy_api.v0_0_2
        (tree / "comfy_api").mkdir()
        (tree / "comfy_api" / "__init__.py").write_text("")
    (tree / "load.py").write_text(OLD_LOADER)
    return tree


@pytest.mark.parametrize("with_comfy_api", [False, True], ids=["no_comfy_api", "no_v0_0_2"])
def test_too_old_comfyui_gets_one_line_naming_the_minimum_version(tmp_path, with_comfy_api):
    tree = _old_comfyui(tmp_path, with_comfy_api)
    proc = subprocess.run([sys.executable, "load.py", str(ROOT)], cwd=tree, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "Cannot import" not in out and "Skip" not in out, out
    ours = [line for line in out.splitlines() if "FaceMend" in line]
    assert len(ours) == 1, out
    assert ours[0].startswith("ERROR") and f"ComfyUI {facemend.MIN_COMFYUI} or newer" in ours[0], ours[0]
    assert "REGISTERED 0" in out  # no node of ours (none would work), and ComfyUI carries on


# The real ComfyUI's loader, in CPU mode: which way did it register our nodes?
ENTRY_LOADER = r'''
import asyncio, json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
sys.path.insert(0, sys.argv[1])
import comfy.options
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
from comfy_api.latest import io

ok = asyncio.run(nodes.load_custom_node(sys.argv[2]))
module = sys.modules[sys.argv[2].replace(".", "_x_")]
ours = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("FaceMend_")}
print(json.dumps({"ok": ok, "exports_mappings": hasattr(module, "NODE_CLASS_MAPPINGS"),
                  "has_entrypoint": hasattr(module, "comfy_entrypoint"),
                  "v3": sorted(k for k, v in ours.items() if issubclass(v, io.ComfyNode)),
                  "nodes": sorted(ours), "display": {k: nodes.NODE_DISPLAY_NAME_MAPPINGS.get(k) for k in ours},
                  "python_module": sorted({getattr(v, "RELATIVE_PYTHON_MODULE", None) for v in ours.values()})}))
'''


def test_comfyui_registers_every_node_through_comfy_entrypoint(tmp_path):
    """ComfyUI reads comfy_entrypoint only when a pack exports no NODE_CLASS_MAPPINGS: the pack must export none, and the real loader must find every node (V3 classes, our display names) through it."""
    found = comfyui_dir()
    if found is None:
        pytest.skip(comfyui_skip_reason())
    pack = tmp_path / "custom_nodes" / "ComfyUI-FaceMend"
    pack.parent.mkdir()
    pack.symlink_to(ROOT, target_is_directory=True)
    script = tmp_path / "load.py"
    script.write_text(ENTRY_LOADER)
    proc = subprocess.run([sys.executable, str(script), str(found), str(pack)], cwd=found, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    recorded = json.loads((ROOT / "tests" / "node_api.json").read_text())
    assert got["ok"] and got["has_entrypoint"] and set(recorded) <= set(got["nodes"]), got
    assert got["python_module"] == ["custom_nodes.ComfyUI-FaceMend"], got
    assert all(got["display"][k] and got["display"][k] != k for k in got["nodes"]), got["display"]
    assert not got["exports_mappings"], "the pack exports NODE_CLASS_MAPPINGS: ComfyUI ignores comfy_entrypoint"
    assert got["v3"] == got["nodes"], got
