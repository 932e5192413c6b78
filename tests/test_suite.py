"""benchmarks/suite.py's outputs: the Markdown table and the README section generated from a result JSON."""
import importlib.util
import json

import pytest

from conftest import ROOT


def _suite():
    spec = importlib.util.spec_from_file_location("bench_suite", ROOT / "benchmarks" / "suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RESULT = {
    "argv": ["--quick"], "device": "cpu", "dtype": "fp32", "quick": True, "date": "2026-12-02 07:00 UTC",
    "machine": {"torch": "2.x", "torch_threads": 2, "cpu": "Some CPU", "load_average": 3.0},
    "rows": [],
    "skipped": [{"stage": "onestep", "why": "FileNotFoundError: needs /x"}],
}


def test_rows_table_and_readme_section(tmp_path, monkeypatch):
    suite = _suite()
    RESULT["rows"] = [suite.row("detect_align_paste", "t1 total", 0.5, 1.5, 6, 2 ** 20 * 30, "facexlib", "6/6"),
                      suite.row("iqa", "niqe", 2.0, None, 4, None, note="max |diff| 1e-7")]
    r = RESULT["rows"][0]
    assert r["ratio"] == pytest.approx(3.0) and r["faces_per_s"] == pytest.approx(12.0) and r["peak_mib"] == 30
    table = suite.markdown(RESULT)
    assert "| detect_align_paste | t1 total | 0.500 | 1.500 | 3.00 | 12.00 | 30 | facexlib | 6/6 |" in table
    assert "| iqa | niqe | 2.000 | - | - | 2.00 | - |  | max \\|diff\\| 1e-7 |" in table
    assert "| onestep | skipped |" in table and "Some CPU, 2 torch threads" in table

    js = tmp_path / "r.json"
    js.write_text(json.dumps(RESULT))
    readme = tmp_path / "README.md"
    readme.write_text(f"# X\nbefore\n{suite.README_BEGIN}\nold table\n{suite.README_END}\nafter\n")
    suite.write_readme(str(js), readme)
    text = readme.read_text()
    assert "old table" not in text and table in text
    assert text.startswith("# X\nbefore\n") and text.endswith(f"{suite.README_END}\nafter\n")
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        suite.write_readme(str(js), readme)
    assert readme.read_text() == "# no markers\n"


def test_unknown_stage_is_refused():
    suite = _suite()
    with pytest.raises(SystemExit, match="unknown stage"):
        suite.main(["--stages", "detect,restore", "--out", "/nonexistent"])  # refused before anything runs


def test_the_readme_has_the_generated_section():
    suite = _suite()
    text = (ROOT / "README.md").read_text()
    assert suite.README_BEGIN in text and suite.README_END in text
    assert "benchmarks/suite.py" in text.split(suite.README_BEGIN)[1].split(suite.README_END)[0]


def test_restorer_flops_are_counted_on_a_meta_copy():
    """The restore stage's FLOP count (for % of a GPU's peak) needs no compute: a meta-device copy, the real net
    untouched. Checked against the count of a plain conv net done by hand."""
    import torch

    suite = _suite()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x, noise=None, generator=None, fidelity=0.5):
            return self.conv(x)

    net = Net()
    assert suite.flops_per_face(net, 16) == 2 * 8 * 3 * 9 * 16 * 16
    assert net.conv.weight.device.type == "cpu"
    assert suite.flops_per_face(torch.nn.Identity(), 16) in (0, None)
