"""Out of memory on the CPU, by injection: what counts as out of memory, halving fallbacks for RestorerID and
detection, and the allocator cache emptied only after the failed attempt's tensors are released."""
import weakref

import pytest
import torch

from facemend.pipelines.io import memory

from restorerid_models import models_dir  # noqa: F401  (the tiny RestorerID folder, for the node test)



def oom():  # a new exception each time, as torch raises them (a shared one would keep its last traceback alive)
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("exc, oom", [
    (oom(), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: out of memory"),
     True),
    (MemoryError(), True),
    (RuntimeError("The size of tensor a (4) must match the size of tensor b (3)"), False),
    (ValueError("out of range"), False),
])
def test_out_of_memory_is_recognised(exc, oom):
    assert memory.is_oom(exc) is oom


def _watch_release(monkeypatch, module):
    """Replace `module.empty_cache`: record, at each call, whether every tensor of the failed attempts is gone."""
    held, seen = [], []

    def empty_cache(device=None):
        seen.append(all(ref() is None for ref in held))

    monkeypatch.setattr(module, "empty_cache", empty_cache)
    return held, seen


def test_run_halving_releases_the_failed_attempt_before_emptying_the_cache(monkeypatch):
    held, seen = _watch_release(monkeypatch, memory)
    calls = []

    def run(start, stop):
        calls.append(stop - start)
        work = torch.empty(1000)  # a tensor only the failed frame (and the exception's traceback) holds
        if stop - start > 2:
            held.append(weakref.ref(work))
            raise oom()
        return list(range(start, stop))

    out = memory.run_halving(7, 8, run)
    assert sum(out, []) == list(range(7)) and calls == [7, 4, 2, 2, 2, 1]
    assert seen == [True, True]
    with pytest.raises(torch.OutOfMemoryError):  # one item still too many: the error propagates
        memory.run_halving(3, 1, lambda a, b: (_ for _ in ()).throw(oom()))
    with pytest.raises(ValueError):  # other errors are not retried
        memory.run_halving(3, 2, lambda a, b: (_ for _ in ()).throw(ValueError("bad")))


def test_restorer_halves_and_frees_only_after_release(monkeypatch):
    from facemend.pipelines.restore import restorer as R
    from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean

    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(out_size=64, num_style_feat=64, narrow=0.25))
    fr = R.FaceRestorer.from_state_dict({"params_ema": net.state_dict()})
    faces = torch.rand(3, 3, 64, 64)
    expected = fr(faces, batch_size=1, seed=5)
    held, seen = _watch_release(monkeypatch, R)
    real = R.FaceRestorer._restore_chunk

    def chunk_or_oom(self, chunk, *a):
        if chunk.shape[0] > 1:
            work = chunk * 2  # held by this frame, so by the exception's traceback
            held.append(weakref.ref(work))
            raise oom()
        return real(self, chunk, *a)

    monkeypatch.setattr(R.FaceRestorer, "_restore_chunk", chunk_or_oom)
    out = fr(faces, batch_size=4, seed=5)
    assert torch.equal(out, expected) and seen == [True, True]


def test_detection_halves_its_chunks_on_out_of_memory():
    from facemend.pipelines.face.align import detect_faces

    class Detector:  # the detection contract; more than 2 images at once do not fit
        def __init__(self):
            self.sizes = []

        def detect(self, images, score_threshold=0.8):
            self.sizes.append(images.shape[0])
            if images.shape[0] > 2:
                raise RuntimeError("CUDNN_STATUS_ALLOC_FAILED")
            return [img.mean().reshape(1, 1).expand(1, 15).clone() for img in images]

    images = torch.rand(5, 3, 16, 16)
    det, done = Detector(), []
    found = detect_faces(images, det, chunk=8, hook=done.append)
    assert det.sizes == [5, 4, 2, 2, 1] and done == [2, 2, 1]
    assert [float(d[0, 0]) for d in found] == [float(images[i].mean()) for i in range(5)]


def test_restorerid_batches_halve_and_keep_the_result_of_the_smaller_batch():
    from facemend.pipelines.identity.stage import restore_in_batches

    class Model:  # RestorerID's restore contract: face k of the run draws from its own generator (seed + k)
        def __init__(self, limit):
            self.limit, self.sizes = limit, []

        def restore(self, faces, reference, ip_scale, seed, first, steps, cfg):
            self.sizes.append(faces.shape[0])
            noise = torch.stack([torch.randn(faces.shape[1:], generator=torch.Generator().manual_seed(seed + first + k))
                                 for k in range(faces.shape[0])])
            if faces.shape[0] > self.limit:  # a UNet batch of 2 x faces (CFG) that does not fit
                raise oom()
            return faces + noise * ip_scale.view(-1, 1, 1, 1)

    faces, scales = torch.rand(5, 3, 8, 8), torch.linspace(0.1, 0.5, 5)
    small = restore_in_batches(Model(8), faces, None, scales, 2, seed=7, steps=1, cfg=4.0)
    notes, model = [], Model(2)
    out = restore_in_batches(model, faces, None, scales, 8, seed=7, notes=notes, steps=1, cfg=4.0)
    assert torch.equal(out, small) and model.sizes == [5, 4, 2, 2, 1]
    assert len(notes) == 2 and "retried with 2 faces per batch" in notes[1]


def test_osdface_retry_frees_after_release(monkeypatch):
    from facemend.pipelines.diffusion import osdface, refiner

    held, seen = _watch_release(monkeypatch, refiner)  # the retry loop both one-step models share

    class Fake(osdface.OSDFace):
        device = torch.device("cpu")

        def __init__(self):
            self.tiles, self.tried = refiner.TileSettings(max_batch=4), []

        def run(self, images, scale, seed, tiles, hook):
            self.tried.append(tiles.max_batch)
            if tiles.max_batch > 1:
                work = images * 2
                held.append(weakref.ref(work))
                raise oom()
            return images

    model = Fake()
    x = torch.rand(1, 3, 8, 8)
    assert model(x) is x and model.tried == [4, 2, 1] and seen == [True, True]


def test_onestep_retry_frees_after_release(monkeypatch):
    from facemend.pipelines.diffusion import refiner

    held, seen = _watch_release(monkeypatch, refiner)

    class Fake(refiner.OneStepSR):
        device = torch.device("cpu")

        def __init__(self):
            self.name, self.tiles, self.tried = "fake", refiner.TileSettings(max_batch=2), []

        def run(self, images, scale, seed, tiles, hook):
            self.tried.append(tiles.max_batch)
            if tiles.max_batch > 1:
                work = images * 2
                held.append(weakref.ref(work))
                raise oom()
            return images

    model = Fake()
    x = torch.rand(1, 3, 8, 8)
    assert model(x) is x and model.tried == [2, 1] and seen == [True]


def test_restorerid_node_halves_its_batch_and_says_so(models_dir, monkeypatch):  # noqa: F811
    import json

    pytest.importorskip("onnxruntime")
    from facemend.ops.identity import restore_with_reference
    from facemend.pipelines.identity.restorer import RestorerID
    from test_identity_nodes import _inputs

    rid, det, idm, ref, crops = _inputs(models_dir)
    expected, _ = restore_with_reference(crops, rid, ref, det, idm, id_scale=0.4, seed=3, steps=1, batch_size=1)
    real = RestorerID.restore

    def restore(self, faces, *a, **k):  # two faces with CFG (a UNet batch of 4) do not fit
        if faces.shape[0] > 1:
            raise oom()
        return real(self, faces, *a, **k)

    monkeypatch.setattr(RestorerID, "restore", restore)
    out, report = restore_with_reference(crops, rid, ref, det, idm, id_scale=0.4, seed=3, steps=1, batch_size=2)
    assert torch.equal(out, expected)
    assert "retried with 1 face per batch" in json.loads(report)["notes"][0]


def test_the_host_recognises_what_the_pipelines_do():
    from facemend.host import device as dev

    assert dev.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasLtMatmul`"))
    assert not dev.is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
