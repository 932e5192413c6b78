"""GPU throughput switches of the restorer, verified on the CPU: channels-last weights and faces, bf16 in
channels-last, torch.compile wiring. Same narrowed 32-pixel GFPGAN v1.4 as the half-precision test of
test_restore_gfpgan.py (half-precision convolutions are slow on CPUs), with its tolerances:
- channels-last fp32 vs contiguous fp32: the same convolutions summed in another order (restorer_reorder_tol:
  the float32 error of this restorer against its float64 run, measured on this machine);
- channels-last bf16 vs contiguous fp32: bf16's 8 mantissa bits (TOL_HALF, derived there);
- torch.compile with the "eager" backend (graph capture without code generation; what runs on any CPU in
  seconds): the same kernels, so equal up to float rounding (1e-6).
"""
import pytest
import torch

from facemend.pipelines.restore.restorer import FaceRestorer

from conftest import restorer_reorder_tol
from test_restore_gfpgan import TOL_HALF, _build_official, _faces_uint8, _load_official_arch, _to_ours


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    net = _build_official(_load_official_arch(), 32, seed=3, narrow=0.125)
    path = tmp_path_factory.mktemp("throughput") / "narrow.pth"
    torch.save({"params_ema": net.state_dict()}, path)
    return str(path)


def test_channels_last_fp32_and_bf16_match_the_default_layout(narrow):
    x = _to_ours(_faces_uint8(2, 32, seed=9))
    plain = FaceRestorer.from_file(narrow).set_throughput(channels_last=False)
    assert next(m for m in plain.net.modules() if isinstance(m, torch.nn.Conv2d)).weight.is_contiguous()
    ref = plain(x, noise="stored", batch_size=2)
    fr = FaceRestorer.from_file(narrow)  # channels-last is the default
    conv = next(m for m in fr.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert fr.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    got = fr(x, noise="stored", batch_size=2)
    # Both layouts are float32 sums of the same terms: each within the measured reorder error of the exact result.
    assert (got - ref).abs().max() < 2 * restorer_reorder_tol(plain, x, noise="stored", batch_size=2)
    fr.to(dtype=torch.bfloat16)  # the layout survives a dtype change
    assert conv.weight.dtype == torch.bfloat16 and conv.weight.is_contiguous(memory_format=torch.channels_last)
    got = fr(x, noise="stored", batch_size=2)
    tol_max, tol_mean = TOL_HALF[torch.bfloat16]
    d = (got - ref).abs()
    assert got.dtype == torch.float32 and d.max() < tol_max and d.mean() < tol_mean
    fr.set_throughput(channels_last=False)
    assert conv.weight.is_contiguous()


def test_compile_switch_runs_the_compiled_network(narrow):
    x = _to_ours(_faces_uint8(1, 32, seed=10))
    fr = FaceRestorer.from_file(narrow)
    ref = fr(x, noise="stored")
    calls = []
    fr.set_throughput(compile="eager")
    inner = fr._compiled
    fr._compiled = lambda *a, **k: calls.append(1) or inner(*a, **k)
    got = fr(x, noise="stored")
    assert calls and (got - ref).abs().max() < 1e-6
    fr.set_throughput(compile=False)
    assert fr._compiled is None and torch.equal(fr(x, noise="stored"), ref)


def test_compiled_restorer_pads_the_last_short_chunk_instead_of_recompiling(narrow):
    """torch.compile with static shapes compiles again for every new batch size: 5 faces in chunks of 2 would
    compile for 2 and for 1. The short last chunk is padded to 2 (copies of its last face), so the compiled
    network only ever sees one shape; every face's result stays that of the plain network (float rounding: the
    padded chunk runs the batched modulated convolution instead of the single-face one)."""
    x = _to_ours(_faces_uint8(5, 32, seed=11))
    fr = FaceRestorer.from_file(narrow)
    ref = fr(x, noise="stored", batch_size=2)
    tol = 2 * restorer_reorder_tol(fr, x, noise="stored", batch_size=2)
    shapes = []
    fr.set_throughput(compile="eager")
    inner = fr._compiled
    fr._compiled = lambda x, **k: shapes.append(tuple(x.shape)) or inner(x, **k)
    got = fr(x, noise="stored", batch_size=2)
    assert shapes == [(2, 3, 32, 32)] * 3
    assert got.shape == ref.shape and (got - ref).abs().max() < tol
