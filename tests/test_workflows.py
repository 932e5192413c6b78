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


@pytest.mark.parametrize("name", sorted(generate.WORKFLOWS))
def test_ui_widget_values_line_up_with_the_frontend(name):
    """widgets_values must have exactly the slots ComfyUI's frontend expects (it refuses or shifts the values
    otherwise): one per widget input, plus the 'control after generate' value after seed inputs."""
    ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    for node in ui["nodes"]:
        cls = facemend.NODE_CLASS_MAPPINGS.get(node["type"])
        if cls is None:
            assert len(node["widgets_values"]) == len(generate.CORE_WIDGETS[node["type"]])
            continue
        spec = cls.INPUT_TYPES()
        values = list(node["widgets_values"])
        for section in ("required", "optional"):
            for key, opts in spec.get(section, {}).items():
                kind = opts[0]
                if not (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")):
                    continue
                value = values.pop(0)
                if isinstance(kind, list):
                    assert value in kind or key == "model", f"{node['type']}.{key}={value!r}"
                elif kind == "BOOLEAN":
                    assert isinstance(value, bool), f"{node['type']}.{key}={value!r}"
                elif kind in ("INT", "FLOAT"):
                    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{node['type']}.{key}"
                    if key in ("seed", "noise_seed") or (len(opts) > 1 and opts[1].get("control_after_generate")):
                        assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert values == [], f"{node['type']}: {len(values)} extra widget values"
