"""Node contract (schema, tooltips, permanent ids and input names). What the face nodes do on real photos and bad
inputs: test_face_nodes.py."""
import json
from pathlib import Path

import pytest
import torch

import facemend

API_FILE = Path(__file__).with_name("node_api.json")
COMFY_TYPES = {"IMAGE", "MASK", "INT", "FLOAT", "STRING", "BOOLEAN"}


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    return {section: spec.get(section, {}) for section in ("required", "optional")}


def current_api():
    return {nid: {s: list(v) for s, v in _inputs(cls).items()} for nid, cls in facemend.NODE_CLASS_MAPPINGS.items()}


@pytest.mark.parametrize("node_id", sorted(facemend.NODE_CLASS_MAPPINGS))
def test_node_schema_is_complete(node_id):
    cls = facemend.NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("FaceMend_") and node_id in facemend.NODE_DISPLAY_NAME_MAPPINGS
    for attr in ("RETURN_TYPES", "FUNCTION", "CATEGORY", "DESCRIPTION"):
        assert getattr(cls, attr), f"{node_id} lacks {attr}"
    assert callable(getattr(cls(), cls.FUNCTION))
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    for section, inputs in _inputs(cls).items():
        for name, spec in inputs.items():
            assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (node_id, name)
            options = spec[1] if len(spec) == 2 else {}
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            kind = spec[0]
            assert isinstance(kind, list) or kind in COMFY_TYPES or kind.isupper(), (node_id, name, kind)
            if isinstance(kind, list) and "default" in options:
                assert options["default"] in kind


def test_node_ids_and_input_names_are_permanent():
    """Saved workflows refer to node ids and input names: existing ones never disappear or move;
    new inputs are optional and appended. Update node_api.json only by adding."""
    recorded = json.loads(API_FILE.read_text())
    now = current_api()
    for nid, sections in recorded.items():
        assert nid in now, f"node {nid} was removed or renamed"
        for section, names in sections.items():
            assert now[nid][section][: len(names)] == names, f"{nid} {section} inputs changed"
    for nid in now:
        if nid in recorded:
            assert len(now[nid]["required"]) == len(recorded[nid]["required"]), f"{nid}: new inputs must be optional"


def test_importing_does_no_model_loading():
    from facemend.pipelines.face import detectors
    assert detectors._cache == {} or all(k for k in detectors._cache)  # nothing forced at import
    assert not torch.cuda.is_initialized()
