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
