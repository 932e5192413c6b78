"""The CLI's progress: tqdm bars on stderr over the images and over each image's face work when stderr is a
terminal; otherwise (a log file, a scheduler) plain lines: one per finished image, and one per long stage at most
every `log_every` seconds."""
from __future__ import annotations

import sys
import time

from .host import device as dev


class _NoProgress:
    """The progress sink of build_pipeline when nobody watches: only checks for interruption."""

    def stage(self, name: str, total: int) -> None:
        pass

    def __call__(self, n: int = 1) -> None:
        dev.check_interrupt()


class CLIProgress(_NoProgress):
    """tqdm bars on stderr: one over the images, one over the current image's face work (faces restored,
    tuning steps), so a long run always shows where it is."""

    def __init__(self, total_images: int, enabled: bool = True, file=None, live: bool | None = None,
                 log_every: float = 10.0):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.file = file if file is not None else sys.stderr
        isatty = getattr(self.file, "isatty", None)
        self.live = (bool(isatty and isatty()) if live is None else live)  # bars only on a terminal
        self.plain = enabled and not self.live
        self.enabled = enabled and self.live
        self.log_every = log_every
        self.total, self.count, self.start = total_images, 0, time.monotonic()
        self._stage = None  # plain mode: [name, total, done, started, last line]
        self.images = tqdm(total=total_images, desc="images", unit="img", disable=not self.enabled, file=self.file,
                           dynamic_ncols=True)
        self.inner = None

    def stage(self, name: str, total: int) -> None:
        self._close_inner()
        now = time.monotonic()
        self._stage = [name, int(total), 0, now, now]
        self.inner = self._tqdm(total=int(total), desc=f"  {name}", leave=False, disable=not self.enabled,
                                file=self.file, dynamic_ncols=True)

    def __call__(self, n: int = 1) -> None:
        super().__call__(n)
        if self.inner is not None:
            self.inner.update(n)
        if self.plain and self._stage is not None:
            self._stage[2] += n
            now = time.monotonic()
            if now - self._stage[4] >= self.log_every:
                name, total, done, started, _ = self._stage
                self._line(f"  {name}: {done}/{total} ({now - started:.0f} s)")
                self._stage[4] = now

    def image_done(self) -> None:
        self._close_inner()
        self.images.update(1)
        self.count += 1
        self._stage = None
        if self.plain:
            self._line(f"images: {self.count}/{self.total} done ({time.monotonic() - self.start:.1f} s elapsed)")

    def _line(self, text: str) -> None:
        self.file.write(text + "\n")
        self.file.flush()

    def write(self, line: str, err: bool = False) -> None:
        """A log line (stdout; stderr for failures) that does not break the bars."""
        out = sys.stderr if err else sys.stdout
        self._tqdm.write(line, file=out) if self.enabled else print(line, file=out)

    def _close_inner(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None

    def close(self) -> None:
        self._close_inner()
        self.images.close()
