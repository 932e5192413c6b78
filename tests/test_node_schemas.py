"""The node schemas are public API: saved workflows and headless API graphs refer to node ids, input names and
order, and output types. This test pins every node's full schema against a committed snapshot
(tests/node_schemas.json), so any change to it -- even an added node or optional input -- is deliberate.

After a deliberate, compatible change (new node, new optional input appended), refresh the snapshot with
    python tests/test_node_schemas.py --update
and commit it with the change; test_nodes.py separately refuses removals, renames and new required inputs.
"""
import json
import sys
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("node_schemas.json")


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


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import conftest  # noqa: F401  (loads this checkout as `facemend`)
    if "--update" not in sys.argv:
        sys.exit("usage: python tests/test_node_schemas.py --update   (rewrites tests/node_schemas.json)")
    SNAPSHOT.write_text(json.dumps(current_schemas(), indent=1) + "\n")
    print(f"wrote {SNAPSHOT}")
