"""FaceMend's node schemas as ComfyUI serves them (/object_info's V1 view), and what a node computes, for the
cross-cutting tests and workflows/generate.py.

Every node is a V3 class: its schema is GET_NODE_INFO_V1(), what ComfyUI's server sends. A combo's choices are
read with options(), which also reads the dictionary API's `[choices, {...}]` of ComfyUI's own nodes. The schema
needs ComfyUI's node API (skips without it, see conftest.facemend_nodes); node_op() runs a node's computation
through ops/, without ComfyUI.
"""
from __future__ import annotations

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def node_infos(nodes=None) -> dict:
    """node id -> its /object_info entry, every FaceMend node (menu order)."""
    if nodes is None:
        from conftest import facemend_nodes

        nodes = facemend_nodes()
    return {nid: cls.GET_NODE_INFO_V1() for nid, cls in nodes.NODE_CLASSES.items()}


def inputs(info: dict) -> dict:
    """{"required": {name: spec}, "optional": {...}} in the node's order."""
    return {section: dict(info["input"].get(section, {})) for section in ("required", "optional")}


def kind(spec) -> str:
    """An input's type, with every combo as "COMBO"."""
    return "COMBO" if isinstance(spec[0], (list, tuple)) else str(spec[0])


def options(spec) -> list | None:
    """A combo's choices (either API's layout); None for other inputs."""
    if isinstance(spec[0], (list, tuple)):
        return list(spec[0])
    if spec[0] == "COMBO":
        return list(spec[1]["options"])
    return None


def opts(spec) -> dict:
    return dict(spec[1]) if len(spec) > 1 else {}


def node_op(node_id: str):
    """What node `node_id` computes (its ops/ function), called with its inputs positionally in the node's order or
    by name; returns its outputs as a tuple. No ComfyUI needed."""
    from facemend.ops import node_ops

    return node_ops()[node_id]


def ops_registry() -> dict:
    from facemend.ops import node_ops

    return node_ops()


def stage_module(stage: str):
    """ops/<stage>.py: a stage's loaders and caches."""
    import importlib

    return importlib.import_module(f"facemend.ops.{stage}")
