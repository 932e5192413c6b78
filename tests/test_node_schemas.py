"""The node schemas are public API: saved workflows and headless API graphs refer to node ids, input names and
order, and output types. This test pins every node's full schema against a committed snapshot
(tests/node_schemas.json), so any change to it -- even an added node or optional input -- is deliberate.

After a deliberate, compatible change (new node, new optional input appended), refresh the snapshot with
    python tests/test_node_schemas.py --update
and commit it with the change; test_nodes.py separately refuses removals, renames and new required inputs.

A second snapshot, tests/node_object_info.json, records what a real ComfyUI's /object_info says about every
FaceMend node (display name, category, description, input order, each input's type and options, outputs), i.e.
what the frontend builds its widgets from. It was taken on the V1 nodes, before the V3 migration (issue 24), and
test_object_info_matches_snapshot (needs COMFYUI_DIR) holds the migrated nodes to it. Regenerate it with
    python tests/test_node_schemas.py --update --comfyui $COMFYUI_DIR
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

SNAPSHOT = Path(__file__).with_name("node_schemas.json")
OBJECT_INFO = Path(__file__).with_name("node_object_info.json")
FILE_LIST = "file list"  # how a combo whose choices are read from the models folders is recorded

# Fields a V3 node's /object_info entry has that a V1 node's has not (comfy_api/latest/_io.py, NodeInfoV1 and
# the inputs' as_dict); comparing them would only say "this node is V3 now", nothing a user sees changes.
IGNORED_NODE_FIELDS = {
    "python_module": "V1 reports the pack's folder (custom_nodes.<folder>), V3 the module its class lives in",
    "deprecated": "V3 always emits the flag (false); V1 omits it",
    "experimental": "V3 always emits the flag (false); V1 omits it",
    "api_node": "V3 always emits the flag (false); V1 omits it",
    "name": "the node id, already the key of the snapshot",
}
# V3 gives every output node the hidden inputs prompt and extra_pnginfo (comfy_api/latest/_io.py, Schema.finalize):
# the executor fills them in, no widget or socket shows, and saved graphs never hold them.
IGNORED_INPUT_SECTIONS = {"hidden"}
IGNORED_INPUT_FIELDS = {
    "optional": "V3 repeats the input's required/optional section in its options; the section is compared",
    "multiselect": "V3 combos emit multiselect: false, a V1 combo is a single choice without saying so",
}


def current_schemas() -> dict:
    # As ComfyUI serves them (V3 and, during the migration, V1 classes); a combo is recorded only as "COMBO": its
    # choices are often file lists read from the models folders. V3 has no FUNCTION: saved graphs never name it.
    from node_specs import inputs, kind, node_infos

    out = {}
    for nid, info in sorted(node_infos().items()):
        out[nid] = {
            "display_name": info["display_name"],
            "category": info["category"],
            "inputs": {section: [[name, kind(s)] for name, s in specs.items()]
                       for section, specs in inputs(info).items()},
            "outputs": list(info["output"]),
            "output_names": list(info["output_name"]),
            "output_node": bool(info["output_node"]),
        }
    return out


def test_node_schemas_match_snapshot():
    recorded = json.loads(SNAPSHOT.read_text())
    now = current_schemas()
    diffs = []
    for nid in sorted(set(recorded) | set(now)):
        if nid not in now:
            diffs.append(f"{nid}: removed (saved workflows that use it stop loading)")
        elif nid not in recorded:
            diffs.append(f"{nid}: new node, not in the snapshot")
        else:
            for key in now[nid]:
                if recorded[nid].get(key) != now[nid][key]:
                    diffs.append(f"{nid}.{key}: {recorded[nid].get(key)} -> {now[nid][key]}")
    assert not diffs, ("node schemas differ from tests/node_schemas.json:\n  " + "\n  ".join(diffs)
                       + "\nIf the change is deliberate and compatible, run `python tests/test_node_schemas.py --update`.")


# ------------------------------------------------------------------------------ /object_info of a real host

def _input_record(spec) -> dict:
    """One input of /object_info as {"type", options...}; combo choices under "choices" (either spelling)."""
    kind, opts = spec[0], dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
    for field in IGNORED_INPUT_FIELDS:
        opts.pop(field, None)
    if isinstance(kind, list) or kind == "COMBO":  # V1: [[choices], opts]; V3: ["COMBO", {"options": [...]}]
        choices = kind if isinstance(kind, list) else opts.pop("options", [])
        return {"type": "COMBO", "choices": choices, **opts}
    return {"type": kind, **opts}


def object_info_record(info: dict, file_lists: set[tuple[str, str]]) -> dict:
    """The FaceMend part of /object_info, in the snapshot's form; file_lists: (node, input) combos to record as
    "file list" (their choices are whatever the user's models folders hold)."""
    out = {}
    for nid in sorted(k for k in info if k.startswith("FaceMend_")):
        node = info[nid]
        inputs = {}
        for section, specs in node.get("input", {}).items():
            if section in IGNORED_INPUT_SECTIONS:
                continue
            inputs[section] = {}
            for name, spec in specs.items():
                rec = _input_record(spec)
                if (nid, name) in file_lists:
                    rec["choices"] = FILE_LIST
                inputs[section][name] = rec
        out[nid] = {
            "display_name": node.get("display_name"),
            "category": node.get("category"),
            "description": node.get("description"),
            "input_order": {k: v for k, v in (node.get("input_order") or {}).items()
                            if k not in IGNORED_INPUT_SECTIONS},
            "input": inputs,
            "output": node.get("output"),
            "output_name": node.get("output_name"),
            "output_is_list": node.get("output_is_list"),
            # V3 lists a None per output without a tooltip; V1 leaves the field out: the frontend shows none either way
            "output_tooltips": node.get("output_tooltips") if any(node.get("output_tooltips") or ()) else None,
            "output_node": node.get("output_node"),
            **{k: v for k, v in node.items() if k not in _RECORDED and k not in IGNORED_NODE_FIELDS},
        }
    return out


_RECORDED = {"display_name", "category", "description", "input_order", "input", "output", "output_name",
             "output_is_list", "output_tooltips", "output_node"}


def _combos(info: dict) -> dict:
    return {(nid, name): _input_record(spec).get("choices")
            for nid, node in info.items() if nid.startswith("FaceMend_")
            for specs in node.get("input", {}).values() for name, spec in specs.items()
            if isinstance(spec[0], list) or spec[0] == "COMBO"}


PROBE = "zz_facemend_probe"


def _probe_models(models: Path, folders) -> None:
    """A file of each model extension and a model folder in every models folder ComfyUI knows: a combo that
    shows one of them lists the models folders."""
    for folder in folders:
        d = models / folder
        d.mkdir(parents=True, exist_ok=True)
        for ext in (".pth", ".pt", ".ckpt", ".safetensors", ".bin", ".onnx", ".pkl"):
            (d / (PROBE + ext)).write_bytes(b"")
        sub = d / PROBE
        sub.mkdir(exist_ok=True)
        for name in ("model_index.json", "config.json", "model.safetensors", "model.onnx"):
            (sub / name).write_bytes(b"{}" if name.endswith(".json") else b"")
        (d / "models" / PROBE / PROBE).mkdir(parents=True, exist_ok=True)  # insightface-style models/<pack>/
        (d / "models" / PROBE / PROBE / "model.onnx").write_bytes(b"")


def fetch_object_info(comfyui_dir: str, ports: tuple[int, int]) -> dict:
    """Start ComfyUI (--cpu, the pack in custom_nodes/, empty models folders), GET /object_info, then again with
    probe files in every models folder to tell file-list combos from fixed ones; the snapshot's record."""
    import comfy_servers
    comfy_servers.COMFYUI_DIR = comfyui_dir
    with tempfile.TemporaryDirectory(prefix="facemend-object-info-") as tmp:
        server = comfy_servers.ComfyServer(Path(tmp), comfy_servers.free_port(*ports))
        try:
            server.wait_ready()
            before = comfy_servers.get_json(server.url + "/object_info", timeout=120)
            folders = comfy_servers.get_json(server.url + "/models")
            _probe_models(Path(tmp) / "models", folders)
            after = comfy_servers.get_json(server.url + "/object_info", timeout=120)
        finally:
            server.stop()
    old, new = _combos(before), _combos(after)
    file_lists = {key for key in old if old[key] != new.get(key)}
    assert any(nid.startswith("FaceMend_") for nid in before), "no FaceMend node in /object_info"
    return object_info_record(before, file_lists)


def _ports() -> tuple[int, int]:
    span = os.environ.get("FACEMEND_TEST_PORTS")
    if span:
        lo, hi = span.split("-")
        return int(lo), int(hi) + 1
    return int(os.environ.get("FACEMEND_TEST_PORT_LO", 8400)), int(os.environ.get("FACEMEND_TEST_PORT_HI", 8500))


def object_info_diffs(recorded: dict, now: dict) -> list[str]:
    diffs = []
    for nid in sorted(set(recorded) | set(now)):
        if nid not in now:
            diffs.append(f"{nid}: gone from /object_info (saved workflows that use it stop loading)")
        elif nid not in recorded:
            diffs.append(f"{nid}: new node, not in tests/node_object_info.json")
        else:
            for key in sorted(set(recorded[nid]) | set(now[nid])):
                a, b = recorded[nid].get(key), now[nid].get(key)
                if key == "input":
                    for section in sorted(set(a or {}) | set(b or {})):
                        sa, sb = (a or {}).get(section, {}), (b or {}).get(section, {})
                        for name in sorted(set(sa) | set(sb)):
                            if sa.get(name) != sb.get(name):
                                diffs.append(f"{nid}.input.{section}.{name}: {sa.get(name)} -> {sb.get(name)}")
                elif a != b:
                    diffs.append(f"{nid}.{key}: {a!r} -> {b!r}")
    return diffs


@pytest.mark.comfyui
@pytest.mark.slow
def test_object_info_matches_snapshot():
    """What a real ComfyUI tells the frontend about every FaceMend node equals tests/node_object_info.json,
    field by field (taken on the V1 nodes; the V3 nodes must say the same)."""
    from conftest import comfyui_dir as find_comfyui, comfyui_skip_reason

    comfyui_dir = find_comfyui()
    if comfyui_dir is None:
        pytest.skip(comfyui_skip_reason())
    comfyui_dir = str(comfyui_dir)
    diffs = object_info_diffs(json.loads(OBJECT_INFO.read_text()), fetch_object_info(comfyui_dir, _ports()))
    assert not diffs, ("/object_info differs from tests/node_object_info.json:\n  " + "\n  ".join(diffs)
                       + "\nIf the change is deliberate and compatible, run "
                       "`python tests/test_node_schemas.py --update --comfyui $COMFYUI_DIR`.")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import conftest  # noqa: F401  (loads this checkout as `facemend`)
    if "--update" not in sys.argv:
        sys.exit("usage: python tests/test_node_schemas.py --update [--comfyui DIR]\n"
                 "  rewrites tests/node_schemas.json; with --comfyui also tests/node_object_info.json from that "
                 "ComfyUI's /object_info")
    if "--comfyui" in sys.argv:
        comfy_dir = sys.argv[sys.argv.index("--comfyui") + 1]
        OBJECT_INFO.write_text(json.dumps(fetch_object_info(comfy_dir, _ports()), indent=1) + "\n")
        print(f"wrote {OBJECT_INFO}")
    else:
        SNAPSHOT.write_text(json.dumps(current_schemas(), indent=1) + "\n")
        print(f"wrote {SNAPSHOT}")
