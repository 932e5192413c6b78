"""Faces per group of the per-image tuning (pipelines/tune/memory.py): the per-face memory estimate against the
real peak measured on the CPU, the plan from free memory (cap, at least one face, the error naming the need), and
the tuners using it (grouped results equal one group; the report, the log line and the progress total).

The measurements run fresh interpreters (tests/tune_memory.py): about 40 s on 2 idle cores."""
import json
import logging

import pytest
import torch

from facemend.pipelines.tune import memory as M, ntire_refine as NT, zssr as Z
from facemend.pipelines.tune import engine as E

import tune_memory

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py; the measurements run their own process


# The estimate must bound the measured growth per face from above, and by at most this factor (tune/memory.py
# counts oneDNN's plain and blocked copies of every convolution buffer; measured ratios 1.1-1.45).
FACTOR = 1.6

REGIMES = {
    # the paper's network (width 64): the test-time passes and the self-ensemble's median dominate
    "zssr width 64": ("zssr", 64, {"crop_size": 32, "max_iters": 3}),
    # a narrow network with tiled passes (several tile shapes): the self-ensemble's median dominates
    "zssr width 16 tiled": ("zssr", 96, {"crop_size": 16, "max_iters": 3, "width": 16, "tile_size": 32}),
    # NTIRE: 8 crops a step, the training step dominates
    "ntire batch 8": ("ntire_tune", 64, {"crop_size": 32, "steps": 3, "batch_size": 8, "validation_interval": 3}),
}


@pytest.mark.parametrize("regime", list(REGIMES))
def test_estimate_bounds_measured_growth_per_face(regime):
    if not tune_memory.supported():
        pytest.skip("needs Linux's VmHWM and /proc/self/clear_refs to measure the peak resident memory")
    mode, size, config = REGIMES[regime]
    measured, few, many = tune_memory.per_face_growth(mode, size, config, 5, 2)
    cost = tune_memory.estimate(mode, size, config)
    estimate = cost.group + cost.batch
    print(f"{regime}: measured {measured / 2 ** 20:.2f} MiB per face (2 faces +{few['growth'] / 2 ** 20:.1f} MiB, "
          f"5 faces +{many['growth'] / 2 ** 20:.1f} MiB), estimated {estimate / 2 ** 20:.2f} MiB "
          f"({cost.describe()}), ratio {estimate / measured:.2f}")
    assert measured > 0
    assert measured <= estimate <= FACTOR * measured, (measured, estimate)


def test_estimate_follows_the_configuration():
    """Not a constant: the parts scale as the tensors they count (crop area, width, batch, ensemble, scale)."""
    base = M.zssr_face_cost(Z.ZSSRConfig(), 128, 128)
    assert M.zssr_face_cost(Z.ZSSRConfig(), 256, 256).group > 3.5 * base.group
    # above tile_size (512) the full-image passes run in tiles: their buffers stop growing with the image
    big, tiled = (M.zssr_face_cost(Z.ZSSRConfig(tile_size=t), 512, 512) for t in (4096, 512))
    assert tiled.phases["x2 test time"] < 0.5 * big.phases["x2 test time"]
    assert M.zssr_face_cost(Z.ZSSRConfig(width=128), 128, 128).group > 1.5 * base.group
    assert M.zssr_face_cost(Z.ZSSRConfig(scale=4), 128, 128).group > 3 * base.group
    no_ens = M.zssr_face_cost(Z.ZSSRConfig(self_ensemble=False), 128, 128)
    assert "x2 median" in base.phases and "x2 median" not in no_ens.phases and no_ens.group < base.group
    t8 = M.ntire_face_cost(NT.NTIREConfig(), 512, 512).phases["train step"]
    t16 = M.ntire_face_cost(NT.NTIREConfig(batch_size=16), 512, 512).phases["train step"]
    assert 1.9 < t16 / t8 < 2.0
    assert M.zssr_face_cost(Z.ZSSRConfig(), 128, 128, dtype=torch.float64).group == 2 * base.group


def test_plan_caps_at_what_is_free_and_names_the_need():
    cost = M.FaceCost(group=100 * M.MIB, batch=10 * M.MIB, phases={"step": 90 * M.MIB, "kept": 10 * M.MIB})
    cpu = torch.device("cpu")
    free = 8 * M.GIB
    margin = M.margin_bytes(cpu, free)
    assert margin == int(512 * M.MIB + 0.10 * (free - 512 * M.MIB))
    plan = M.plan_groups(200, cost, cpu, free=free, what="ZSSR")
    expected = (free - margin - 200 * cost.batch) // cost.group
    assert plan.faces_per_group == expected and plan.groups == -(-200 // expected)
    assert sum(s.stop - s.start for s in plan.slices()) == 200
    # the group never needs more than is free
    assert plan.faces_per_group * cost.group + 200 * cost.batch + margin <= free
    assert plan.line().startswith(f"ZSSR: {expected} faces per group, {plan.groups} groups for 200 faces (free 8.0 "
                                  "GiB, 100 MiB per face")
    json.dumps(plan.as_dict())
    # at most n, an explicit number wins
    assert M.plan_groups(3, cost, cpu, free=free).faces_per_group == 3
    forced = M.plan_groups(200, cost, cpu, forced=7, free=free)
    assert forced.faces_per_group == 7 and "set by the caller" in forced.line()
    # even one face does not fit: an error that says what one face needs and what is free
    with pytest.raises(M.NotEnoughMemory) as err:
        M.plan_groups(4, cost, cpu, free=margin_free_for(cost, 4, faces=0.5), what="ZSSR", need_hint="Lower it.")
    msg = str(err.value)
    assert "one face needs about 100 MiB" in msg and "is free on cpu" in msg and "Lower it." in msg
    assert isinstance(err.value, MemoryError)
    # exactly one face fits
    assert M.plan_groups(4, cost, cpu, free=margin_free_for(cost, 4, faces=1.01)).faces_per_group == 1


def margin_free_for(cost, n, faces):
    """Free bytes with which `faces` faces of `cost` (out of a batch of n) fit after the CPU margin."""
    need = faces * cost.group + n * cost.batch
    # margin = 512 MiB + 0.1 (free - 512 MiB)  ->  free - margin = 0.9 (free - 512 MiB)
    return int(need / 0.9 + 512 * M.MIB)


def test_free_memory_of_the_cpu():
    free, where = M.free_bytes(torch.device("cpu"))
    assert where == "system memory available"
    if free is None:
        pytest.skip("this platform reports no available memory")
    assert 0 < free
    try:
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return
    assert free <= total


# ------------------------------------------------------------------------------------------------ the tuners

def _fits(tuner, images, faces):
    """Free bytes with which `faces` faces of `images` fit in one group on the CPU."""
    cost = tuner.face_cost(images.shape[-2], images.shape[-1], images.device)
    return margin_free_for(cost, images.shape[0], faces)


def test_zssr_groups_from_free_memory_same_result(monkeypatch, caplog):
    """With memory for 1.5 faces, 3 faces run as 3 groups of 1: the log line and report say so, the progress
    total counts every group, and each face's result is that of the one-group run up to rounding (at least 10x
    closer than the same face with the next seed: the scale of test_zssr's grouped-vs-alone test)."""
    x = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    cfg = Z.ZSSRConfig(crop_size=16, self_ensemble=True, back_projection_iters=2).scaled_policy(6)
    one_group, rep_one = Z.ZSSR(cfg, faces_per_group=3)(x, seed=5)
    other_seed, _ = Z.ZSSR(cfg, faces_per_group=3)(x, seed=6)
    z = Z.ZSSR(cfg)
    monkeypatch.setattr(M, "free_bytes", lambda device: (_fits(z, x, 1.5), "test"))
    assert z.total_steps(x) == 3 * z.total_steps() == 3 * 6
    calls = []
    with caplog.at_level(logging.INFO, logger="facemend"):
        grouped, rep = z(x, seed=5, hook=calls.append)
    assert sum(calls) == 18
    assert rep["groups"]["faces_per_group"] == 1 and rep["groups"]["groups"] == 3
    assert any(r.getMessage().startswith("ZSSR: 1 face per group, 3 groups for 3 faces (free ")
               for r in caplog.records)
    assert len(rep["stages"][0]["iterations"]) == 3 and rep["stages"][0]["iterations"] == rep_one["stages"][0][
        "iterations"]
    for i in range(3):
        assert float((grouped[i] - one_group[i]).abs().mean()) * 10 < float((other_seed[i] - one_group[i]).abs().mean())
    # the trained networks of all groups are kept, applied in the same groups
    net_only = z.upscale_x2(x, self_ensemble=False, back_projection_iters=0)
    assert net_only.shape == (3, 3, 48, 48)
    # not even one face fits: the tuner says what one face needs
    monkeypatch.setattr(M, "free_bytes", lambda device: (_fits(z, x, 0.5), "test"))
    with pytest.raises(M.NotEnoughMemory, match="ZSSR: one face needs about"):
        Z.ZSSR(cfg)(x, seed=5)


def test_ntire_groups_same_result_and_merged_report():
    faces = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kw = dict(steps=4, crop_size=16, batch_size=2, validation_interval=2,
              quality_losses=[(0.5, lambda im: 1 - im.mean((1, 2, 3)))])
    one, rep_one = NT.ntire_tune(faces, seed=3, faces_per_group=3, **kw)
    other, _ = NT.ntire_tune(faces, seed=4, faces_per_group=3, **kw)
    grouped, rep = NT.ntire_tune(faces, seed=3, faces_per_group=2, **kw)
    assert rep["groups"]["groups"] == 2 and "set by the caller" in rep["groups"]["line"]
    for i in range(3):
        assert float((grouped[i] - one[i]).abs().mean()) * 10 < float((other[i] - one[i]).abs().mean())
    assert rep["best_step"] == rep_one["best_step"] and len(rep["fallback"]) == 3
    assert [v["step"] for v in rep["validations"]] == [2, 4]
    assert all(len(v["score"]) == 3 and len(v["accepted"]) == 3 for v in rep["validations"])
    json.dumps(rep)


def test_ntire_metric_networks_measured_into_the_cost():
    """The NR-IQA loss, score and ID model are measured per face (on CUDA by the allocator's peak; here through
    the same probe with a counting measure) and added to the phases they run in."""
    seen = []

    def loss(im):
        seen.append(("loss", tuple(im.shape), im.requires_grad))
        return 1 - im.mean((1, 2, 3))

    def score(im):
        seen.append(("score", tuple(im.shape)))
        return im.mean((1, 2, 3))

    tuner = NT.NTIRETune(NT.NTIREConfig(crop_size=32, batch_size=4), quality_losses=[(0.1, loss)], score_fn=score)
    plain = tuner.face_cost(64, 64, torch.device("cpu"))
    assert "not included" in plain.note
    sizes = iter([7 * M.MIB, 3 * M.MIB])
    cost = tuner.face_cost(64, 64, torch.device("cpu"), measure=lambda fn, device: (fn(), next(sizes))[1])
    assert seen == [("loss", (4, 3, 32, 32), True), ("score", (1, 3, 64, 64))]
    assert cost.phases["train step"] == plain.phases["train step"] + 7 * M.MIB
    assert cost.phases["validation"] == plain.phases["validation"] + 3 * M.MIB
    assert cost.group == plain.group + 7 * M.MIB  # the training step is the largest phase here


def test_node_reports_groups_and_counts_progress(monkeypatch):
    from facemend.host import device as dev
    from facemend.ops.tune import per_image_tune

    image = torch.rand(2, 24, 24, 3, generator=torch.Generator().manual_seed(2))
    probe = Z.ZSSR(Z.ZSSRConfig(crop_size=16, self_ensemble=False).scaled_policy(3))
    monkeypatch.setattr(M, "free_bytes", lambda device: (_fits(probe, image.permute(0, 3, 1, 2), 1.2), "test"))
    totals = []
    original = dev.Progress.__init__

    def init(self, total, callback=None):
        totals.append(total)
        original(self, total, callback)

    monkeypatch.setattr(dev.Progress, "__init__", init)
    dev.set_device("cpu")
    try:
        out, report = per_image_tune(image, mode="zssr", steps=3, crop_size=16, self_ensemble=False)
    finally:
        dev.set_device(None)
    rep = json.loads(report)
    assert out.shape == (2, 48, 48, 3)
    assert rep["groups"]["faces_per_group"] == 1 and rep["groups"]["groups"] == 2 and totals == [6]
    assert rep["stages"][0]["iterations"] == [3, 3]


def test_merge_of_group_reports():
    a = {"iterations": [1, 2], "crop": 16, "lr_changes": [[], [3]], "validations": [{"step": 2, "score": [0.1, 0.2]}]}
    b = {"iterations": [3], "crop": 16, "lr_changes": [[5]], "validations": [{"step": 2, "score": [0.3]}]}
    assert E.merge_face_lists([a, b]) == {"iterations": [1, 2, 3], "crop": 16, "lr_changes": [[], [3], [5]],
                                          "validations": [{"step": 2, "score": [0.1, 0.2, 0.3]}]}


def test_free_memory_of_a_gpu_counts_the_allocators_unused_cache(monkeypatch):
    """The CUDA branch (no GPU here): cudaMemGetInfo's free plus what torch's caching allocator reserved but does
    not use; the GPU margin is 512 MiB + 5% of the rest."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda idx: (40 * M.GIB, 80 * M.GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda idx: 6 * M.GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda idx: 4 * M.GIB)
    free, where = M.free_bytes(torch.device("cuda"))
    assert free == 42 * M.GIB and where == "cuda:0 free"
    gpu = torch.device("cuda:0")
    assert M.margin_bytes(gpu, free) == int(512 * M.MIB + 0.05 * (free - 512 * M.MIB))
    cost = M.zssr_face_cost(Z.ZSSRConfig(), 256, 256)
    plan = M.plan_groups(512, cost, gpu, what="ZSSR")
    assert plan.faces_per_group == (free - M.margin_bytes(gpu, free) - 512 * cost.batch) // cost.group
    print(plan.line())


def test_a_group_out_of_memory_anyway_is_retried_smaller(monkeypatch):
    """Automatic sizing only: a group that runs out of memory (the estimate was too low for this device) runs
    again with half the faces, same results; a forced group size fails as asked."""
    x = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    cfg = Z.ZSSRConfig(crop_size=16, self_ensemble=False).scaled_policy(3)
    ref, _ = Z.ZSSR(cfg, faces_per_group=4)(x, seed=1)
    original = Z.ZSSR._tune_group
    sizes = []

    def tune_group(self, images, seed, hook):
        sizes.append(images.shape[0])
        if images.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, images, seed, hook)

    monkeypatch.setattr(Z.ZSSR, "_tune_group", tune_group)
    out, rep = Z.ZSSR(cfg)(x, seed=1)
    assert sizes == [4, 2, 1, 1, 1, 1]
    assert rep["groups"]["out_of_memory_retries"] == [
        "ZSSR: out of memory with 4 faces per group; retried with 2",
        "ZSSR: out of memory with 2 faces per group; retried with 1"]
    other_seed, _ = Z.ZSSR(cfg, faces_per_group=1)(x, seed=2)
    for i in range(4):  # as test_zssr's grouped-vs-alone: 10x closer than the same face with the next seed
        assert float((out[i] - ref[i]).abs().mean()) * 10 < float((other_seed[i] - ref[i]).abs().mean())
    with pytest.raises(torch.cuda.OutOfMemoryError):
        Z.ZSSR(cfg, faces_per_group=2)(x, seed=1)
