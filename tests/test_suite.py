"""benchmarks/suite.py: the Markdown table and the README section generated from a result JSON, the restore
stage's structure (GPU-only batch of 512), and the identity / adapt stages against the official code."""
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


class _Conv:
    """A stand-in restorer (3x3 conv, 16 px faces) with FaceRestorer's surface as the restore stage uses it."""

    def __init__(self):
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

            def forward(self, x, noise=None, generator=None, fidelity=0.5):
                return self.conv(x)

        self.net, self.input_size, self.dtype = Net(), 16, torch.float32

    def set_throughput(self, **kw):
        pass

    def __call__(self, faces, fidelity=0.5, batch_size=0):
        return (self.net((faces - 0.5) / 0.5).clamp(-1, 1) + 1) / 2


def test_restorer_flops_are_counted_on_a_meta_copy():
    """The restore stage's FLOP count (for % of a GPU's peak) needs no compute: a meta-device copy, the real net
    untouched. Checked against the count of a plain conv net done by hand."""
    import torch

    suite = _suite()
    net = _Conv().net
    assert suite.flops_per_face(net, 16) == 2 * 3 * 3 * 9 * 16 * 16
    assert net.conv.weight.device.type == "cpu"
    assert suite.flops_per_face(torch.nn.Identity(), 16) in (0, None)


def test_restore_rows_batch_512_only_on_a_gpu_and_sub_batched(monkeypatch):
    """GFPGAN gets the batch of 512 faces on a GPU only, in sub-batches sized from the memory per face the batch
    before it took (half the free memory, a power of 2), reported for all 512 with % of the peak; a restorer
    name selects only itself ("restoreformer" is not "restoreformer++"); a restorer whose reference is missing is
listed as skipped; other rows have the table's shape."""
    import torch

    suite = _suite()                  # puts benchmarks/ on sys.path
    import bench_restore
    calls, made = [], []
    monkeypatch.setattr(bench_restore, "build_pair", lambda device, dtype: (None, _Conv()))

    def compare(official, ours, batch, device, dtype, repeats, sub_batch=0):
        calls.append((device.type, batch, sub_batch))
        return {"ours_s_per_face": 0.01, "official_s_per_face": 0.02, "max_abs_diff": 0.0}

    class Peak:  # 8 MiB per face of the (sub-)batch
        def __init__(self, device):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.used = (calls[-1][2] if calls else 1) * 8 * 2 ** 20

    def pair(name):
        def make(device, dtype):
            made.append(name)
            if name == "gpen":
                raise ImportError("no modelscope")
            ours = _Conv()
            return ours, lambda x: ours.net(x), f"official {name}", ""
        return name, make

    monkeypatch.setattr(bench_restore, "compare", compare)
    monkeypatch.setattr(suite, "StagePeak", Peak)
    monkeypatch.setattr(suite, "PAIRS", {n: pair(n) for n in suite.PAIRS})
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024 * 2 ** 20, 2048 * 2 ** 20))
    args = suite.parser().parse_args(["--quick", "--restorers", "gfpgan,restoreformer,gpen", "--peak-tflops", "100"])
    args.restorers = args.restorers.split(",")
    with torch.no_grad():                 # as suite.run
        cpu = suite.stage_restore(args, torch.device("cpu"), torch.float32)
    assert made == ["restoreformer", "gpen"] and calls == [("cpu", 1, 1)]
    assert cpu[1] == {"stage": "restore", "why": "gpen: ImportError: no modelscope"}   # listed as skipped
    cpu = [cpu[0], cpu[2]]
    assert [r["case"] for r in cpu] == ["restoreformer, batch 1", "GFPGAN v1.4, batch 1"]
    rf = cpu[0]
    assert rf["reference"] == "official restoreformer" and rf["faces"] == 1 and rf["ratio"] > 0
    assert "max |diff| 0.0e+00" in rf["note"] and "GFLOP/face" in rf["note"]   # same net on both sides
    calls.clear()
    args.restorers = ["gfpgan"]
    gpu = suite.stage_restore(args, torch.device("cuda"), torch.float32)
    assert calls == [("cuda", 8, 8), ("cuda", 512, 64)]                # 0.5 * 1024 MiB / 8 MiB = 64
    big = gpu[-1]
    assert big["case"] == "GFPGAN v1.4, batch 512" and big["faces"] == 512 and "sub-batches of 64" in big["note"]
    assert big["ours_s"] == pytest.approx(0.01 * 512) and big["ratio"] == pytest.approx(2.0)
    assert "% of 100 TFLOP/s peak" in big["note"]


def test_unknown_restorer_is_refused():
    suite = _suite()
    with pytest.raises(SystemExit, match="unknown restorer"):
        suite.main(["--stages", "restore", "--restorers", "gfpgan,restoreformer+", "--out", "/nonexistent"])


def test_identity_and_adapt_without_official_snapshots_are_skipped_saying_what_they_need(monkeypatch, tmp_path):
    import adapt_official

    suite = _suite()
    monkeypatch.setenv("FACEMEND_OFFICIAL_DIR", str(tmp_path / "no_official"))   # an empty cache
    monkeypatch.setattr(adapt_official, "_cache", {})
    try:
        result = suite.run(suite.parser().parse_args(["--stages", "identity,adapt", "--quick"]))
    except pytest.skip.Exception as exc:   # would skip this test instead of failing it
        pytest.fail(f"a reference loader's skip escaped the suite: {exc}")
    assert result["rows"] == []
    why = {s["stage"]: s["why"] for s in result["skipped"]}
    assert set(why) == {"identity", "adapt"}
    # each names the cache it looked in and the command that fetches the pinned checkout
    assert "no_official" in why["identity"] and "fetch_official.py YingJiacheng/RestorerID" in why["identity"]
    assert "no_official" in why["adapt"] and "fetch_official.py zsyOAOA/DifFace" in why["adapt"]
    table = suite.markdown(result)
    assert "| identity | skipped |" in table and "| adapt | skipped |" in table


def test_identity_and_adapt_rows_against_the_official_code():
    """The two stages on the CPU (tiny configs, ~15 s): each row's shape, and the official and our outputs agree
    far below their size (the equivalence tests hold the exact bounds) - the suite timed the same computation."""
    import re

    from adapt_official import DIFFACE, UFR
    from official_code import official_dir
    from restorerid_official import NAME

    for name in (NAME, DIFFACE, UFR):
        official_dir(name)   # skips with the fetch command when a pinned checkout is missing
    suite = _suite()
    result = suite.run(suite.parser().parse_args(["--stages", "identity,adapt", "--quick"]))
    assert result["skipped"] == []
    cases = [(r["stage"], r["case"].split(",")[0]) for r in result["rows"]]
    assert cases == [("identity", "denoiser call"), ("identity", "DDIM sampler"), ("adapt", "pseudo targets"),
                     ("adapt", "fine-tuning step")]
    for r in result["rows"][:3]:
        assert r["ours_s"] > 0 and r["reference_s"] > 0 and r["ratio"] == pytest.approx(r["reference_s"] / r["ours_s"])
        assert r["reference"].startswith("official")
        diff = float(re.search(r"max \|diff\| ([0-9.e+-]+)", r["note"]).group(1))
        assert diff < 1e-3, r
    ft = result["rows"][3]
    assert ft["reference_s"] is None and ft["ratio"] is None and "ours only" in ft["note"] and ft["faces"] == 1


def test_a_failing_row_reports_its_error_and_the_stage_goes_on(monkeypatch):
    """A restorer whose reference cannot run (as spandrel's CodeFormer in bf16) or whose build fails gives a failed
    row with its error; the other restorers and GFPGAN's rows are still measured."""
    import torch

    suite = _suite()
    import bench_restore
    monkeypatch.setattr(bench_restore, "build_pair", lambda device, dtype: (None, _Conv()))
    monkeypatch.setattr(bench_restore, "compare", lambda *a, **k: {"ours_s_per_face": 0.01,
                                                                  "official_s_per_face": 0.02, "max_abs_diff": 0.0})

    def pair(name):
        def make(device, dtype):
            if name == "gpen":
                raise ValueError("bad build")
            ours = _Conv()

            def ref_call(x):
                if name == "codeformer":
                    raise RuntimeError("expected m1 and m2 to have the same dtype\nmore")
                return ours.net(x)
            return ours, ref_call, f"official {name}", ""
        return name, make

    monkeypatch.setattr(suite, "PAIRS", {n: pair(n) for n in suite.PAIRS})
    args = suite.parser().parse_args(["--quick", "--restorers", "gfpgan,codeformer,restoreformer,gpen"])
    args.restorers = args.restorers.split(",")
    with torch.no_grad():
        rows = suite.stage_restore(args, torch.device("cpu"), torch.float32)
    assert [r.get("case") or r["why"] for r in rows] == [
        "codeformer, batch 1 failed: RuntimeError: expected m1 and m2 to have the same dtype",
        "restoreformer, batch 1", "gpen failed: ValueError: bad build", "GFPGAN v1.4, batch 1"]


def test_the_reference_runs_in_float32_under_autocast_for_half_precision():
    """spandrel's CodeFormer computes `one_hot.float() @ codebook`: with its weights cast to bf16 that matmul
    fails (float32 x bf16); kept in float32 under autocast (as the official scripts run half precision) it runs,
    in bf16 arithmetic."""
    import torch

    suite = _suite()

    class Codebook(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.embedding = torch.nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            one_hot = torch.nn.functional.one_hot(self.conv(x).argmax(1), 4)
            return torch.matmul(one_hot.float(), self.embedding).permute(0, 3, 1, 2)

    torch.manual_seed(0)
    ref, x = Codebook().eval(), torch.rand(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="dtype"):
        ref.to(torch.bfloat16)(x.to(torch.bfloat16))
    ref.float()
    want = ref(x)
    got = suite.reference_autocast(ref, torch.device("cpu"), torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert suite.reference_autocast(ref, torch.device("cpu"), torch.float32) is ref
    # the same codes wherever bf16 rounding of the 1x1 conv does not flip the argmax; the codes are exact in bf16
    # up to the codebook's bf16 rounding (2^-8 relative)
    close = (got.float() - want).abs() <= want.abs() * 2 ** -8
    assert close.float().mean() > 0.9


def test_benchmark_timing_and_memory_use_the_device_given(monkeypatch):
    """--device cuda:1 synchronises and measures cuda:1, not the current CUDA device (faked torch.cuda calls)."""
    import torch

    _suite()
    import _common

    calls = []
    for fn in ("synchronize", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, fn, lambda device=None, _fn=fn: calls.append((_fn, device)) or 0)
    _common.sync("cuda:1")
    with _common.Peak("cuda:1"):
        pass
    assert calls and all(torch.device(d) == torch.device("cuda", 1) for _, d in calls), calls
    assert {c for c, _ in calls} == {"synchronize", "reset_peak_memory_stats", "memory_allocated",
                                     "max_memory_allocated"}


def test_no_benchmark_synchronises_or_measures_the_current_device_implicitly():
    """Every CUDA synchronize / memory call in benchmarks/ names its device: a bare call measures the current
    device, which --device cuda:1 does not change."""
    import re

    bare = re.compile(r"torch\.cuda\.(synchronize|reset_peak_memory_stats|memory_allocated|max_memory_allocated|"
                      r"mem_get_info)\(\)")
    found = [f"{p.name}:{i}" for p in sorted((ROOT / "benchmarks").glob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if bare.search(line)]
    assert found == []
