"""The README stays true: its commands, nodes, workflows and model files match the code."""
import re

from facemend.host.model_paths import KNOWN_FILES

from conftest import ROOT, facemend_nodes

README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
    assert any("facemend demo" in b for b in blocks)


def test_every_node_is_documented():
    for node_id in facemend_nodes().NODE_CLASSES:
        assert f"`{node_id}`" in README, node_id


def test_every_workflow_and_model_file_is_documented():
    for wf in (ROOT / "workflows").glob("*.json"):
        assert wf.name in README, wf.name
    for wf in (ROOT / "example_workflows").glob("*.json"):  # the templates, each with its picture
        assert f"`{wf.stem}` ![](example_workflows/{wf.stem}.jpg)" in README, wf.name
    for name in KNOWN_FILES:
        assert f"`{name}`" in README, name
