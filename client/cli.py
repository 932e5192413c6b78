"""`python -m facemend api`: the headless client's command line (kept here so the main CLI only registers it)."""
from __future__ import annotations

import os
import sys


def add_api_parser(sub):
    p = sub.add_parser("api", help="run a preset or API workflow on one or more ComfyUI servers (headless)",
                       description="Upload each image, queue the workflow on a ComfyUI server (/prompt), follow it "
                       "on /ws, fetch its outputs into the output folder under the input's name.")
    p.add_argument("workflow", help="a shipped preset (demo, fast, ntire, ntire_full) or an API-format workflow file")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--out", default="restored", help="output folder (default: restored/)")
    p.add_argument("--server", action="append", default=[], help="ComfyUI URL, repeatable (default "
                   "$FACEMEND_SERVERS, comma-separated, or http://127.0.0.1:8188)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override a node input (NODE: id, class_type or title; VALUE: JSON or text), repeatable")
    p.add_argument("--per-server", type=int, default=2, help="jobs in flight per server (default 2: one running, "
                   "one uploaded and queued)")
    p.add_argument("--retries", type=int, default=2, help="times a failed job is retried on another server (default 2)")
    p.add_argument("--image-node", default=None, help="the LoadImage node that takes each input (when several)")
    p.add_argument("--timeout", type=float, default=0, help="seconds before a job is cancelled (default: none)")
    p.add_argument("--server-wait", type=float, default=300, help="seconds a server that went away (a restart, a "
                   "crash) is waited for, probed with backoff, before its jobs fail (default 300)")
    p.add_argument("--no-skip", action="store_true", help="run inputs whose outputs already exist")
    p.add_argument("--auth", default=os.environ.get("FACEMEND_API_AUTH"),
                   help="send 'Authorization: Bearer TOKEN' (servers behind a proxy); also $FACEMEND_API_AUTH")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'", help="extra HTTP header, repeatable")


def run_api(args) -> int:
    from .progress import Progress
    from .runner import Runner
    from .server import Server
    from .workflow import WorkflowError, apply_overrides, load_workflow

    urls = args.server or [u for u in os.environ.get("FACEMEND_SERVERS", "").split(",") if u] or ["http://127.0.0.1:8188"]
    headers = {}
    if args.auth:
        headers["Authorization"] = args.auth if " " in args.auth else f"Bearer {args.auth}"
    for h in args.header:
        name, colon, value = h.partition(":")
        if not colon:
            print(f"error: --header {h!r}: expected 'NAME: VALUE'", file=sys.stderr)
            return 2
        headers[name.strip()] = value.strip()
    runner = None
    try:
        graph = apply_overrides(load_workflow(args.workflow), args.set)
        servers = [Server(u, headers) for u in urls]
        down = [s.url for s in servers if not s.alive()]
        if len(down) == len(servers):
            print(f"error: no ComfyUI server answers at {', '.join(down)} (start ComfyUI, or pass --server URL)",
                  file=sys.stderr)
            return 2
        for url in down:
            print(f"warning: {url} does not answer; running on the others", file=sys.stderr)
        from .runner import list_inputs
        n = len(list_inputs(args.inputs))
        if n == 0:
            print(f"error: no images in {', '.join(args.inputs)}", file=sys.stderr)
            return 2
        runner = Runner([s for s in servers if s.url not in down], graph, args.out, per_server=args.per_server,
                        retries=args.retries, image_node=args.image_node, skip_existing=not args.no_skip,
                        timeout=args.timeout, progress=Progress(n), server_wait=args.server_wait)
        report = runner.run(args.inputs)
    except (WorkflowError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        failures = runner.cancel_failures if runner else []
        if failures:
            print("interrupted: finished outputs are complete, but some of this run's prompts could not be removed:\n  "
                  + "\n  ".join(failures), file=sys.stderr)
        else:
            print("interrupted: this run's queued prompts were removed from the servers and its running ones "
                  "interrupted; finished outputs are complete", file=sys.stderr)
        return 130
    print(summary(report, args.out))
    return 0 if report["counts"].get("failed", 0) == 0 else 1


def summary(report: dict, out_dir: str) -> str:
    c = report["counts"]
    lines = [f"{c.get('done', 0)} done, {c.get('skipped', 0)} skipped, {c.get('failed', 0)} failed in "
             f"{report['seconds']:.1f} s on {len(report['servers'])} server(s); outputs and "
             f"facemend_api_report.json in {out_dir}/"]
    lines += ["retry: " + r for r in report["retries"]]
    for job in report["jobs"]:
        if job["status"] == "failed":
            lines.append(f"FAILED {job['input']}:\n  " + (job["error"] or "").replace("\n", "\n  "))
    return "\n".join(lines)

