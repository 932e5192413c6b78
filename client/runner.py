"""A headless run: a folder or list of images through one API graph on one or several ComfyUI servers.

One shared queue of jobs (one per input image); each server takes up to `per_server` jobs at a time (one
running, the next already uploaded and queued, so the server never waits for us). Every output name is planned
before the first upload (no name serves two inputs; an output folder holding an input is refused) and the output
folder is claimed for the run (a second run into it is refused).

A graph that fails on a server is retried on a server that has not tried it, at most `retries` times. A server
that goes away (connection refused or broken, its prompt lost from its queue) costs the job it ran one attempt:
the job goes back to the queue at once (to another server, or to the same one when it returns) and the server
is probed with backoff; it rejoins when it answers, and after `server_wait` seconds down it is given up and its
jobs fail with the reason. A server that is only slow (requests time out) is waited for `busy_grace` seconds.
Every job ends: done, failed with a reason, skipped or cancelled. Outputs land in the output folder, each
written to a temporary name and renamed; the first image output is written last, so its presence means the job
is complete and a second run skips it. Ctrl-C (or cancel()) removes what this run queued from every server and
interrupts what is running for it, and nothing else; what could not be removed is named.
"""
from __future__ import annotations

import json
import os
import queue
import re
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..output_plan import claim_output_dir, plan_stems, refuse_outputs_on_inputs
from .progress import Progress
from .server import BadAnswer, PromptRejected, Server, ServerBusy, ServerUnavailable
from .websocket import WebSocket, WebSocketClosed
from .workflow import image_input_node, local_files, with_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
REPORT_NAME = "facemend_api_report.json"


class JobFailed(RuntimeError):
    """The graph failed on this server (ComfyUI's error text); another server may still run it."""


class PromptLost(RuntimeError):
    """The prompt left the server's queue without a result (the server restarted, or someone removed it)."""


@dataclass
class Job:
    path: Path
    name: str  # output stem, planned before the run: unique among the run's inputs
    status: str = "pending"  # pending, running, done, failed, skipped, cancelled
    attempts: list = field(default_factory=list)  # [{"server", "error"}] of the failed attempts
    tried: set = field(default_factory=set)  # servers where the graph itself failed: not retried there
    server: str | None = None
    prompt_id: str | None = None
    outputs: list = field(default_factory=list)
    error: str | None = None
    seconds: float | None = None

    def as_dict(self) -> dict:
        return {"input": str(self.path), "status": self.status, "server": self.server, "outputs": self.outputs,
                "seconds": self.seconds, "error": self.error, "failed_attempts": self.attempts,
                "retried": bool(self.attempts) and self.status == "done"}


def list_inputs(items) -> list[Path]:
    files = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS
                            and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    return files


def _has_image_outputs(graph: dict) -> bool:
    return _image_output_nodes(graph) > 0


def _image_output_nodes(graph: dict) -> int:
    return sum(n["class_type"].endswith(("SaveImage", "PreviewImage")) for n in graph.values())


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def execution_error_text(entry: dict) -> str:
    """ComfyUI's own error text from a history entry's status messages."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return (f"{data.get('node_type', '?')} (node {data.get('node_id', '?')}): "
                    f"{data.get('exception_type', 'error')}: {data.get('exception_message', '').strip()}")
        if kind == "execution_interrupted":
            return f"interrupted on the server (node {data.get('node_id', '?')} {data.get('node_type', '')})".strip()
    return "ComfyUI reported status " + str(entry.get("status", {}).get("status_str"))


class _ServerState:
    """A server, its websocket listener (events routed to the jobs by prompt id), its in-flight prompts, and
    whether it is up, down since some time (probed with backoff until it answers again) or given up (dead)."""

    def __init__(self, server: Server, stop: threading.Event):
        self.server = server
        self.dead: str | None = None  # given up: the reason
        self.down_since: float | None = None
        self.down_reason: str | None = None
        self.next_probe = 0.0
        self.backoff = 1.0
        self.outages: list = []  # [{"reason", "seconds"}] of the outages it came back from
        self.waiters: dict = {}
        self.inflight: set = set()
        self.uploaded: dict = {}
        self.lock = threading.Lock()
        self.stop = stop
        self.ws_ok = False
        self.thread = threading.Thread(target=self._listen, daemon=True, name=f"ws {server.url}")
        self.thread.start()

    @property
    def up(self) -> bool:
        return not self.dead and self.down_since is None

    def _listen(self):
        while not self.stop.is_set() and not self.dead:
            try:
                ws = WebSocket(self.server.ws_url(), self.server.headers, timeout=10)
            except (OSError, ConnectionError):
                self.ws_ok = False
                self._broadcast(("ws_lost", None))
                self.stop.wait(2.0)
                continue
            self.ws_ok = True
            ws.settimeout(1.0)
            try:
                while not self.stop.is_set() and not self.dead:
                    try:
                        msg = ws.recv()
                    except socket.timeout:
                        continue
                    if isinstance(msg, str):
                        self._dispatch(json.loads(msg))
            except (OSError, WebSocketClosed, ValueError, AttributeError):
                pass
            finally:
                ws.close()
            self.ws_ok = False
            self._broadcast(("ws_lost", None))
            self.stop.wait(1.0)

    def _dispatch(self, msg: dict):
        data = msg.get("data") or {}
        pid = data.get("prompt_id") if isinstance(data, dict) else None
        if pid is None:
            return
        with self.lock:
            q = self.waiters.get(pid)
        if q is not None:
            q.put((msg.get("type"), data))

    def _broadcast(self, event):
        with self.lock:
            for q in self.waiters.values():
                q.put(event)


class Runner:
    def __init__(self, servers, graph: dict, out_dir, per_server: int = 2, retries: int = 2,
                 image_node: str | None = None, skip_existing: bool = True, timeout: float = 0,
                 progress: Progress | None = None, log=None, poll_interval: float = 2.0, busy_grace: float = 600.0,
                 server_wait: float = 300.0, max_backoff: float = 15.0):
        self.servers = [s if isinstance(s, Server) else Server(s) for s in servers]
        if not self.servers:
            raise ValueError("give at least one ComfyUI server URL")
        self.graph = graph
        self.image_node = image_input_node(graph, image_node)
        self.local_files = local_files(graph)  # "@path" inputs: uploaded once per server
        self.images_out = _has_image_outputs(graph)
        self.extra_images = _image_output_nodes(graph) > 1
        self.out_dir = Path(out_dir)
        self.per_server = max(1, int(per_server))
        self.retries = max(0, int(retries))
        self.skip_existing = skip_existing
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.busy_grace = busy_grace  # seconds a server may leave every request unanswered before it counts as gone
        for s in self.servers:
            s.busy_grace = busy_grace
        self.server_wait = server_wait  # seconds a server that went away is waited for before its jobs fail
        self.max_backoff = max_backoff
        self.progress = progress
        self.run_id = uuid.uuid4().hex[:8]
        self.cancelled = threading.Event()
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._queue: queue.Queue = queue.Queue()
        self._states: list[_ServerState] = []
        self.jobs: list[Job] = []
        self.retry_log: list[str] = []
        self.cancel_failures: list[str] = []  # after Ctrl-C: prompts that could not be removed, and why

    # --- public -------------------------------------------------------------------------------------------
    def plan(self, inputs) -> list[Job]:
        """The jobs of `inputs`, their output names planned (before any upload): unique without regard to case,
        none another's `<name>_<n>` extra output; an output folder that holds an input is refused."""
        files = list_inputs(inputs)
        refuse_outputs_on_inputs([str(f) for f in files], str(self.out_dir), whole_folder=True)
        stems = plan_stems([str(f) for f in files], extra_outputs=self.extra_images)
        return [Job(f, stem) for f, stem in zip(files, stems)]

    def run(self, inputs) -> dict:
        self.jobs = self.plan(inputs)
        claim = claim_output_dir(str(self.out_dir), "python -m facemend api")
        try:
            return self._run()
        finally:
            claim.release()

    def _run(self) -> dict:
        self.progress = self.progress or Progress(len(self.jobs))
        todo = []
        for job in self.jobs:
            if self.skip_existing and self._complete(job):
                job.status = "skipped"
                job.outputs = [str(p) for p in self._existing(job)]
                self.progress.finished(job.name, "skipped", "outputs exist")
            else:
                todo.append(job)
                self._queue.put(job)
        self._pending = len(todo)
        t0 = time.monotonic()
        workers = []
        if todo:
            self._states = [_ServerState(s, self._stop) for s in self.servers]
            for st in self._states:
                for k in range(self.per_server):
                    w = threading.Thread(target=self._worker, args=(st,), daemon=True, name=f"{st.server.url}#{k}")
                    w.start()
                    workers.append(w)
        try:
            with self._cond:
                while self._pending > 0 and not self.cancelled.is_set():
                    if all(st.dead for st in self._states) or not any(w.is_alive() for w in workers):
                        break
                    self._cond.wait(0.5)
        except KeyboardInterrupt:
            self.cancel()
            raise
        finally:
            if self.cancelled.is_set():
                self._cancel_remote()
            self._stop.set()
            for w in workers:
                w.join(timeout=10)
            for job in self.jobs:
                if job.status in ("pending", "running"):
                    if self.cancelled.is_set():
                        job.status, job.error = "cancelled", "cancelled by the user"
                    else:
                        job.status = "failed"
                        job.error = "no server left to run it: " + "; ".join(
                            f"{st.server.url}: {st.dead}" for st in self._states if st.dead) + (
                            f" (last attempt: {job.error})" if job.error else "")
                        self.progress.finished(job.name, "failed", job.error)
            self.report = self._report(time.monotonic() - t0)
            _write_atomic(self.out_dir / REPORT_NAME, (json.dumps(self.report, indent=1) + "\n").encode())
            self.progress.close()
        return self.report

    def cancel(self):
        """Stop taking jobs; remove this run's queued prompts and interrupt its running ones."""
        self.cancelled.set()
        with self._cond:
            self._cond.notify_all()

    # --- internals ------------------------------------------------------------------------------------------
    def _existing(self, job: Job) -> list[Path]:
        """This job's outputs: <name>.<ext>, <name>_<n>.<ext>, <name>.json (never another input's)."""
        mine = re.compile(re.escape(job.name) + r"(_\d+)?\.[^.]+", re.IGNORECASE)
        return sorted(p for p in self.out_dir.iterdir() if mine.fullmatch(p.name) and p.name != REPORT_NAME)

    def _complete(self, job: Job) -> bool:
        if any((self.out_dir / (job.name + e)).exists() for e in IMAGE_EXTS):
            return True
        return not self.images_out and (self.out_dir / f"{job.name}.json").exists()

    def _cancel_remote(self):
        for st in self._states:
            with st.lock:
                ids = sorted(st.inflight)
            if not ids:
                continue
            try:
                st.server.cancel(ids)
            except (ServerUnavailable, BadAnswer, OSError) as exc:
                self.cancel_failures.append(f"{st.server.url}: could not remove prompt(s) {', '.join(ids)} ({exc}); "
                                            "remove them in ComfyUI's queue if they are still there")

    def _finish(self, job: Job, status: str, message: str = ""):
        job.status = status
        self.progress.finished(job.name, status, message)
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()

    def _can_run(self, job: Job, st: _ServerState | None = None) -> list:
        """Servers not given up where the graph has not failed for this job (st: only that one)."""
        return [s for s in ([st] if st else self._states) if not s.dead and s.server.url not in job.tried]

    def _down(self, st: _ServerState, reason: str):
        with st.lock:
            if st.down_since is not None or st.dead:
                return
            st.down_since, st.down_reason = time.monotonic(), reason
            st.next_probe, st.backoff = time.monotonic() + 1.0, 1.0
        others = any(s.up for s in self._states if s is not st)
        self.progress.note(f"server {st.server.url} is unavailable ({reason}); "
                           + ("its jobs go to the other servers; " if others else "")
                           + f"waiting up to {self.server_wait:.0f} s for it to come back")

    def _probe(self, st: _ServerState):
        """A down server: ask it again when its backoff has passed; up again, or given up after server_wait."""
        now = time.monotonic()
        with st.lock:
            if st.down_since is None or st.dead or now < st.next_probe:
                return
            st.next_probe = now + 3600  # this worker probes; the others wait for its answer
        alive = st.server.alive(answer_needed=True)  # a server given up as too slow must answer to rejoin
        now = time.monotonic()
        with st.lock:
            if alive:
                st.outages.append({"reason": st.down_reason, "seconds": round(now - st.down_since, 1)})
                st.down_since = None
                st.uploaded.clear()  # a restarted server may have lost what we uploaded
            elif now - st.down_since >= self.server_wait:
                st.dead = f"{st.down_reason}; no answer for {now - st.down_since:.0f} s (--server-wait)"
            else:
                st.backoff = min(st.backoff * 2, self.max_backoff)
                st.next_probe = now + st.backoff
        if alive:
            self.progress.note(f"server {st.server.url} answers again after {st.outages[-1]['seconds']:.0f} s; "
                               "it takes jobs again")
        elif st.dead:
            self.progress.note(f"server {st.server.url} given up: {st.dead}")
            with self._cond:
                self._cond.notify_all()

    def _worker(self, st: _ServerState):
        while not self._stop.is_set() and not self.cancelled.is_set() and not st.dead:
            if st.down_since is not None:
                self._probe(st)
                time.sleep(0.1)
                continue
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if not st.up or not self._can_run(job, st):
                if self._can_run(job):  # another server (or this one when it is back) may still run it
                    self._queue.put(job)
                    time.sleep(0.1)
                    continue
                self._finish(job, "failed", job.error or "no server left to run it")
                continue
            try:
                self._attempt(st, job)
            except Exception as exc:  # never lose a job, never lose a worker
                job.error = f"internal error: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
                self._finish(job, "failed", job.error)

    def _attempt(self, st: _ServerState, job: Job):
        url = st.server.url
        job.status, job.server = "running", url
        self.progress.started(job.name, url, len(job.attempts) + 1)
        t = time.monotonic()
        graph_failed = True  # the graph itself failed (not the server): not retried on this server
        try:
            self._execute(st, job)
            job.seconds = round(time.monotonic() - t, 3)
            self._finish(job, "done", f"{len(job.outputs)} file(s) in {job.seconds:.1f} s")
            return
        except ServerUnavailable as exc:
            graph_failed = False
            if self.cancelled.is_set():
                return
            error = f"server unavailable: {exc}"
            self._down(st, str(exc))
            if isinstance(exc, ServerBusy) and job.prompt_id:  # only slow: do not let it run a job that moves
                try:
                    st.server.cancel([job.prompt_id])
                except (ServerUnavailable, BadAnswer):
                    pass
        except PromptLost as exc:
            graph_failed = False
            error = str(exc)
        except (PromptRejected, JobFailed, BadAnswer) as exc:
            error = str(exc)
        except OSError as exc:  # reading the input or writing an output
            job.error = str(exc)
            self._finish(job, "failed", job.error)
            return
        except Exception as exc:  # anything unexpected ends this attempt with its reason, never the worker
            error = f"{type(exc).__name__}: {exc}"
        if self.cancelled.is_set():
            return
        if graph_failed:
            job.tried.add(url)
        job.attempts.append({"server": url, "error": error})
        job.error = error
        job.status = "pending"
        job.server = None
        self.progress.running.pop(job.name, None)
        if len(job.attempts) <= self.retries and self._can_run(job):
            where = "another server" if graph_failed else "the next server that answers"
            line = f"{job.name}: failed on {url} ({error.splitlines()[0]}); retrying on {where}"
            self.retry_log.append(line)
            self.progress.note(line)
            self._queue.put(job)
        else:
            self._finish(job, "failed", error)

    def _execute(self, st: _ServerState, job: Job):
        server = st.server
        job.prompt_id = None
        data = job.path.read_bytes()
        upload = server.upload_image(data, f"facemend_{self.run_id}_{job.name}{job.path.suffix.lower()}")
        graph = with_image(self.graph, self.image_node, upload)
        for (nid, name), path in self.local_files.items():
            key = ("file", str(path))
            if key not in st.uploaded:
                st.uploaded[key] = server.upload_image(path.read_bytes(),
                                                       f"facemend_{self.run_id}_ref_{path.name}")
            graph[nid]["inputs"][name] = st.uploaded[key]
        pid = str(uuid.uuid4())
        events: queue.Queue = queue.Queue()
        with st.lock:
            st.waiters[pid] = events
            st.inflight.add(pid)
        job.prompt_id = pid
        try:
            server.queue_prompt(graph, prompt_id=pid)
            entry = self._wait(st, job, pid, events, len(graph))
        finally:
            with st.lock:
                st.waiters.pop(pid, None)
                st.inflight.discard(pid)
        self._collect(server, job, entry)

    def _poll(self, st: _ServerState, pid: str) -> dict | None:
        """The prompt's finished history entry, or None while it is queued or running. A prompt that is in
        neither place has been lost (PromptLost). A failed request is tried again while the server answers
        /system_stats (one 5xx or a broken answer is not an outage); ServerUnavailable when it does not."""
        for tries in range(4):
            try:
                entry = st.server.history(pid)
                if entry and entry.get("status", {}).get("completed") is not None:
                    return entry
                if pid in st.server.queued():
                    return None
                entry = st.server.history(pid)  # finished between the two questions
                if entry and entry.get("status", {}).get("completed") is not None:
                    return entry
                raise PromptLost(f"the prompt left {st.server.url}'s queue without a result (the server restarted "
                                 "or it was removed from its queue)")
            except ServerBusy:
                raise
            except (ServerUnavailable, BadAnswer) as exc:
                if not st.server.alive():
                    raise ServerUnavailable(str(exc)) from None
                if tries == 3:
                    raise
                time.sleep(0.5 * (tries + 1))

    def _wait(self, st, job, pid, events, n_nodes) -> dict:
        started = time.monotonic()
        last_poll = 0.0
        seen_nodes: set = set()
        while True:
            if self.cancelled.is_set():
                try:  # queued just as the run was cancelled: take it back
                    st.server.cancel([pid])
                except (ServerUnavailable, BadAnswer):
                    pass
                raise JobFailed("cancelled")
            if self.timeout and time.monotonic() - started > self.timeout:
                st.server.cancel([pid])
                raise JobFailed(f"no result after {self.timeout:.0f} s (--timeout); cancelled on the server")
            try:
                kind, data = events.get(timeout=0.5)
            except queue.Empty:
                kind, data = None, None
            if kind == "ws_lost" and not st.server.alive():
                raise ServerUnavailable("the server went away while running this job")
            if kind in ("executing", "execution_cached") and isinstance(data, dict):
                nodes = data.get("nodes") or ([data["node"]] if data.get("node") else [])
                seen_nodes.update(nodes)
                node = data.get("node")
                label = self.graph.get(node, {}).get("class_type", "") if node else ""
                self.progress.update(job.name, min(len(seen_nodes) - (1 if node else 0), n_nodes) / n_nodes, label)
            elif kind == "progress" and isinstance(data, dict) and "value" in data and "max" in data:
                # The legacy event: ComfyUI still sends it for nodes on comfy.utils.ProgressBar.
                self._step(job, seen_nodes, n_nodes, data.get("node"), data["value"], data["max"])
            elif kind == "progress_state" and isinstance(data, dict) and isinstance(data.get("nodes"), dict):
                # The execution API's (what V3 nodes report through, ComfyUI >= 0.3.4x): every started node's
                # state at once; the running one carries the step.
                running = [s for s in data["nodes"].values() if isinstance(s, dict) and s.get("state") == "running"]
                if running:
                    s = running[-1]
                    node = s.get("display_node_id") or s.get("node_id")
                    self._step(job, seen_nodes, n_nodes, node, s.get("value", 0), s.get("max", 1))
            finished = kind in ("execution_success", "execution_error", "execution_interrupted")
            now = time.monotonic()
            if finished or now - last_poll >= (self.poll_interval if st.ws_ok else 1.0):
                last_poll = now
                entry = self._poll(st, pid)
                if entry is not None:
                    if entry["status"].get("status_str") != "success" or not entry["status"]["completed"]:
                        raise JobFailed(execution_error_text(entry))
                    return entry
                if finished:  # the history entry is written just after the message: poll again shortly
                    last_poll = now - (self.poll_interval - 0.2)

    def _step(self, job: Job, seen_nodes: set, n_nodes: int, node, value, total):
        done = max(len(seen_nodes) - 1, 0) + float(value) / max(float(total), 1.0)
        label = self.graph.get(node, {}).get("class_type", "") if node else ""
        self.progress.update(job.name, min(done / n_nodes, 1.0), label, f"{value:g}/{total:g}")

    def _collect(self, server: Server, job: Job, entry: dict):
        images, other = [], {}
        for nid in sorted(entry.get("outputs", {}), key=lambda k: (len(k), k)):
            # The graph's own preview node (core PreviewImage) is an output the user asked for; every other temp
            # image is a node's preview in the UI (V3 ui.PreviewImage: restored faces, before/after), not a result.
            explicit_preview = self.graph.get(nid, {}).get("class_type", "").endswith("PreviewImage")
            for key, value in entry["outputs"][nid].items():
                if key == "images":
                    images += [ref for ref in value
                               if ref.get("type", "output") == "output" or explicit_preview]
                elif key != "animated":
                    other.setdefault(nid, {})[key] = value
        blobs = [(ref, server.view(ref)) for ref in images]  # fetch everything before writing anything
        written = []
        names = []
        for i, (ref, _) in enumerate(blobs):
            ext = os.path.splitext(ref["filename"])[1] or ".png"
            names.append(self.out_dir / (f"{job.name}{ext}" if i == 0 else f"{job.name}_{i + 1}{ext}"))
        for path, (_, blob) in list(zip(names, blobs))[1:]:
            _write_atomic(path, blob)
            written.append(str(path))
        if other:
            path = self.out_dir / f"{job.name}.json"
            _write_atomic(path, (json.dumps(other, indent=1) + "\n").encode())
            written.append(str(path))
        if blobs:  # the first image last: its presence marks the job complete
            _write_atomic(names[0], blobs[0][1])
            written.insert(0, str(names[0]))
        job.outputs = written

    def _report(self, seconds: float) -> dict:
        counts: dict = {}
        for job in self.jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        return {"servers": [{"url": st.server.url, "outages": st.outages, "unavailable": st.dead or (
                    f"{st.down_reason} (still down at the end of the run)" if st.down_since is not None else None)}
                            for st in self._states]
                or [{"url": s.url, "unavailable": None, "outages": []} for s in self.servers],
                "seconds": round(seconds, 2), "counts": counts, "retries": self.retry_log,
                "cancelled": self.cancelled.is_set(), "cancel_failures": self.cancel_failures,
                "jobs": [j.as_dict() for j in self.jobs]}
