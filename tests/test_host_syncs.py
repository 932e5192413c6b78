"""Host syncs out of hot loops (issue 20), counted on the CPU with tests/host_syncs.py: detection's face
ordering, the tuning loops' per-step work (ZSSR, NTIRE tuning); results unchanged for the same seed."""
import torch

from host_syncs import DeviceTensor, HostSyncs, on_device
from facemend.pipelines.face.detection import select_faces


def test_the_counter_sees_reads_and_uploads():
    x = on_device(torch.arange(4.0))
    with HostSyncs() as c:
        float(x[0])
        x.tolist()
        torch.ones(2).to(x.device)
        (x * 2).sum()
    assert c.counts == {"__float__": 1, "tolist": 1, "upload": 1} and isinstance(x * 2, DeviceTensor)


def test_detections_are_ordered_on_the_device_without_per_face_reads():
    g = torch.Generator().manual_seed(0)
    n = 40
    xy = torch.randint(0, 50, (n, 2), generator=g).float()
    wh = torch.randint(5, 9, (n, 2), generator=g).float()        # many equal areas: the tie-breaks matter
    dets = torch.cat([xy, xy + wh, torch.rand(n, 11, generator=g)], 1)
    dets[7, :2] = dets[3, :2]                                      # equal x and y too
    dets[7, 2:4] = dets[3, 2:4]
    area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
    want = dets[sorted(range(n), key=lambda i: (-float(area[i]), float(dets[i, 0]), float(dets[i, 1])))]
    with HostSyncs() as c:
        got = select_faces(on_device(dets), (100, 100))
    assert torch.equal(got.as_subclass(torch.Tensor), want)
    assert c.reads <= 1, c.counts          # the score/size mask's one count of kept faces, not one per face


def _tune_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.interpolate(torch.rand(2, 3, 12, 12, generator=g), size=(32, 40), mode="bilinear")


def _count(run, x):
    """run(x) -> report, with x standing for a device tensor: (its outputs, the counter)."""
    with HostSyncs() as c:
        out, report = run(on_device(x))
    return out.as_subclass(torch.Tensor), report, c


def test_zssr_steps_neither_upload_nor_read_back():
    """ZSSR's per-step work (augmentation maps, noise, indices, learning rates, Adam's bias corrections) is built
    and moved to the device once per learning-rate-policy interval, not once per step; values are read back
    only for the policy's reconstruction tests. x4 (two stages, noise on) with per-face learning-rate stops.
    The output equals the run on plain tensors (the counting changes nothing)."""
    from facemend.pipelines.tune.zssr import ZSSR, ZSSRConfig

    cfg = ZSSRConfig(crop_size=16, width=8, depth=4, self_ensemble=False, back_projection_iters=1, noise_std=0.02,
                     min_learning_rate=5e-4, max_iters=60, min_iters=10, lr_policy_check_every=10,
                     run_test_every=5, lr_slope_range=25)
    x = _tune_inputs()
    out, report, c = _count(lambda t: ZSSR(cfg, scale=4)(t, seed=6), x)
    steps = sum(max(s["iterations"]) for s in report["stages"])
    checks = sum(-(-max(s["iterations"]) // cfg.lr_policy_check_every) for s in report["stages"])
    tests = sum(-(-max(s["iterations"]) // cfg.run_test_every) for s in report["stages"])
    assert steps >= 60 and any(len(set(s["iterations"])) > 1 for s in report["stages"])   # faces stopped apart
    assert c.uploads <= 4 * checks + 2 * 8, c.counts     # per block: maps, noise, indices, rates (+ the init)
    assert c.reads <= tests + 2 * 4, c.counts            # the policy's tests (+ the reports at the end)
    assert c.uploads < steps / 2, (c.counts, steps)      # (per step, as before: 5 and more each)
    assert torch.equal(out, ZSSR(cfg, scale=4)(x, seed=6)[0])


def test_ntire_tune_steps_neither_upload_nor_read_back():
    from facemend.pipelines.tune.ntire_refine import NTIREConfig, NTIRETune

    cfg = NTIREConfig(steps=24, crop_size=16, batch_size=3, validation_interval=8, width=8, depth=4)
    x = _tune_inputs()
    out, report, c = _count(lambda t: NTIRETune(cfg)(t, seed=4), x)
    validations = len(report["validations"])
    assert validations == 3
    assert c.uploads <= 2 * validations + 8, c.counts    # one crop plan per validation interval (+ the init)
    assert c.reads <= 8 * validations + 4, c.counts      # the validations' scores and reports only
    assert c.uploads < cfg.steps / 2, (c.counts, cfg.steps)
    assert torch.equal(out, NTIRETune(cfg)(x, seed=4)[0])
