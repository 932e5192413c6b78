"""The checkout folder's name must not matter: CI and users clone into folders like `facemend-ci` or
`ComfyUI-FaceMend`, which are not Python identifiers (pytest then imports the root __init__.py by path)."""
import shutil
import subprocess
import sys

from conftest import ROOT


def test_tests_run_in_a_checkout_folder_whose_name_is_not_an_identifier(tmp_path):
    copy = tmp_path / "face-mend ci"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info",
                                                             ".pytest_cache", "demo_output"))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_readme.py"],
                         cwd=copy, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "passed" in run.stdout
