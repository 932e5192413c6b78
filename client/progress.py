"""Progress of a headless run: one line per running image (its server, node, step) and one for the whole run
(done / failed / running, elapsed, ETA from the throughput so far). On a terminal the block is redrawn in
place; otherwise (a log file, CI) each event is one line."""
from __future__ import annotations

import sys
import threading
import time


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _bar(fraction: float, width: int = 20) -> str:
    n = int(round(max(0.0, min(1.0, fraction)) * width))
    return "#" * n + "-" * (width - n)


class Progress:
    def __init__(self, total: int, stream=None, live: bool | None = None, interval: float = 0.5,
                 log_every: float = 30.0):
        self.total = total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.interval = interval
        self.log_every = log_every
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.running: dict = {}  # job name -> dict(server, fraction, node, step)
        self.done = self.failed = self.skipped = 0
        self._drawn = 0
        self._last = 0.0

    # --- events from the runner -------------------------------------------------------------------------
    def started(self, name: str, server: str, attempt: int):
        with self.lock:
            self.running[name] = {"server": server, "fraction": 0.0, "node": "", "step": ""}
            self._last = time.monotonic() if not self.live else self._last
            self._event(f"{name}: sent to {server}" + (f" (attempt {attempt})" if attempt > 1 else ""))

    def update(self, name: str, fraction: float, node: str = "", step: str = ""):
        with self.lock:
            if name in self.running:
                self.running[name].update(fraction=fraction, node=node, step=step)
                now = time.monotonic()
                if self.live and now - self._last >= self.interval:
                    self._redraw()
                elif not self.live and now - self._last >= self.log_every:  # a log still shows a long run move
                    self.stream.write("\n".join(self._lines()) + "\n")
                    self.stream.flush()
                    self._last = now

    def finished(self, name: str, status: str, message: str = ""):
        with self.lock:
            self.running.pop(name, None)
            if status == "done":
                self.done += 1
            elif status == "skipped":
                self.skipped += 1
            elif status == "failed":
                self.failed += 1
            self._event(f"{name}: {status}" + (f": {message}" if message else "") + " | " + self.overall())

    def note(self, message: str):
        with self.lock:
            self._event(message)

    # --- rendering ------------------------------------------------------------------------------------------
    def overall(self) -> str:
        finished = self.done + self.failed + self.skipped
        elapsed = time.monotonic() - self.start
        worked = self.done + self.failed + sum(r["fraction"] for r in self.running.values())
        todo = self.total - finished - sum(r["fraction"] for r in self.running.values())
        eta = f"ETA {_clock(elapsed / worked * todo)}" if worked > 0 and todo > 0 else "ETA -"
        if finished == self.total:
            eta = "finished"
        return (f"{finished}/{self.total} [{_bar(finished / max(self.total, 1))}] done {self.done}, failed "
                f"{self.failed}, skipped {self.skipped}, running {len(self.running)}; {_clock(elapsed)} elapsed, {eta}")

    def _lines(self) -> list[str]:
        lines = [f"  {name} @ {r['server']} [{_bar(r['fraction'])}] {100 * r['fraction']:3.0f}% {r['node']} {r['step']}"
                 .rstrip() for name, r in self.running.items()]
        return lines + ["  " + self.overall()]

    def _event(self, message: str):
        if self.live:
            self._clear()
            self.stream.write(message + "\n")
            self._redraw()
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def _clear(self):
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _redraw(self):
        self._clear()
        lines = self._lines()
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines)
        self._last = time.monotonic()

    def close(self):
        with self.lock:
            if self.live:
                self._clear()
            self.stream.flush()
