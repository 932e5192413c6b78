"""FaceMend's node schemas as ComfyUI serves them (/object_info's V1 view), and what a node computes, for the
cross-cutting tests and workflows/generate.py.

V3 classes give their schema through GET_NODE_INFO_V1(); classes still on the dictionary API (during the
migration) get the same dictionary built as ComfyUI's server builds it (server.py node_info). Either way a combo's
choices are read with options(): V1 writes `[choices, {...}]`, V3 `["COMBO", {"options": choices}]`.
Needs ComfyUI's node API (skips without it, see conftest.facemend_nodes); node_op() runs a node's computation
through ops/ and needs ComfyUI only for a module not yet moved there.
"""
from __future__ import annotations

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def v1_class_info(node_id: str, cls, display_name: str) -> dict:
    """What ComfyUI's server sends for a dictionary-API class (server.py node_info, the fields the tests read)."""
    spec = cls.INPUT_TYPES()
    info = {"input": spec, "input_order": {k: list(v) for k, v in spec.items()}, "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES), "name": node_id,
            "display_name": display_name, "description": getattr(cls, "DESCRIPTION", ""),
            "category": getattr(cls, "CATEGORY", "sd"), "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
    return info


def class_info(node_id: str, cls, display_name: str) -> dict:
    if hasattr(cls, "GET_NODE_INFO_V1"):  # a V3 io.ComfyNode
        return cls.GET_NODE_INFO_V1()
    return v1_class_info(node_id, cls, display_name)


def node_infos(nodes=None) -> dict:
    """node id -> its /object_info entry, every FaceMend node (menu order)."""
    if nodes is None:
        from conftest import facemend_nodes

        nodes = facemend_nodes()
    return {nid: class_info(nid, cls, nodes.NODE_DISPLAY_NAMES[nid]) for nid, cls in nodes.NODE_CLASSES.items()}


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
    """What node `node_id` computes, called with its inputs (positionally in the node's order, or by name); returns
    its outputs as a tuple. ops/ when the node's stage is there (no ComfyUI needed); during the migration a module
    still on the dictionary API runs through its class (which needs ComfyUI's node API, else the test skips)."""
    ops = ops_registry()
    if node_id in ops:
        return ops[node_id]
    from conftest import facemend_nodes

    cls = facemend_nodes().NODE_CLASSES[node_id]
    bound = getattr(cls(), cls.FUNCTION)

    def run(*args, **kwargs):
        out = bound(*args, **kwargs)
        return tuple(out["result"]) if isinstance(out, dict) else tuple(out)  # V1 output nodes return ui + result

    return run


def ops_registry() -> dict:
    """facemend.ops.node_ops(), over the stages already moved to ops/ (during the migration some are not)."""
    import importlib

    from facemend import ops

    out: dict = {}
    for stage in ops.STAGES:
        try:
            out.update(getattr(importlib.import_module(f"facemend.ops.{stage}"), "OPS", {}))
        except ModuleNotFoundError as exc:
            if exc.name != f"facemend.ops.{stage}":
                raise
    return out


def stage_module(stage: str):
    """The module holding a stage's loaders and caches: ops/<stage>.py, or nodes/<stage>.py while it is still V1."""
    import importlib

    try:
        return importlib.import_module(f"facemend.ops.{stage}")
    except ModuleNotFoundError as exc:
        if exc.name != f"facemend.ops.{stage}":
            raise
        from conftest import facemend_nodes

        facemend_nodes()
        return importlib.import_module(f"facemend.nodes.{stage}")
