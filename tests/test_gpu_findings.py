"""What the first GPU run (benchmarks/gpu_check.py on an H200, 2026-12-04) found, as properties the CPU can check:
attention inputs laid out for CUDA's fused kernels, and tensors too large for a kernel's 32-bit indexing handled
like out of memory (smaller chunks), not as a failure."""
import pytest
import torch
import torch.nn.functional as F

from facemend.pipelines.io import memory

INDEX_LIMIT = ("upsample_bilinear2d_nhwc only supports output tensors with less than INT_MAX elements, "
               "but got [128, 64, 512, 512]")


def _stride_one_spy(monkeypatch, module):
    """Replace module.F.scaled_dot_product_attention: record whether q, k and v each have a stride-1 last dim."""
    seen, real = [], F.scaled_dot_product_attention

    def check(q, k, v, *a, **kw):
        seen.append(all(t.stride(-1) == 1 for t in (q, k, v)))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(module.F, "scaled_dot_product_attention", check)
    return seen


def test_structure_encoder_attention_gives_the_fused_kernels_stride_one_inputs(monkeypatch):
    """A non-contiguous last dim sends CUDA's SDPA to its math path, which holds the T x T matrix: 128 GiB for the
    RestorerID structure encoder's attention on a 512 face on the H200."""
    from facemend.pipelines.identity import layers

    torch.manual_seed(0)
    block = layers.LegacyAttentionBlock(64, 4)
    x = torch.rand(2, 64, 8, 8)
    seen = _stride_one_spy(monkeypatch, layers)
    block(x)
    assert seen == [True]


def test_restoreformer_attention_gives_the_fused_kernels_stride_one_inputs(monkeypatch):
    from facemend.pipelines.restore.archs import restoreformer as RF

    torch.manual_seed(0)
    block = RF.MultiHeadAttnBlock(32, 2)
    seen = _stride_one_spy(monkeypatch, RF)
    block(torch.rand(1, 32, 4, 4))
    block(torch.rand(1, 32, 4, 4), torch.rand(1, 32, 4, 4))
    assert seen == [True, True]


@pytest.mark.parametrize("message, splittable", [
    (INDEX_LIMIT, True),
    ("input tensor must fit into 32-bit index math", True),
    ("The size of tensor a (4) must match the size of tensor b (3)", False),
])
def test_index_limit_errors_are_retried_smaller(message, splittable):
    exc = RuntimeError(message)
    assert memory.too_large_for_kernel(exc) is splittable
    assert memory.needs_smaller_chunk(exc) is splittable


def test_run_halving_splits_a_chunk_too_large_for_a_kernel():
    calls = []

    def run(start, stop):
        calls.append(stop - start)
        if stop - start > 2:
            raise RuntimeError(INDEX_LIMIT)
        return list(range(start, stop))

    out = memory.run_halving(5, 8, run)
    assert sum(out, []) == list(range(5)) and calls == [5, 4, 2, 2, 1]


def test_restorer_splits_a_batch_too_large_for_a_kernel(monkeypatch):
    """GFPGAN at 128 faces a call failed on the H200 (channels-last upsampling past INT_MAX elements): the batch
    now halves as for out of memory, and each face's result is the one it gets alone."""
    from facemend.pipelines.restore import restorer as R
    from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean

    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(out_size=64, num_style_feat=64, narrow=0.25))
    fr = R.FaceRestorer.from_state_dict({"params_ema": net.state_dict()})
    faces = torch.rand(3, 3, 64, 64)
    expected = fr(faces, batch_size=1, seed=5)
    real = R.FaceRestorer._restore_chunk

    def chunk_or_refuse(self, chunk, *a):
        if chunk.shape[0] > 1:
            raise RuntimeError(INDEX_LIMIT)
        return real(self, chunk, *a)

    monkeypatch.setattr(R.FaceRestorer, "_restore_chunk", chunk_or_refuse)
    assert torch.equal(fr(faces, batch_size=4, seed=5), expected)


def test_hosted_model_search_registers_our_folders_when_the_host_has_not_yet(monkeypatch, tmp_path):
    """gpu_check imported the node classes (whose schemas list model files) into a ComfyUI whose folder_paths did
    not know our folders yet: ComfyUI's KeyError 'onestep_sr'. The search now registers them first."""
    import sys
    import types

    from facemend.host import model_paths

    fake = types.ModuleType("folder_paths")
    fake.models_dir = str(tmp_path)
    fake.folder_names_and_paths = {"checkpoints": ([str(tmp_path / "checkpoints")], {".safetensors"})}
    fake.get_folder_paths = lambda name: fake.folder_names_and_paths[name][0][:]
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    monkeypatch.setitem(sys.modules, "comfy.model_management", types.ModuleType("comfy.model_management"))
    assert model_paths.search_dirs("onestep_sr") == [str(tmp_path / "onestep_sr")]
    assert model_paths.search_dirs("checkpoints") == [str(tmp_path / "checkpoints")]


def test_gpu_check_step_counter_passes_live_previews_on():
    """gpu_check counts progress steps by wrapping Progress.update; the wrapper dropped the preview keyword the
    nodes now pass, and every id_preserve run failed on the H200."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_check

    from facemend.host import device as dev

    with gpu_check.counting_steps() as count:
        progress = dev.Progress(3)
        progress.update(1, preview=torch.zeros(1, 4, 4, 3))
        progress.update(2)
    assert count == [3] and progress.done == 3
