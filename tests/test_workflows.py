"""Shipped workflows: UI and API files are generated from one description and stay in sync with the
node schemas (widget names, combo values, links)."""
import importlib.util
import json

import pytest

from conftest import ROOT
from node_specs import kind as kind_of
from node_specs import node_infos, options

spec = importlib.util.spec_from_file_location("wf_generate", ROOT / "workflows" / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)


@pytest.fixture(scope="module")
def infos():
    return node_infos()  # skips without ComfyUI (V3 nodes import its node API)


def test_committed_workflows_equal_generated(infos):
    built = generate.build_all()
    on_disk = {str(p.relative_to(ROOT)) for folder in ("workflows", "workflows/api", "example_workflows")
               for p in (ROOT / folder).glob("*.json")}
    assert on_disk == set(built), "run `python workflows/generate.py` and commit the result"
    for name, obj in built.items():
        assert (ROOT / name).read_text() == generate.dumps(obj), f"{name} is stale"


def _api_files():
    return sorted([f"workflows/api/{n}.json" for n in generate.WORKFLOWS]
                  + [f"workflows/{n}_api.json" for n in generate.LEGACY])


def _ui_files():
    return sorted([f"example_workflows/{n}.json" for n in generate.WORKFLOWS]
                  + [f"workflows/{n}.json" for n in generate.LEGACY])


@pytest.mark.parametrize("name", _api_files())
def test_api_workflow_matches_node_schemas(infos, name):
    graph = json.loads((ROOT / name).read_text())
    for nid, node in graph.items():
        info = infos.get(node["class_type"])
        if info is None:
            assert node["class_type"] in generate.CORE_WIDGETS
            continue
        schema = info["input"]
        allowed = {**schema["required"], **schema.get("optional", {})}
        for key, value in node["inputs"].items():
            assert key in allowed, f"{nid}: unknown input {key}"
            kind, choices = kind_of(allowed[key]), options(allowed[key])
            if isinstance(value, list):  # a link: the source output type must match
                src = graph[value[0]]
                src_info = infos.get(src["class_type"])
                src_type = (src_info["output"] if src_info else [t for _, t in generate.CORE_OUTPUTS[src["class_type"]]])[value[1]]
                assert src_type == kind, f"{nid}.{key}: {src_type} wired into {kind}"
            elif choices is not None:
                assert value in choices or key == "model", f"{nid}.{key}={value!r} not in {choices}"
        for key in schema["required"]:
            assert key in node["inputs"], f"{nid}: required input {key} missing"


@pytest.mark.parametrize("name", _ui_files())
def test_ui_widget_values_line_up_with_the_frontend(infos, name):
    """widgets_values must have exactly the slots ComfyUI's frontend expects (it refuses or shifts the values
    otherwise): one per widget input, plus the 'control after generate' value after seed inputs."""
    ui = json.loads((ROOT / name).read_text())
    for node in ui["nodes"]:
        if node["type"] == "Note":
            assert len(node["widgets_values"]) == 1 and isinstance(node["widgets_values"][0], str)
            continue
        info = infos.get(node["type"])
        if info is None:
            assert len(node["widgets_values"]) == len(generate.CORE_WIDGETS[node["type"]])
            continue
        spec = info["input"]
        values = list(node["widgets_values"])
        for section in ("required", "optional"):
            for key, opts in spec.get(section, {}).items():
                kind, choices = kind_of(opts), options(opts)
                if kind not in ("COMBO", "INT", "FLOAT", "STRING", "BOOLEAN"):
                    continue
                value = values.pop(0)
                if choices is not None:
                    assert value in choices or key == "model", f"{node['type']}.{key}={value!r}"
                elif kind == "BOOLEAN":
                    assert isinstance(value, bool), f"{node['type']}.{key}={value!r}"
                elif kind in ("INT", "FLOAT"):
                    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{node['type']}.{key}"
                    if key in ("seed", "noise_seed") or (len(opts) > 1 and opts[1].get("control_after_generate")):
                        assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert values == [], f"{node['type']}: {len(values)} extra widget values"


def _boxes(ui):
    return {n["id"]: (n["pos"][0], n["pos"][1], n["size"][0], n["size"][1]) for n in ui["nodes"]}


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


@pytest.mark.parametrize("name", sorted(generate.WORKFLOWS))
def test_template_layout_is_readable(name):
    """No two nodes overlap (the frontend draws each node's title bar 30 px above pos), every loader sits above
    the chain node it feeds, each group holds whole nodes and groups do not overlap."""
    ui = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
    boxes = {k: (x, y - 30, w, h + 30) for k, (x, y, w, h) in _boxes(ui).items()}
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            assert not _overlap(boxes[a], boxes[b]), f"{name}: nodes {a} and {b} overlap"
    graph = generate.WORKFLOWS[name]["nodes"]
    pos = _boxes(ui)
    for nid, (ctype, _, links) in graph.items():
        for src, _slot in links.values():
            if generate._is_loader(src, generate.WORKFLOWS[name]):
                assert pos[src][1] + pos[src][3] < pos[nid][1], f"{name}: loader {src} is not above node {nid}"
    groups = [g["bounding"] for g in ui["groups"]]
    assert len(groups) >= 4
    for i, g in enumerate(groups):
        for h in groups[i + 1:]:
            assert not _overlap(g, h), f"{name}: groups {g} and {h} overlap"
    for k, box in boxes.items():
        if any(n["id"] == k and n["type"] == "Note" for n in ui["nodes"]):
            continue
        inside = [g for g in groups if g[0] <= box[0] and box[0] + box[2] <= g[0] + g[2]
                  and g[1] <= box[1] and box[1] + box[3] <= g[1] + g[3]]
        assert len(inside) == 1, f"{name}: node {k} is in {len(inside)} groups"


@pytest.mark.parametrize("name", sorted(generate.WORKFLOWS))
def test_template_nodes_carry_the_registry_id_and_a_model_note(name):
    """ComfyUI-Manager offers to install a missing pack from the cnr_id ComfyUI saves in each node's properties;
    the Note names every model file the graph's loaders need."""
    import re

    text = (ROOT / "pyproject.toml").read_text()
    project = {k: re.search(rf'^{k} = "([^"]+)"', text, re.M).group(1) for k in ("name", "version")}
    ui = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    for node in ui["nodes"]:
        if node["type"].startswith("FaceMend_"):
            assert node["properties"]["cnr_id"] == project["name"]
            assert node["properties"]["ver"] == project["version"]
        elif node["type"] != "Note":
            assert node["properties"]["cnr_id"] == "comfy-core"
    text = notes[0]["widgets_values"][0]
    for node in ui["nodes"]:
        if node["type"] == "FaceMend_RestorerLoader":
            assert f"models/facerestore_models/{node['widgets_values'][0]}" in text
        if node["type"] == "FaceMend_OneStepSRLoader":
            assert "models/onestep_sr/tsdsr/" in text and "models/diffusers/" in text
    if name == "facemend_demo":
        assert "none" in text.lower()


def test_api_graphs_live_outside_the_templates_folder():
    """The templates browser lists example_workflows/: only UI graphs there; each UI graph has its API twin."""
    for path in (ROOT / "example_workflows").glob("*.json"):
        ui = json.loads(path.read_text())
        assert "nodes" in ui and "links" in ui, f"{path.name} is not a UI graph"
        api = json.loads((ROOT / "workflows" / "api" / path.name).read_text())
        assert {str(n["id"]) for n in ui["nodes"] if n["type"] != "Note"} == set(api)
