"""The headless client's own logic against an in-process server that speaks ComfyUI's protocol (tests/fake_comfy.py):
runs in CI without ComfyUI. Inputs never overwritten, output names never shared, a restart ridden out, every job
ends (malformed answers, vanished prompts, 5xx), slow requests waited for, whole websocket frames, Ctrl-C's
clean-up failures named. The same client against real servers: tests/test_client_comfyui.py."""
import json
import os
import socket
import threading
import time

import pytest

from fake_comfy import FakeComfy, ws_frame
from facemend.client import Runner
from facemend.client.progress import Progress
from facemend.client.server import Server

PORTS = (int(os.environ.get("FACEMEND_TEST_PORT_LO", "8400")), int(os.environ.get("FACEMEND_TEST_PORT_HI", "8500")))
ONE = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": "input"}},
       "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}}}
TWO = {**ONE, "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "b"}}}


@pytest.fixture
def fakes():
    started = []

    def make(**kw):
        # The fake binds with SO_REUSEADDR (as ComfyUI's aiohttp does): ports of earlier tests in TIME_WAIT are
        # fine, ports with a listener are not.
        for port in range(started[-1].port + 1 if started else PORTS[0], PORTS[1] + 1):
            try:
                started.append(FakeComfy(port, **kw))
                return started[-1]
            except OSError:
                continue
        raise RuntimeError(f"no free port in {PORTS[0]}-{PORTS[1]}")

    yield make
    for f in started:
        if f.alive:
            f.stop()


def _photos(folder, names):
    folder.mkdir(exist_ok=True)
    for n in names:
        (folder / n).write_bytes(f"photo {n}".encode())
    return folder


def _runner(urls, graph, out, **kw):
    kw.setdefault("poll_interval", 0.2)
    kw.setdefault("progress", Progress(1, live=False))
    return Runner(urls, graph, out, **kw)


def _run(runner, inputs, limit=60):
    """Run in a thread: a run that never ends fails the test instead of hanging the suite."""
    result = {}
    t = threading.Thread(target=lambda: result.update(report=runner.run(inputs)), daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"the run did not end within {limit} s: " + json.dumps([j.as_dict() for j in runner.jobs],
                                                                                   default=str)[:2000]
    return result["report"]


def _outputs(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name != "facemend_api_report.json"}


# 1: -o naming the input folder is refused before any upload, --no-skip or not; the photo is untouched.
def test_output_folder_holding_an_input_is_refused_before_any_upload(fakes, tmp_path, capsys):
    fake = fakes()
    photos = _photos(tmp_path / "photos", ["a.png"])
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(ONE))
    from facemend.cli import main

    for extra in (["--no-skip"], []):
        code = main(["api", str(graph), str(photos), "-o", str(photos), "--server", fake.url, *extra])
        assert code == 2
        err = capsys.readouterr().err
        assert "holds the input" in err and str(photos / "a.png") in err and "-o" in err
    assert (photos / "a.png").read_bytes() == b"photo a.png" and os.listdir(photos) == ["a.png"]
    assert not [r for r in fake.requests if r[1] in ("/upload/image", "/prompt")]


# 2: a two-output graph: x.png and x_2.png (and X.png beside x.png) never share an output; skip is per input.
def test_output_names_never_serve_two_inputs(fakes, tmp_path):
    fake = fakes()
    photos = _photos(tmp_path / "photos", ["x.png", "x_2.png", "X.PNG"])
    out = tmp_path / "out"
    report = _run(_runner([fake.url], TWO, out), [photos])
    assert report["counts"] == {"done": 3}
    files = _outputs(out)
    assert len(files) == 6 and len({n.lower() for n in files}) == 6  # distinct also where case is ignored
    for job in report["jobs"]:
        src = os.path.basename(job["input"]).encode()
        got = sorted(files[os.path.basename(p)] for p in job["outputs"])
        assert got == [b"node 2:photo " + src, b"node 3:photo " + src], job
    # x's results (x.png, x_2.png) alone in a folder: a run over x.png and x_2.png skips x and still runs x_2.
    out2 = tmp_path / "out2"
    assert _run(_runner([fake.url], TWO, out2), [photos / "x.png"])["counts"] == {"done": 1}
    assert sorted(_outputs(out2)) == ["x.png", "x_2.png"]
    report = _run(_runner([fake.url], TWO, out2), [photos / "x.png", photos / "x_2.png"])
    status = {os.path.basename(j["input"]): j["status"] for j in report["jobs"]}
    assert status == {"x.png": "skipped", "x_2.png": "done"}
    files = _outputs(out2)
    assert files["x.png"] == b"node 2:photo x.png" and files["x_2.png"] == b"node 3:photo x.png"
    assert files["x_2_png.png"] == b"node 2:photo x_2.png" and files["x_2_png_2.png"] == b"node 3:photo x_2.png"


# 3: one server restarted after the first result: every job done, the outage in the report.
def test_a_restarted_server_is_waited_for_and_its_jobs_rerun(fakes, tmp_path):
    fake = fakes(steps=2)
    photos = _photos(tmp_path / "photos", ["a.png", "b.png", "c.png"])
    downtime = 2.0

    def restart(pid):
        if not getattr(restart, "done", False):
            restart.done = True

            def go():
                fake.stop()
                time.sleep(downtime)
                fake.start()
            threading.Thread(target=go, daemon=True).start()

    fake.on_result = restart
    t = time.monotonic()
    report = _run(_runner([fake.url], ONE, tmp_path / "out", per_server=1, server_wait=30, max_backoff=1.0), [photos])
    assert report["counts"] == {"done": 3}, json.dumps(report, indent=1)
    assert time.monotonic() - t >= downtime
    outages = report["servers"][0]["outages"]
    assert len(outages) == 1 and outages[0]["seconds"] >= downtime / 2  # less the time it took to notice
    for job in report["jobs"]:
        assert _outputs(tmp_path / "out")[os.path.basename(job["outputs"][0])] == b"node 2:photo " + \
            os.path.basename(job["input"]).encode()
        assert len(job["failed_attempts"]) <= 1  # the restart cost a job at most one attempt


def test_a_server_that_stays_away_fails_its_jobs_after_server_wait(fakes, tmp_path):
    fake = fakes(steps=20, step_seconds=0.1)
    photos = _photos(tmp_path / "photos", ["a.png", "b.png"])
    runner = _runner([fake.url], ONE, tmp_path / "out", per_server=1, server_wait=1.5, max_backoff=0.5)
    threading.Timer(0.8, fake.stop).start()
    t = time.monotonic()
    report = _run(runner, [photos], limit=30)
    assert report["counts"] == {"failed": 2}
    assert time.monotonic() - t < 15
    for job in report["jobs"]:
        assert "--server-wait" in job["error"] and fake.url in job["error"]


def test_with_two_servers_jobs_move_at_once_and_the_server_rejoins(fakes, tmp_path):
    a, b = fakes(steps=4, step_seconds=0.15), fakes(steps=4, step_seconds=0.15)
    photos = _photos(tmp_path / "photos", [f"p{k}.png" for k in range(8)])
    before_restart = []

    def bounce(pid):
        if not getattr(bounce, "done", False):
            bounce.done = True

            def go():
                a.stop()
                time.sleep(0.5)
                before_restart.append(len(a.executed))
                a.start()
            threading.Thread(target=go, daemon=True).start()

    a.on_result = bounce
    report = _run(_runner([a.url, b.url], ONE, tmp_path / "out", per_server=1, server_wait=30, max_backoff=0.5),
                  [photos])
    assert report["counts"] == {"done": 8}, json.dumps(report, indent=1)
    assert len(report["servers"][0]["outages"]) == 1
    assert len(a.executed) > before_restart[0], "the restarted server never took a job again"
    assert len(set(_outputs(tmp_path / "out").values())) == 8


# 3/4: one 5xx on /history is not an outage; a prompt that vanishes from the queue is rerun, never waited for.
def test_one_5xx_on_history_costs_nothing(fakes, tmp_path):
    fake = fakes()
    fake.errors = {"/history": [500]}
    report = _run(_runner([fake.url], ONE, tmp_path / "out"), [_photos(tmp_path / "p", ["a.png"])])
    assert report["counts"] == {"done": 1} and report["retries"] == [] and report["servers"][0]["outages"] == []
    assert fake.errors["/history"] == []  # the fault was hit


def test_a_vanished_prompt_is_rerun(fakes, tmp_path):
    fake = fakes()
    fake.vanish = 1
    report = _run(_runner([fake.url], ONE, tmp_path / "out"), [_photos(tmp_path / "p", ["a.png"])], limit=30)
    assert report["counts"] == {"done": 1}
    assert "left" in report["jobs"][0]["failed_attempts"][0]["error"]


# 4: malformed answers end the job with the reason; the run ends.
@pytest.mark.parametrize("fault", ["garbage", "status"])
def test_malformed_answers_fail_the_job_with_the_reason(fakes, tmp_path, fault):
    fake = fakes()
    if fault == "garbage":
        fake.garbage = ("/history",)
    else:
        fake.errors = {"/history": [400] * 100}
    report = _run(_runner([fake.url], ONE, tmp_path / "out", retries=0), [_photos(tmp_path / "p", ["a.png"])],
                  limit=30)
    job = report["jobs"][0]
    assert job["status"] == "failed"
    assert ("not JSON" in job["error"]) if fault == "garbage" else ("HTTP 400" in job["error"])


def test_an_unexpected_error_fails_that_job_only(fakes, tmp_path, monkeypatch):
    fake = fakes()
    runner = _runner([fake.url], ONE, tmp_path / "out", retries=0)
    real = runner._collect

    def collect(server, job, entry):
        if job.name == "a":
            raise KeyError("filename")
        return real(server, job, entry)

    monkeypatch.setattr(runner, "_collect", collect)
    report = _run(runner, [_photos(tmp_path / "p", ["a.png", "b.png"])], limit=30)
    status = {os.path.basename(j["input"]): (j["status"], j["error"]) for j in report["jobs"]}
    assert status["b.png"][0] == "done" and status["a.png"][0] == "failed" and "KeyError" in status["a.png"][1]


# 5: a timeout on any request (upload, /prompt, /view) is waited for, not an outage; /prompt is never sent twice.
@pytest.mark.parametrize("path", ["/upload/image", "/prompt", "/view"])
def test_a_slow_answer_is_waited_for_on_every_request(fakes, tmp_path, path):
    fake = fakes()
    fake.slow = {path: [1.0]}
    server = Server(fake.url, timeout=0.4, transfer_timeout=0.4)
    report = _run(_runner([server], ONE, tmp_path / "out", busy_grace=20), [_photos(tmp_path / "p", ["a.png"])])
    assert report["counts"] == {"done": 1} and report["retries"] == [], json.dumps(report, indent=1)
    assert fake.slow[path] == [] and len(fake.executed) == 1
    assert report["servers"][0]["outages"] == []


# 6: a frame split across a timeout is read whole on the next call.
def test_websocket_frames_are_read_whole_across_timeouts():
    from facemend.client.websocket import WebSocket

    a, b = socket.socketpair()
    ws = WebSocket.__new__(WebSocket)
    ws.sock, ws._buf, ws._message, ws._kind = a, b"", b"", None
    ws.settimeout(0.2)
    msg = json.dumps({"type": "progress", "data": {"value": 3, "max": 9, "pad": "x" * 300}}).encode()
    frame = ws_frame(msg)
    frag = ws_frame(b'{"type": "exec', opcode=1, fin=False) + ws_frame(b'uting"}', opcode=0)
    try:
        for cut in (1, 3, 40):  # inside the header, inside the 16-bit length, inside the payload
            b.sendall(frame[:cut])
            with pytest.raises(socket.timeout):
                ws.recv()
            b.sendall(frame[cut:])
            assert ws.recv() == msg.decode()
        b.sendall(frag[:20])  # a fragmented message interrupted by a timeout
        with pytest.raises(socket.timeout):
            ws.recv()
        b.sendall(frag[20:])
        assert ws.recv() == '{"type": "executing"}'
    finally:
        a.close()
        b.close()


# 7: Ctrl-C's clean-up says which prompts it could not remove.
def test_prompts_that_could_not_be_removed_are_named(fakes, tmp_path):
    fake = fakes(steps=100, step_seconds=0.05)
    runner = _runner([fake.url], ONE, tmp_path / "out", per_server=2)
    result = {}
    t = threading.Thread(target=lambda: result.update(report=runner.run([_photos(tmp_path / "p", ["a.png", "b.png"])])),
                         daemon=True)
    t.start()
    deadline = time.time() + 20
    while time.time() < deadline and not (fake.running and fake.pending):
        time.sleep(0.05)
    fake.errors = {"POST /queue": [500], "POST /interrupt": [500] * 5}
    runner.cancel()
    t.join(30)
    report = result["report"]
    assert report["cancelled"] and len(report["cancel_failures"]) == 1
    line = report["cancel_failures"][0]
    assert fake.url in line and all(j.prompt_id in line for j in runner.jobs) and "HTTP 500" in line


# 11 (client side): a second run into a folder another run holds is refused, naming the holder.
def test_a_second_run_into_a_claimed_folder_is_refused(fakes, tmp_path):
    from facemend.output_plan import OutputError, claim_output_dir

    fake = fakes()
    out = tmp_path / "out"
    with claim_output_dir(str(out), "first run"):
        with pytest.raises(OutputError, match=f"pid {os.getpid()}|process {os.getpid()}"):
            _runner([fake.url], ONE, out).run([_photos(tmp_path / "p", ["a.png"])])
    assert not [r for r in fake.requests if r[1] == "/upload/image"]
    assert _run(_runner([fake.url], ONE, out), [tmp_path / "p"])["counts"] == {"done": 1}
    assert not (out / ".facemend.lock").exists()


# ComfyUI's execution API (what V3 nodes report through) sends 'progress_state', not 'progress'.
WORK = {**ONE, "3": {"class_type": "FaceMend_RestoreFaces", "inputs": {"face_crops": ["1", 0]}}}


class _Recorder(Progress):
    def __init__(self):
        super().__init__(1, live=False)
        self.steps: list = []

    def update(self, name, fraction, node="", step=""):
        self.steps.append((fraction, node, step))
        super().update(name, fraction, node, step)


@pytest.mark.parametrize("legacy", [False, True], ids=["progress_state", "progress_state+progress"])
def test_node_steps_reach_the_progress_line_from_progress_state(fakes, tmp_path, legacy):
    fake = fakes(steps=4, step_seconds=0.05)
    fake.wait_for_ws, fake.legacy_progress = 10.0, legacy
    progress = _Recorder()
    report = _run(_runner([fake.url], WORK, tmp_path / "out", progress=progress), [_photos(tmp_path / "in", ["a.png"])])
    assert report["counts"] == {"done": 1}
    steps = [(f, s) for f, node, s in progress.steps if node == "FaceMend_RestoreFaces" and s]
    shown = [s for i, (_, s) in enumerate(steps) if s != "0/1" and (i == 0 or steps[i - 1][1] != s)]
    assert shown == ["1/4", "2/4", "3/4", "4/4"], progress.steps  # each step once, in order (both events agree)
    fractions = [f for f, _, s in progress.steps if s]
    assert fractions == sorted(fractions) and 0 < fractions[-1] <= 1  # it moves forward, never past the end
    if not legacy:  # without 'progress' events the steps can only have come from progress_state
        assert all(f < 1 for f, _ in steps[:-1])


def test_node_previews_are_never_downloaded_or_counted_as_outputs(fakes, tmp_path):
    """Nodes show previews (temp images in /history outputs): only SaveImage's outputs and a core PreviewImage node
    the graph itself asks for arrive; the FaceMend node's preview is neither fetched nor written."""
    fake = fakes()
    graph = {**WORK, "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    out = tmp_path / "out"
    report = _run(_runner([fake.url], graph, out), [_photos(tmp_path / "in", ["a.png"])])
    assert report["counts"] == {"done": 1}
    entry = next(iter(fake.history.values()))
    assert entry["outputs"]["3"]["images"][0]["type"] == "temp"  # the node's preview is there to be skipped
    assert _outputs(out) == {"a.png": b"node 2:photo a.png", "a_2.png": b"preview 4:photo a.png"}
    assert [kind for kind, _ in fake.viewed] == ["output", "temp"]  # the graph's PreviewImage only
    assert report["jobs"][0]["outputs"] == [str(out / "a.png"), str(out / "a_2.png")]
    # Without the PreviewImage node: the SaveImage output alone.
    fake.viewed.clear()
    report = _run(_runner([fake.url], WORK, tmp_path / "out2"), [_photos(tmp_path / "in", ["a.png"])])
    assert _outputs(tmp_path / "out2") == {"a.png": b"node 2:photo a.png"}
    assert [kind for kind, _ in fake.viewed] == ["output"]
