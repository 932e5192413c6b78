"""`restore --engine ray`: the CLI's restore as a streaming Ray Data pipeline.

inputs (rows: input, output) -> decode in parallel CPU tasks -> an actor pool stage holding the loaded pipeline
(models loaded once per actor, on its GPU; faces of several photos batched up to K per forward) which writes each
output atomically -> report rows streamed back to the driver. Ray does the scheduling, the backpressure (memory is
bounded by the blocks in flight, not by the number of inputs), the task retries and the actor restarts.

Outputs are written once: a file is written under a hidden temporary name and linked to its name only if no file
is there (a batch retried after a node died finds its finished outputs and does not redo them); --overwrite
replaces (the outputs that existed before the run) with a rename.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import warnings

import numpy as np

from ..pipelines.io.errors import FaceMendError

RAY_HINT = "pip install 'facemend[ray]' (ray[data]>=2.60) on this machine and on every node of the cluster"
ROWS_PER_BLOCK = 4        # inputs per read block (a decode task's work; the backpressure unit), at least
MAX_BLOCKS = 10000        # and at most this many blocks (millions of inputs: fewer, larger blocks)
RETRIES = 3               # Ray's retries of a failed decode task and restarts of a dead actor (bounded)


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise FaceMendError(f"--engine ray needs Ray Data: {RAY_HINT}") from exc
    return ray


def parse_actors(text) -> int | tuple[int, int]:
    """'N' -> N actors; 'MIN,MAX' -> an autoscaling pool."""
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] >= 1:
        return parts[0]
    if len(parts) == 2 and 1 <= parts[0] <= parts[1]:
        return parts[0], parts[1]
    raise FaceMendError(f"--actors takes N or MIN,MAX (1 <= MIN <= MAX), got {text!r}")


def pipeline_options(args) -> dict:
    """build_pipeline's keyword arguments from the restore command's options (those of the local CLI)."""
    return dict(preset=args.preset, detector=args.detector, restorer=args.restorer, precision=args.precision,
                selection=args.selection, face_index=args.face_index, score_threshold=args.score_threshold,
                min_face_size=args.min_face_size, max_faces=args.max_faces, tune_steps=args.tune_steps,
                max_output_pixels=int(args.max_output_megapixels * 1024 ** 2), onestep_base=args.onestep_base,
                onestep_lora=args.onestep_lora, reference=args.reference, id_scale=args.id_scale, steps=args.steps,
                cfg=args.cfg)


def check_models(options: dict) -> dict:
    """Refuse before any work a model file that is missing or unreadable here; the explicit paths of the
    resolved files go to the actors (each node must have them at the same path: a shared folder or a copy).
    The demo and fast presets are built once on this machine's CPU (cheap) so a damaged file is refused too."""
    from .. import cli
    from ..pipelines.presets import PRESETS

    options = dict(options)
    preset = options["preset"]
    if preset not in PRESETS:
        raise FaceMendError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if preset in ("fast", "ntire", "ntire_full"):
        name = options.get("restorer") or PRESETS[preset].needs[0][1]
        options["restorer"] = cli.model_file("facerestore_models", name)
    if options.get("detector") and not options["detector"].startswith("mtcnn"):  # a RetinaFace file
        options["detector"] = cli.model_file("facedetection", options["detector"])
    for key in ("onestep_base", "onestep_lora"):  # explicit paths: absolute, for workers with another cwd
        if options.get(key) and os.path.exists(options[key]):
            options[key] = os.path.abspath(options[key])
    if options.get("reference"):
        options["reference"] = [os.path.abspath(p) for p in options["reference"]]
    if preset in ("demo", "fast"):
        cli.build_pipeline(**{**options, "device": "cpu", "tune_steps": 1})
    return options


def _exact_pixels(rgba: np.ndarray) -> tuple[bytes, str]:
    """float32 pixels -> bytes for the object store: uint8 when they are k/255 exactly (8-bit sources: 4x less to
    move, decoded back to the identical floats), else float32."""
    q = np.round(rgba * 255.0)
    if np.array_equal(q.astype(np.float32) / np.float32(255.0), rgba):
        return q.astype(np.uint8).tobytes(), "uint8"
    return rgba.astype(np.float32).tobytes(), "float32"


def is_uri(path: str) -> bool:
    return "://" in str(path)


def list_inputs(items: list[str]) -> tuple[list[str], list[dict]]:
    """The CLI's collect_inputs, plus object-store and other URIs (s3://bucket/photos/, gs://..., file:///...)
    through the pyarrow filesystems Ray Data uses: a URI of a folder gives its image files, sorted by name."""
    from ..cli_files import collect_inputs
    from ..pipelines.io.images import IMAGE_EXTENSIONS

    files, failed = collect_inputs([i for i in items if not is_uri(i)])
    for uri in (i for i in items if is_uri(i)):
        try:
            fs, path, scheme = _filesystem(uri)
            info = fs.get_file_info(path)
            if info.type.name == "Directory":
                from pyarrow.fs import FileSelector

                found = sorted(i.path for i in fs.get_file_info(FileSelector(path)) if i.type.name == "File"
                               and i.path.lower().endswith(IMAGE_EXTENSIONS))
                files += [f"{scheme}://{p}" for p in found]
            elif info.type.name == "File":
                files.append(uri)
            else:
                failed.append({"input": uri, "error": f"no such file or folder: {uri}"})
        except Exception as exc:  # noqa: BLE001 - an unknown scheme, missing credentials...: that input's report
            failed.append({"input": uri, "error": f"cannot list {uri}: {exc}"})
    return files, failed


def _filesystem(uri: str):
    from pyarrow.fs import FileSystem

    fs, path = FileSystem.from_uri(uri)
    return fs, path, uri.split("://", 1)[0]


def _read_uri(uri: str):
    """A URI's image through a temporary local copy, so it decodes exactly as a local file does."""
    import tempfile

    from ..pipelines.io.errors import InvalidImage
    from ..pipelines.io.images import read_image

    fs, path, _ = _filesystem(uri)
    with fs.open_input_stream(path) as f:
        data = f.read()
    with tempfile.NamedTemporaryFile(suffix=os.path.splitext(path)[1]) as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return read_image(tmp.name)
        except InvalidImage as exc:
            raise InvalidImage(str(exc).replace(tmp.name, uri)) from exc


def decode_row(row: dict) -> dict:
    """A read task: the input file -> pixel bytes (RGB or RGBA, HWC). A file that cannot be read is a failed row."""
    import torch

    from ..pipelines.io.images import read_image

    row = dict(row, pixels=b"", dtype="", shape=[0, 0, 0], error="")
    try:
        rgb, alpha = _read_uri(row["input"]) if is_uri(row["input"]) else read_image(row["input"])
    except Exception as exc:  # noqa: BLE001 - every reason is the row's report, never the job's failure
        from .batching import error_message

        row["error"] = error_message(exc)
        return row
    t = rgb[0] if alpha is None else torch.cat([rgb[0], alpha[0]])
    arr = t.permute(1, 2, 0).contiguous().numpy()
    row["pixels"], row["dtype"] = _exact_pixels(arr)
    row["shape"] = list(arr.shape)
    return row


def write_once(target: str, image, alpha, replace: bool) -> bool:
    """Write target atomically (the CLI's write_output under a hidden temporary name). replace=False: link it to
    its name only if nothing is there (returns False when a complete output was found: written by an earlier
    attempt of this batch); replace=True: rename over it (--overwrite)."""
    from ..cli_files import write_output

    if replace:
        write_output(target, image, alpha)
        return True
    tmp = os.path.join(os.path.dirname(target) or ".",
                       f".{os.path.basename(target)}.{socket.gethostname()}.{os.getpid()}.ray")
    write_output(tmp, image, alpha)
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: a rename, unless the output is there already
        if os.path.exists(target):
            return False
        os.replace(tmp, target)
        return True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class RestoreActor:
    """One per GPU (or CPU slot): the pipeline loaded once; each call restores a batch of decoded photos and
    writes their outputs."""

    def __init__(self, options: dict, models_dirs: list, batch_faces: int):
        import torch

        from .. import cli
        from ..host import device as dev
        from ..host import model_paths
        from ..pipelines.presets import PRESETS

        if models_dirs:
            model_paths.set_models_dirs(models_dirs)
        self.node = _node_id()
        self.host = socket.gethostname()
        self.batch_faces = max(1, int(batch_faces))
        self.independent = PRESETS[options["preset"]].faces_independent
        for key, folder in (("restorer", "facerestore_models"), ("detector", "facedetection")):
            path = options.get(key)
            if path and os.path.isabs(path) and not os.path.isfile(path):  # resolved on the driver, absent here
                raise FaceMendError(f"on node {self.host} ({self.node}): the model file {path} is not on this node; "
                                    f"put it at the same path on every node (a shared folder given with "
                                    f"--models-dir, or a copy of {folder}/ on each)")
        # --device as on the driver (cpu / cuda: Ray hands the actor its GPU(s) through CUDA_VISIBLE_DEVICES)
        options = dict(options)
        wanted = options.pop("device", None)
        self.device = torch.device(wanted) if wanted else dev.compute_device()
        try:
            self.pipeline = cli.build_pipeline(device=self.device, face_batch=self.batch_faces, **options)
        except FaceMendError as exc:  # a model file missing on this node: name it and the node
            raise FaceMendError(f"on node {self.host} ({self.node}): {exc}") from exc

    def __call__(self, batch: dict) -> dict:
        import torch

        from .batching import error_message, restore_images

        n = len(batch["input"])
        out = {"index": list(batch["index"]), "input": list(batch["input"]), "output": list(batch["output"]), "status": [""] * n,
               "error": [str(e) for e in batch["error"]], "faces": [0] * n, "seconds": [0.0] * n,
               "node": [self.node] * n, "host": [self.host] * n, "report": [""] * n}
        todo, images, alphas = [], [], []
        device = self.device
        for k in range(n):
            if out["error"][k]:
                out["status"][k] = "failed"
                continue
            if not batch["replace"][k] and os.path.exists(out["output"][k]):
                out["status"][k] = "done earlier"  # a retried batch: this output is complete already
                continue
            shape = [int(v) for v in batch["shape"][k]]
            arr = np.frombuffer(batch["pixels"][k], dtype=batch["dtype"][k]).reshape(shape)
            t = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]
            t = t.float() / 255.0 if arr.dtype == np.uint8 else t
            todo.append(k)
            images.append(t[:, :3].to(device))
            alphas.append(t[:, 3:] if shape[2] == 4 else None)
        results = restore_images(self.pipeline, images, self.batch_faces, self.independent) if todo else []
        for k, alpha, result in zip(todo, alphas, results):
            if isinstance(result, BaseException):
                out["status"][k], out["error"][k] = "failed", error_message(result)
                continue
            image, report = result
            t = time.perf_counter()
            try:
                if alpha is not None and alpha.shape[-2:] != image.shape[-2:]:  # as the local CLI (x2 presets)
                    import torch.nn.functional as F

                    alpha = F.interpolate(alpha, size=image.shape[-2:], mode="bicubic",
                                          align_corners=False).clamp(0, 1)
                written = write_once(out["output"][k], image.cpu(), alpha, bool(batch["replace"][k]))
            except OSError as exc:
                out["status"][k], out["error"][k] = "failed", f"cannot write {out['output'][k]}: {exc}"
                continue
            report["seconds"] += time.perf_counter() - t
            out["status"][k] = "restored" if written else "done earlier"
            out["faces"][k] = sum(report["faces"])
            out["seconds"][k] = round(report["seconds"], 3)
            out["report"][k] = json.dumps({"faces": report["faces"], "timings_s": report["timings_s"],
                                           **({"batched_with": report["batched_with"]}
                                              if "batched_with" in report else {})})
        return out


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (tests of the actor class alone)
        return ""


class Summary:
    """Our own line beside Ray Data's bars: done / failed / skipped, faces/s and the ETA."""

    def __init__(self, total: int, stream=None, every_s: float = 10.0):
        self.total, self.stream, self.every_s = total, stream or sys.stderr, every_s
        self.t0 = self.last = time.perf_counter()
        self.counts = {"restored": 0, "failed": 0, "skipped": 0, "done earlier": 0}
        self.faces = 0

    def add(self, row: dict) -> None:
        self.counts[row["status"]] = self.counts.get(row["status"], 0) + 1
        self.faces += int(row.get("faces") or 0)
        if time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        seconds = time.perf_counter() - self.t0
        seen = sum(self.counts.values())
        rate = seen / seconds if seconds > 0 else 0.0
        eta = (self.total - seen) / rate if rate > 0 else float("nan")
        return (f"[facemend ray] {self.counts['restored'] + self.counts['done earlier']} done, {self.counts['failed']} "
                f"failed, {self.counts['skipped']} skipped of {self.total}; {self.faces / max(seconds, 1e-9):.2f} "
                f"faces/s, {rate:.2f} images/s, {seconds:.0f} s" + (f", ETA {eta:.0f} s" if seen < self.total else ""))


def restore_on_ray(pairs: list[tuple[str, str]], options: dict, existing: str = "error", address: str | None = None,
                   actors=1, gpus_per_actor: float | None = None, batch_faces: int = 4, models_dirs=(),
                   progress: bool = True, on_row=None, log=None) -> list[dict]:
    """The Python API: restore (input, output) pairs (plan_outputs) on Ray; returns one report per input. Inputs
    may be URIs (list_inputs: s3://..., gs://..., file:///...), read by the decode tasks; outputs are paths.

    options: build_pipeline's keywords (pipeline_options); existing: 'error' | 'overwrite' | 'skip' as the local
    CLI; address: None starts a local Ray on this machine, 'auto' or 'ray://host:10001' joins a cluster; actors:
    N or (MIN, MAX); gpus_per_actor: default 1 where the cluster has GPUs, else 0 (CPU actors); on_row(row) hears of
    every finished input as it streams in."""
    from ..cli_files import EXISTING_POLICIES, check_existing, check_output_dir

    if existing not in EXISTING_POLICIES:
        raise ValueError(f"existing must be one of {EXISTING_POLICIES}, got {existing!r}")
    for folder in sorted({os.path.dirname(os.path.abspath(o)) for _, o in pairs}):
        check_output_dir(folder)
    check_existing(pairs, existing)
    options = check_models(options)
    models_dirs = list(models_dirs) or _current_models_dirs()
    rows = [{"index": k, "input": i if is_uri(i) else os.path.abspath(i), "output": os.path.abspath(o),
             "replace": existing == "overwrite" and os.path.exists(o)} for k, (i, o) in enumerate(pairs)]
    done = [existing == "skip" and os.path.exists(o) for _, o in pairs]
    reports = [{"input": i, "output": o, "skipped": True} for (i, o), d in zip(pairs, done) if d]
    todo = [r for r, d in zip(rows, done) if not d]
    if not todo:
        return reports  # a resumed run with nothing left: no cluster started
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise FaceMendError(f"cannot {'start a local Ray' if not address else f'join the Ray cluster at {address}'}"
                                f": {exc}; check --ray-address ('auto' needs a running `ray start --head` on this "
                                "machine)") from exc
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = bool(progress)
        ctx.max_consecutive_actor_init_deaths = 1  # a missing model file fails the job at once, not in a loop
        if gpus_per_actor is None:
            gpus_per_actor = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        cpus_per_actor = 1.0
        if not gpus_per_actor:  # CPU actors: leave one CPU to the decode tasks, or they never run
            most = actors if isinstance(actors, int) else actors[1]
            cpus_per_actor = min(1.0, max(0.1, (ray.cluster_resources().get("CPU", 1) - 1) / most))
        ds = ray.data.from_items(todo, override_num_blocks=max(1, min(MAX_BLOCKS, -(-len(todo) // ROWS_PER_BLOCK))))
        pool = (ray.data.ActorPoolStrategy(size=actors) if isinstance(actors, int)
                else ray.data.ActorPoolStrategy(min_size=actors[0], max_size=actors[1]))
        with warnings.catch_warnings():
            # Ray 2.60 has no named parameter for bounded retries/restarts yet (its default is unbounded).
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
            ds = ds.map(decode_row, max_retries=RETRIES)
            ds = ds.map_batches(RestoreActor, compute=pool, batch_size=max(1, int(batch_faces)), batch_format="numpy",
                                fn_constructor_kwargs={"options": options, "models_dirs": models_dirs,
                                                       "batch_faces": batch_faces},
                                num_gpus=gpus_per_actor or None, num_cpus=cpus_per_actor,
                                # A task meets its actor "unavailable" until the node's death is known and the
                                # actor restarted elsewhere: retried without count, bounded by the restarts.
                                max_restarts=RETRIES, max_task_retries=-1)
        summary = Summary(len(rows), every_s=10.0 if progress else float("inf"))
        summary.counts["skipped"] = len(rows) - len(todo)
        for row in ds.iter_rows():
            report = _report(row, pairs[int(row["index"])])
            reports.append(report)
            summary.add(row)
            if on_row is not None:
                on_row(report)
        remove_leftovers([r["output"] for r in todo])  # of writes cut short by a node that died
        if log is not None:
            log(summary.line())
    except Exception as exc:
        if isinstance(exc, FaceMendError):
            raise
        cause = _user_error(exc)
        if cause is not None:
            raise cause from exc
        raise
    finally:
        if started:
            ray.shutdown()
    return reports


def remove_leftovers(targets: list[str]) -> int:
    """Remove the temporary files (write_once's `.NAME.png.HOST.PID.ray`, write_output's `.part` of it) that a worker
    killed in the middle of a write left beside these outputs; returns how many. Other files are left alone."""
    by_dir: dict = {}
    for t in targets:
        by_dir.setdefault(os.path.dirname(t) or ".", set()).add(os.path.basename(t))
    removed = 0
    for folder, names in by_dir.items():
        with os.scandir(folder) as entries:
            for e in entries:
                found = re.fullmatch(r"\.\.?(.+?\.png)\.[^/]+\.\d+\.ray(\.\d+\.part)?", e.name)
                if found and found.group(1) in names and e.is_file():
                    os.remove(e.path)
                    removed += 1
    return removed


def _user_error(exc: BaseException):
    """A FaceMendError raised on a worker (e.g. a model file missing on a node), out of Ray's wrappers."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        # An actor that died in its constructor reaches the driver as text only (ActorDiedError).
        found = re.search(r"FaceMendError: (on node [^\n]*)", str(e))
        if found:
            return FaceMendError(found.group(1))
        cause = getattr(e, "cause", None)  # RayTaskError: the exception raised on the worker
        if not isinstance(cause, BaseException):
            if isinstance(e, FaceMendError):
                return FaceMendError(str(e))
            cause = None
        stack += [e.__context__, e.__cause__, cause]
    return None


def _report(row: dict, pair: tuple[str, str]) -> dict:
    """A report entry in the local CLI's shape (paths as given), plus the node and the seconds it took there."""
    entry = {"input": pair[0]}
    if row["status"] == "failed":
        entry["error"] = row["error"]
    else:
        detail = json.loads(row["report"]) if row["report"] else {}
        entry.update(output=pair[1], faces=detail.get("faces", [int(row["faces"])]),
                     seconds=float(row["seconds"]), timings_s=detail.get("timings_s", {}))
        if row["status"] == "done earlier":
            entry["note"] = "complete before this attempt (a retried batch); not written again"
        if "batched_with" in detail:
            entry["batched_with"] = detail["batched_with"]
    entry.update(node=row["node"], host=row["host"])
    return entry


def _current_models_dirs() -> list:
    from ..host import model_paths

    return list(model_paths._standalone_dirs)


def restore_command(args, pairs: list[tuple[str, str]], policy: str) -> list[dict]:
    """The CLI's `restore --engine ray`, after the same checks the local CLI makes (cli._restore_command, which
    also writes the report and the summary): one report per input."""
    options = dict(pipeline_options(args), device=getattr(args, "sub_device", None) or args.device)
    return restore_on_ray(
        pairs, options, existing=policy, address=args.ray_address, actors=parse_actors(args.actors),
        gpus_per_actor=args.gpus_per_actor, batch_faces=args.batch_faces, progress=not args.no_progress,
        log=lambda line: print(line, file=sys.stderr))
