"""Shipped workflows: UI and API files are generated from one description and stay in sync with the
node schemas (widget names, combo values, links)."""
import importlib.util
import json

import pytest

import facemend
from conftest import ROOT

spec = importlib.util.spec_from_file_location("wf_generate", ROOT / "workflows" / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)


def test_committed_workflows_equal_generated():
    built = generate.build_all()
    on_disk = {p.name for p in (ROOT / "workflows").glob("*.json")}
    assert on_disk == set(built), "run `python workflows/generate.py` and commit the result"
    for name, obj in built.items():
        assert (ROOT / "workflows" / name).read_text() == generate.dumps(obj), f"{name} is stale"


@pytest.mark.parametrize("name", sorted(generate.WORKFLOWS))
def test_api_workflow_matches_node_schemas(name):
    graph = json.loads((ROOT / "workflows" / f"{name}_api.json").read_text())
    for nid, node in graph.items():
        cls = facemend.NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is None:
            assert node["class_type"] in generate.CORE_WIDGETS
            continue
        schema = cls.INPUT_TYPES()
        allowed = {**schema["required"], **schema.get("optional", {})}
        for key, value in node["inputs"].items():
            assert key in allowed, f"{nid}: unknown input {key}"
            kind = allowed[key][0]
            if isinstance(value, list):  # a link: the source output type must match
                src = graph[value[0]]
                src_cls = facemend.NODE_CLASS_MAPPINGS.get(src["class_type"])
                src_type = (src_cls.RETURN_TYPES if src_cls else [t for _, t in generate.CORE_OUTPUTS[src["class_type"]]])[value[1]]
                assert src_type == kind, f"{nid}.{key}: {src_type} wired into {kind}"
            elif isinstance(kind, list):
                assert value in kind or key == "model", f"{nid}.{key}={value!r} not in {kind}"
        for key in schema["required"]:
            assert key in node["inputs"], f"{nid}: required input {key} missing"
