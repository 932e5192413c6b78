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


def _kind(spec) -> str:
    kind = spec[0]
    # Combo choices are often file lists read from the models folders: the snapshot records only that it is one.
    return "COMBO" if isinstance(kind, (list, tuple)) else str(kind)


def current_schemas() -> dict:
    import facemend
    out = {}
    for nid, cls in sorted(facemend.NODE_CLASS_MAPPINGS.items()):
        spec = cls.INPUT_TYPES()
        out[nid] = {
            "display_name": facemend.NODE_DISPLAY_NAME_MAPPINGS.get(nid),
            "category": cls.CATEGORY,
            "function": cls.FUNCTION,
            "inputs": {section: [[name, _kind(s)] for name, s in spec.get(section, {}).items()]
                       for section in ("required", "optional")},
            "outputs": list(cls.RETURN_TYPES),
            "output_names": list(getattr(cls, "RETURN_NAMES", ()) or ()),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
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
            for key in recorded[nid]:
                if recorded[nid][key] != now[nid].get(key):
                    diffs.append(f"{nid}.{key}: {recorded[nid][key]} -> {now[nid].get(key)}")
    assert not diffs, ("node schemas differ from tests/node_schemas.json:\n  " + "\n  ".join(diffs)
                       + "\nIf the change is deliberate and compatible, run `python tests/test_node_schemas.py --update`.")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import conftest  # noqa: F401  (loads this checkout as `facemend`)
    if "--update" not in sys.argv:
        sys.exit("usage: python tests/test_node_schemas.py --update   (rewrites tests/node_schemas.json)")
    SNAPSHOT.write_text(json.dumps(current_schemas(), indent=1) + "\n")
    print(f"wrote {SNAPSHOT}")
