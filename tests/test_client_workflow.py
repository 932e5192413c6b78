"""Headless client, the parts that need no server: loading presets and files, --set overrides, the LoadImage
choice, ComfyUI's /prompt error text, output naming and the never-a-half-file writes."""
import json
import time

import pytest

from facemend.client import runner as R
from facemend.client.server import format_prompt_error
from facemend.client.workflow import (WorkflowError, apply_overrides, image_input_node, load_workflow,
                                      shipped_presets)

from conftest import ROOT


def test_every_preset_is_shipped_as_an_api_graph():
    from facemend.pipelines.presets import PRESETS

    assert set(shipped_presets()) >= set(PRESETS)
    for name in PRESETS:
        graph = load_workflow(name)
        assert graph == json.loads((ROOT / "workflows" / "api" / f"facemend_{name}.json").read_text())


def test_a_ui_graph_or_unknown_name_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(WorkflowError, match="Export \\(API\\)"):
        load_workflow(str(ROOT / "example_workflows" / "facemend_demo.json"))
    with pytest.raises(WorkflowError, match="demo, fast"):
        load_workflow("nope")


def test_overrides_by_id_class_and_title_parse_json_values():
    graph = load_workflow("demo")
    patched = apply_overrides(graph, ["FaceMend_PerImageTune.steps=10", "8.filename_prefix=x/y",
                                      "FaceMend_ColorFix.method=adain", "4.self_ensemble=true"])
    assert patched["4"]["inputs"]["steps"] == 10 and patched["4"]["inputs"]["self_ensemble"] is True
    assert patched["8"]["inputs"]["filename_prefix"] == "x/y"
    assert patched["5"]["inputs"]["method"] == "adain"
    assert graph["4"]["inputs"]["steps"] == 200  # the loaded graph itself is untouched
    with pytest.raises(WorkflowError, match="no node 'Nope'"):
        apply_overrides(graph, ["Nope.x=1"])
    with pytest.raises(WorkflowError, match="NODE.INPUT=VALUE"):
        apply_overrides(graph, ["steps=3"])


def test_the_load_image_node_is_found_or_must_be_named():
    graph = load_workflow("fast")
    assert image_input_node(graph) == "1"
    two = dict(graph, **{"99": {"class_type": "LoadImage", "inputs": {"image": "b.png"}}})
    assert image_input_node(two) == "1"  # titled "input" in the shipped API graphs
    untitled = {k: dict(v, _meta={"title": v["class_type"]}) for k, v in two.items()}
    with pytest.raises(WorkflowError, match="--image-node"):
        image_input_node(untitled)
    assert image_input_node(untitled, "99") == "99"


def test_prompt_errors_read_like_comfyui_wrote_them():
    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": ""},
            "node_errors": {"4": {"class_type": "FaceMend_RestorerLoader", "errors": [
                {"message": "Value not in list", "details": "model: 'GFPGANv1.4.pth' not in []"}]}}}
    text = format_prompt_error(body)
    assert text.splitlines()[0] == "Prompt outputs failed validation"
    assert "node 4 (FaceMend_RestorerLoader): Value not in list: model: 'GFPGANv1.4.pth' not in []" in text


def test_execution_error_text_comes_from_the_history_entry():
    entry = {"status": {"status_str": "error", "completed": False, "messages": [
        ["execution_start", {}],
        ["execution_error", {"node_id": "4", "node_type": "FaceMend_RestorerLoader", "exception_type":
                             "facemend.ModelFileNotFound", "exception_message": "GFPGANv1.4.pth not found\n"}]]}}
    assert R.execution_error_text(entry) == ("FaceMend_RestorerLoader (node 4): facemend.ModelFileNotFound: "
                                             "GFPGANv1.4.pth not found")


def test_inputs_with_the_same_name_get_distinct_outputs_planned_before_anything_runs(tmp_path):
    """As the CLI: x.jpg and x.png keep their extension in the output name (no server is asked for this)."""
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "A.webp").write_bytes(b"x")
    runner = R.Runner(["http://127.0.0.1:9"], load_workflow("demo"), tmp_path / "out")
    assert [(j.path.name, j.name) for j in runner.plan([tmp_path])] == [
        ("A.webp", "A_webp"), ("a.jpg", "a_jpg"), ("a.png", "a_png")]


def test_atomic_write_leaves_no_half_file(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")

    class Boom(Exception):
        pass

    def broken_replace(a, b):
        raise Boom()

    monkeypatch.setattr(R.os, "replace", broken_replace)
    with pytest.raises(Boom):
        R._write_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_progress_lines_show_each_image_and_the_run_with_an_eta():
    import io

    from facemend.client.progress import Progress

    out = io.StringIO()
    p = Progress(4, stream=out, live=False, log_every=0)
    p.started("a", "http://s1", 1)
    p.started("b", "http://s2", 2)
    p.update("a", 0.5, "FaceMend_PerImageTune", "100/200")
    p.finished("b", "done", "1 file(s)")
    text = out.getvalue()
    assert "b: sent to http://s2 (attempt 2)" in text
    assert "a @ http://s1 [##########----------]  50% FaceMend_PerImageTune 100/200" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("b: done: 1 file(s) | 1/4") and "running 1" in last and "ETA " in last


def test_a_silent_server_is_busy_and_a_closed_port_is_gone():
    """Only a refused connection fails a job over at once; a server that accepts and stays silent (a loaded CPU,
    a model loading) is waited for."""
    import socket

    from facemend.client.server import Server, ServerBusy, ServerUnavailable

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        silent = Server(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5, busy_grace=1.2)
        t = time.monotonic()
        with pytest.raises(ServerBusy):  # asked again until busy_grace has passed without an answer
            silent.get_json("/system_stats")
        assert time.monotonic() - t >= 1.2
        assert silent.alive() and not silent.alive(answer_needed=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = Server(f"http://127.0.0.1:{port}", timeout=0.5)
    with pytest.raises(ServerUnavailable) as err:
        closed.get_json("/system_stats")
    assert not isinstance(err.value, ServerBusy) and not closed.alive()


def test_the_titled_photo_input_wins_and_at_paths_are_local_files(tmp_path):
    from facemend.client.workflow import local_files

    graph = load_workflow("id_preserve")
    assert image_input_node(graph) == "1"  # the reference LoadImage (4) is not the photo
    ref = tmp_path / "ref.jpg"
    ref.write_bytes(b"x")
    patched = apply_overrides(graph, [f"4.image=@{ref}"])
    assert local_files(patched) == {("4", "image"): ref}
    with pytest.raises(WorkflowError, match="does not exist"):
        local_files(apply_overrides(graph, ["4.image=@/nonexistent/ref.jpg"]))
