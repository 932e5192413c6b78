"""tests/setup_comfyui.py: installs ComfyUI's requirements but never the environment's torch, passes pip only what
is missing, and without a ComfyUI checkout says what to fetch and lets the test run go on."""
import subprocess
import sys

import setup_comfyui

from conftest import ROOT

REQS = """comfyui-frontend-package==1.27.10
torch
torchvision
torchaudio
numpy>=1.25.0
#non essential dependencies:
pydantic~=2.0   # a comment after a pin
"""


def test_requirements_keep_the_pins_and_leave_torch_alone(tmp_path):
    (tmp_path / "requirements.txt").write_text(REQS)
    assert setup_comfyui.requirements(tmp_path / "requirements.txt") == [
        "comfyui-frontend-package==1.27.10", "numpy>=1.25.0", "pydantic~=2.0"]


def test_only_unsatisfied_requirements_go_to_pip():
    import numpy
    import pytest

    have = numpy.__version__
    absent = "facemend-no-such-package-xyz"
    assert setup_comfyui.missing([f"numpy=={have}", "numpy", absent, f"numpy>{have}"]) == [absent, f"numpy>{have}"]
    assert setup_comfyui.missing([f"pytest=={pytest.__version__}"]) == []


def test_without_comfyui_it_prints_the_fetch_command_and_exits_0(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "FACEMEND_OFFICIAL_DIR": str(tmp_path / "empty")}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "setup_comfyui.py")], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "python tests/fetch_official.py Comfy-Org/ComfyUI" in proc.stdout and "installing" not in proc.stdout
