"""`restore --engine ray` (issue 22): a Ray Data pipeline on a local two-node Ray cluster (ray.cluster_utils),
against the local CLI on the shared real photos: the demo preset bit for bit (each photo's faces tuned alone, as
locally), the fast preset with a random-weight GFPGAN file (official layout) within the restorer's reordering
tolerance (faces of several photos share forwards); a worker node killed mid-run, bad inputs, resumes, a model
file missing on a worker. The cluster is tiny (head without CPUs, two workers of 3 logical CPUs) and shut down
at the end of the module."""
import json
import os
import shutil
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from facemend.cli import build_parser, main
from facemend.pipelines.io.errors import FaceMendError
from facemend.scale import ray_engine
from facemend.scale.batching import restore_images

from conftest import ROOT, need_shared, restorer_reorder_tol

SMALL = ["01.jpg", "03.jpg", "04.jpg", "05.jpg"]  # real low-quality photos, 1 to 5 faces each
TUNE = ["--tune-steps", "2"]
MB = 1024 ** 2


def _photos(folder, copies: int = 1):
    src = need_shared("faces", "whole_lq_real")
    folder.mkdir()
    for k in range(copies):
        for name in SMALL:
            shutil.copy(src / name, folder / (name if k == 0 else f"c{k}_{name}"))
    return folder


def _args(*argv):
    return build_parser().parse_args(["restore", "x", *argv])


def _pairs(folder, out):
    from facemend.cli_files import plan_outputs
    from facemend.pipelines.io.images import list_images

    return plan_outputs(list_images(str(folder)), str(out))


# ---------------------------------------------------------------------------------------- without a cluster

def test_without_ray_the_option_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (40, 30), (90, 120, 150)).save(folder / "a.png")
    code = main(["--device", "cpu", "restore", str(folder), "-o", str(tmp_path / "o"), "--engine", "ray", *TUNE])
    assert code == 2
    assert "pip install 'facemend[ray]'" in capsys.readouterr().err
    assert os.listdir(tmp_path / "o") == []


def test_actors_option():
    assert ray_engine.parse_actors("2") == 2 and ray_engine.parse_actors("1,4") == (1, 4)
    for bad in ("0", "3,1", "a", "1,2,3"):
        with pytest.raises(FaceMendError, match="--actors"):
            ray_engine.parse_actors(bad)


def test_outputs_are_linked_once_never_rewritten(tmp_path):
    """A retried batch finds its finished output and leaves it (no second write); --overwrite replaces."""
    target = str(tmp_path / "a.png")
    one, two = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    assert ray_engine.write_once(target, one, None, replace=False)
    before = open(target, "rb").read()
    assert not ray_engine.write_once(target, two, None, replace=False)
    assert open(target, "rb").read() == before and os.listdir(tmp_path) == ["a.png"]  # no temporary left
    assert ray_engine.write_once(target, two, None, replace=True)
    assert np.asarray(Image.open(target)).min() == 255


def test_writes_cut_short_by_a_dead_worker_are_cleaned_up(tmp_path):
    target = tmp_path / "a.png"
    cut = [".a.png.node-1.example.1234.ray", "..a.png.node-1.example.1234.ray.1234.part"]
    keep = [".b.png.node.1.ray", "a.png.ray", ".a.png.facemend-write-test-x", "c.png"]  # not ours / not leftovers
    for name in cut + keep:
        (tmp_path / name).write_bytes(b"x")
    assert ray_engine.remove_leftovers([str(target)]) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_faces_of_several_photos_share_forwards(tmp_path, gfpgan_models):
    """restore_images: a per-face preset batches the faces of several photos, each result within the restorer's
    reordering tolerance of the photo alone (per-photo presets: bit for bit, in the cluster test below)."""
    from facemend.cli import build_pipeline
    from facemend.host import model_paths
    from facemend.pipelines.restore.restorer import FaceRestorer

    folder = _photos(tmp_path / "in")
    images = [ray_engine_image(folder / n) for n in SMALL]
    model_paths.set_models_dirs([str(gfpgan_models)])
    try:
        fast = build_pipeline("fast", device="cpu", restorer="tiny_gfpgan.pth", face_batch=4)
        alone = build_pipeline("fast", device="cpu", restorer="tiny_gfpgan.pth", face_batch=1)
    finally:
        model_paths.set_models_dirs([])
    results = restore_images(fast, images, 4, faces_independent=True)
    assert [r[1].get("batched_with", 0) for r in results] != [0] * len(images)
    crops = torch.cat([fast.detect(im)[1] for im in images])
    net = FaceRestorer.from_file(str(gfpgan_models / "facerestore_models" / "tiny_gfpgan.pth"))
    # Reordered float sums in the restorer, at most doubled by the wavelet fix (high band of the face + low band
    # of the reference) and not amplified by the convex paste-back blend.
    tol = 2 * restorer_reorder_tol(net, crops)
    for (out, _), image in zip(results, images):
        assert (out - alone(image)[0]).abs().max() <= tol


def ray_engine_image(path):
    from facemend.pipelines.io.images import read_image

    return read_image(str(path))[0]


@pytest.fixture(scope="module")
def gfpgan_models(tmp_path_factory):
    """A random-weight GFPGAN v1.4-architecture file in the official layout ({'params_ema': ...})."""
    from facemend.pipelines.restore.archs.gfpgan import GFPGANConfig, GFPGANv1Clean

    root = tmp_path_factory.mktemp("models")
    (root / "facerestore_models").mkdir()
    torch.manual_seed(0)
    net = GFPGANv1Clean(GFPGANConfig(out_size=64, num_style_feat=64, narrow=0.125))
    with torch.no_grad():
        for p in net.parameters():  # no zero layers (the official init has some)
            p.add_(torch.randn_like(p) * 0.02)
    torch.save({"params_ema": net.state_dict()}, root / "facerestore_models" / "tiny_gfpgan.pth")
    return root


# ---------------------------------------------------------------------------------------- on a 2-node cluster

@pytest.fixture(scope="module")
def ray_workers_env(tmp_path_factory):
    """Ray's worker processes import this checkout as `facemend` (a link on PYTHONPATH), as a user's nodes import
    the installed pack; one torch thread each (2 shared cores)."""
    pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    link_dir = tmp_path_factory.mktemp("pkg")
    os.symlink(ROOT, link_dir / "facemend")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS", "RAY_AUTH_MODE")}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(link_dir)] + [p for p in [saved["PYTHONPATH"]] if p])
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    yield
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_one_command_starts_a_local_ray(ray_workers_env, tmp_path, capsys):
    """Without --ray-address: a local Ray on this machine, started and stopped by the command (README, At scale)."""
    import ray

    folder = tmp_path / "in"
    folder.mkdir()
    for name in SMALL[1:3]:
        shutil.copy(need_shared("faces", "whole_lq_real", name), folder)
    expected = _local_outputs(folder, tmp_path / "local", *TUNE)
    # one input as a path, one as a URI (read through pyarrow's filesystem, as s3:// or gs:// would be)
    inputs = [str(folder / SMALL[1]), f"file://{folder / SMALL[2]}"]
    assert main(["--device", "cpu", "restore", *inputs, "-o", str(tmp_path / "ray"), "--engine", "ray",
                 "--no-progress", "--report", str(tmp_path / "report.json"), *TUNE]) == 0
    assert not ray.is_initialized()
    assert {p: (tmp_path / "ray" / p).read_bytes() for p in os.listdir(tmp_path / "ray")} == expected
    assert sorted(r["input"] for r in json.loads((tmp_path / "report.json").read_text())) == sorted(inputs)


def test_uri_inputs_without_ray_are_refused_before_any_work(tmp_path, capsys):
    assert main(["restore", f"file://{tmp_path}", "-o", str(tmp_path / "out")]) == 2
    assert "--engine ray" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def cluster(ray_workers_env):
    """Head (the driver, no CPUs) + two worker nodes."""
    import ray
    from ray.cluster_utils import Cluster

    # A killed node is declared dead after 10 missed health checks of 1 s (default 5 of 3 s): quicker, and still
    # patient with a loaded machine's slow answers.
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 80 * MB, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 10}})
    try:
        for _ in range(2):
            c.add_node(num_cpus=3, object_store_memory=80 * MB)
        ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
        c.wait_for_nodes()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _two_workers(c):
    while len(c.worker_nodes) < 2:  # a node killed by an earlier test: a replacement joins
        c.add_node(num_cpus=3, object_store_memory=80 * MB)
    c.wait_for_nodes()


def _local_outputs(folder, out, *extra):
    assert main(["--device", "cpu", "restore", str(folder), "-o", str(out), "--no-progress", *extra]) in (0, 1)
    return {p: (out / p).read_bytes() for p in os.listdir(out)}


def test_demo_equals_local_cli_bit_for_bit_through_a_node_kill(cluster, tmp_path, capsys):
    """Two actors on two worker nodes; after the first output, the node that wrote it is killed. Every output is
    complete and written once (equal, byte for byte, to the local CLI's), the report lists every input once, a
    bad input is a failed row; then a rerun with --skip-existing does nothing, and one after two outputs were lost
    restores only those two."""
    _two_workers(cluster)
    folder = _photos(tmp_path / "in", copies=2)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    expected = _local_outputs(folder, tmp_path / "local", *TUNE)
    out = tmp_path / "ray"
    out.mkdir()
    pairs = _pairs(folder, out)
    killed = {}
    lock = threading.Lock()

    def kill_first_node(row):
        with lock:
            if killed or "node" not in row or "error" in row:
                return
            node = next(n for n in cluster.worker_nodes if n.node_id == row["node"])
            killed.update(node=row["node"], seen=len(os.listdir(out)))
            cluster.remove_node(node, allow_graceful=False)

    options = ray_engine.pipeline_options(_args("--device", "cpu", *TUNE))
    reports = ray_engine.restore_on_ray(pairs, options, actors=2, batch_faces=1, progress=False,
                                        on_row=kill_first_node)
    assert killed and killed["seen"] < len(expected), "the node was killed after the run had finished"
    assert sorted(r["input"] for r in reports) == sorted(p for p, _ in pairs)  # every input once
    failed = [r for r in reports if "error" in r]
    assert [os.path.basename(r["input"]) for r in failed] == ["bad.png"] and "cannot read image" in failed[0]["error"]
    assert sorted(os.listdir(out)) == sorted(expected)  # no temporary file left
    for name, data in expected.items():
        assert (out / name).read_bytes() == data, name
    done = [r for r in reports if "faces" in r]
    assert all(r["node"] and (r["seconds"] > 0 or "not written again" in r.get("note", "")) for r in done)
    assert {r["node"] for r in done} - {killed["node"]}, "the surviving node finished the rest"
    # Resume: nothing left to do, nothing rewritten, no cluster work.
    stamps = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)}
    report = tmp_path / "again.json"
    capsys.readouterr()
    assert main(["--device", "cpu", "restore", str(folder), "-o", str(out), "--engine", "ray", "--skip-existing",
                 "--report", str(report), "--no-progress", *TUNE]) == 1  # bad.png still fails
    again = json.loads(report.read_text())
    assert sum(1 for r in again if r.get("skipped")) == len(expected) and len(again) == len(pairs)
    assert {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)} == stamps
    # After a failure that lost two outputs: the rerun restores those two, the same bytes, and nothing else.
    lost = sorted(expected)[:2]
    for name in lost:
        os.remove(out / name)
    assert main(["--device", "cpu", "restore", str(folder), "-o", str(out), "--engine", "ray", "--skip-existing",
                 "--report", str(report), "--no-progress", *TUNE]) == 1
    assert sorted(os.path.basename(r["output"]) for r in json.loads(report.read_text()) if "faces" in r) == lost
    assert all((out / name).read_bytes() == expected[name] for name in lost)
    assert all(os.stat(out / p).st_mtime_ns == stamps[p] for p in stamps if p not in lost)


def test_fast_preset_batches_faces_of_several_photos(cluster, tmp_path, gfpgan_models, capsys):
    """The CLI with --engine ray and a random-weight GFPGAN file: faces of several photos share forwards of up to
    K; every output within one 8-bit level of the local CLI's (the restorer's float reordering, measured, is far
    below half a level) and the report says which node and how long."""
    _two_workers(cluster)
    folder = _photos(tmp_path / "in")
    models = ["--models-dir", str(gfpgan_models), "--device", "cpu"]
    fast = ["--preset", "fast", "--restorer", "tiny_gfpgan.pth"]
    expected = _local_outputs(folder, tmp_path / "local", *fast, "--models-dir", str(gfpgan_models))
    report = tmp_path / "r.json"
    code = main([*models, "restore", str(folder), "-o", str(tmp_path / "ray"), *fast, "--engine", "ray",
                 "--ray-address", "auto", "--actors", "1,2", "--batch-faces", "4", "--report", str(report),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(report.read_text())
    assert any(r.get("batched_with") for r in rows)  # photos shared a forward
    assert all(r["node"] and r["seconds"] > 0 for r in rows)
    assert "[facemend ray]" in capsys.readouterr().err  # our summary line beside Ray Data's
    for name, data in expected.items():
        ours = np.asarray(Image.open(tmp_path / "ray" / name)).astype(int)
        ref = np.asarray(Image.open(tmp_path / "local" / name)).astype(int)
        assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1, name


def test_inputs_by_uri_through_pyarrow_filesystems(cluster, tmp_path):
    """Inputs named by URI (here file://, the same code path as s3:// or gs://: pyarrow's filesystems, which Ray
    Data uses): a folder URI lists its images, the decode tasks read them, the outputs equal the local CLI's."""
    from facemend.cli_files import plan_outputs

    _two_workers(cluster)
    folder = tmp_path / "in"
    folder.mkdir()
    for name in SMALL[1:3]:
        shutil.copy(need_shared("faces", "whole_lq_real", name), folder)
    expected = _local_outputs(folder, tmp_path / "local", *TUNE)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    files, failed = ray_engine.list_inputs([f"file://{folder}", f"file://{tmp_path / 'nowhere'}"])
    assert files == [f"file://{folder / n}" for n in ["03.jpg", "04.jpg", "broken.jpg"]]
    assert failed[0]["input"] == f"file://{tmp_path / 'nowhere'}" and "no such file" in failed[0]["error"]
    options = ray_engine.pipeline_options(_args(*TUNE))
    reports = ray_engine.restore_on_ray(plan_outputs(files, str(tmp_path / "ray")), options, progress=False)
    bad = [r for r in reports if "error" in r]
    assert len(bad) == 1 and bad[0]["error"].startswith(f"cannot read image file://{folder / 'broken.jpg'}")
    assert {p: (tmp_path / "ray" / p).read_bytes() for p in os.listdir(tmp_path / "ray")} == expected


def test_model_missing_on_a_worker_fails_fast_naming_it(cluster, tmp_path, monkeypatch):
    """A restorer present where the driver checked but absent on the workers: the job stops at the first actor
    with the file named (no endless actor restarts, no outputs)."""
    _two_workers(cluster)
    folder = _photos(tmp_path / "in")
    gone = str(tmp_path / "elsewhere" / "GFPGANv1.4.pth")
    monkeypatch.setattr(ray_engine, "check_models", lambda options: options)  # the driver's check passed
    options = ray_engine.pipeline_options(_args("--preset", "fast", "--restorer", gone))
    t = time.perf_counter()
    with pytest.raises(FaceMendError, match=f"on node .*the model file {gone} is not on this node"):
        ray_engine.restore_on_ray(_pairs(folder, tmp_path / "out"), options, progress=False)
    assert time.perf_counter() - t < 120  # not a loop of actor restarts
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
