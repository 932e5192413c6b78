"""ComfyUI 0.3.64 checks no V3 combo value when a prompt is queued (its validator looks for a list where V3 declares
"COMBO"), and no version checks an input that validate_inputs names. So every FaceMend combo is named by its node's
validate_inputs and checked there: a stale choice in a saved workflow or API graph is refused at /prompt, as V1
refused it, instead of failing in the middle of a run."""
import inspect

import pytest

from conftest import facemend_nodes


def _combos():
    nodes = facemend_nodes()
    out = []
    for nid, cls in nodes.NODE_CLASSES.items():
        info = cls.GET_NODE_INFO_V1()
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                if spec[0] == "COMBO":
                    out.append((nid, name, list(spec[1]["options"])))
    return out


def test_every_combo_is_checked_when_queued():
    nodes = facemend_nodes()
    unchecked = []
    for nid, name, options in _combos():
        cls = nodes.NODE_CLASSES[nid]
        fn = cls.__dict__.get("validate_inputs")
        named = inspect.getfullargspec(fn.__func__ if fn else cls.validate_inputs).args if fn else []
        if name not in named:
            unchecked.append(f"{nid}.{name}")
            continue
        answer = cls.validate_inputs(**{name: "no such choice"})
        if answer is True or "no such choice" not in str(answer):
            unchecked.append(f"{nid}.{name} (accepted 'no such choice': {answer!r})")
    assert not unchecked, "combos ComfyUI 0.3.64 would let through to the run:\n  " + "\n  ".join(unchecked)


@pytest.mark.parametrize("node_id", ["FaceMend_IDSimilarity", "FaceMend_AdaptiveIDScale", "FaceMend_RestorerIDRestore"])
def test_a_valid_choice_passes(node_id):
    cls = facemend_nodes().NODE_CLASSES[node_id]
    combos = {name: options[0] for nid, name, options in _combos() if nid == node_id}
    assert combos and cls.validate_inputs(**combos) is True
