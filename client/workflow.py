"""API-format graphs for headless runs: a shipped preset by name or a file, `NODE.INPUT=VALUE` overrides,
and the LoadImage input each job points at its uploaded image."""
from __future__ import annotations

import copy
import json
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
API_DIR = PACK / "workflows" / "api"


class WorkflowError(ValueError):
    pass


def shipped_presets() -> list[str]:
    return sorted(p.stem.removeprefix("facemend_") for p in API_DIR.glob("facemend_*.json"))


def load_workflow(name_or_path: str) -> dict:
    """A preset name (demo, fast, ntire, ntire_full: the shipped workflows/api/facemend_<name>.json) or the path
    of an API-format workflow file (ComfyUI: Workflow > Export (API))."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = API_DIR / f"facemend_{name_or_path.removeprefix('facemend_')}.json"
        if not shipped.is_file():
            raise WorkflowError(f"{name_or_path!r} is neither a file nor a shipped preset "
                                f"({', '.join(shipped_presets())})")
        path = shipped
    try:
        graph = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WorkflowError(f"cannot read the workflow {path}: {exc}") from None
    if not isinstance(graph, dict) or "nodes" in graph or not all(
            isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise WorkflowError(f"{path} is not an API-format workflow (a UI graph with 'nodes' cannot be queued); in "
                            f"ComfyUI use Workflow > Export (API), or pass a preset name")
    return graph


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def find_nodes(graph: dict, key: str) -> list[str]:
    """Node ids matching a node id, a class_type or a _meta title."""
    if key in graph:
        return [key]
    return [nid for nid, n in graph.items()
            if n["class_type"] == key or n.get("_meta", {}).get("title") == key]


def apply_overrides(graph: dict, overrides: list[str]) -> dict:
    """`NODE.INPUT=VALUE` (NODE: id, class_type or title; VALUE: JSON or plain text) -> a patched copy.
    A class_type that several nodes share sets the input on each of them."""
    graph = copy.deepcopy(graph)
    for item in overrides:
        target, eq, value = item.partition("=")
        node_key, dot, name = target.rpartition(".")
        if not eq or not dot or not node_key or not name:
            raise WorkflowError(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. FaceMend_PerImageTune.steps=50")
        ids = find_nodes(graph, node_key)
        if not ids:
            raise WorkflowError(f"--set {item!r}: no node {node_key!r} in the workflow (ids: {', '.join(graph)}; "
                                f"types: {', '.join(sorted({n['class_type'] for n in graph.values()}))})")
        for nid in ids:
            graph[nid]["inputs"][name] = _parse_value(value)
    return graph


def image_input_node(graph: dict, node: str | None = None) -> str:
    """The LoadImage node each job's image goes into: the only one, or the one named by `node`."""
    if node:
        ids = find_nodes(graph, node)
        if len(ids) != 1:
            raise WorkflowError(f"--image-node {node!r} matches {len(ids)} nodes; give a node id")
        return ids[0]
    ids = [nid for nid, n in graph.items() if n["class_type"] == "LoadImage"]
    titled = [nid for nid in ids if graph[nid].get("_meta", {}).get("title", "").lower() == "input"]
    if len(ids) > 1 and len(titled) == 1:  # the shipped graphs title their photo input "input"
        return titled[0]
    if len(ids) != 1:
        raise WorkflowError(f"the workflow has {len(ids)} LoadImage nodes; choose the one that takes each input "
                            f"with --image-node ID")
    return ids[0]


def local_files(graph: dict) -> dict:
    """{(node id, input): path} for inputs set to "@path" (e.g. --set 4.image=@reference.jpg): files the client
    uploads to each server once and puts in place of the value."""
    out = {}
    for nid, node in graph.items():
        for name, value in node["inputs"].items():
            if isinstance(value, str) and value.startswith("@"):
                path = Path(value[1:]).expanduser()
                if not path.is_file():
                    raise WorkflowError(f"node {nid} input {name}: {path} does not exist")
                out[(nid, name)] = path
    return out


def with_image(graph: dict, node_id: str, image_name: str) -> dict:
    graph = copy.deepcopy(graph)
    graph[node_id]["inputs"]["image"] = image_name
    return graph
