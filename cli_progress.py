"""The CLI's progress bars: tqdm on stderr over the images and over each image's face work."""
from __future__ import annotations

import sys

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

    def __init__(self, total_images: int, enabled: bool = True, file=None):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.enabled = enabled
        self.file = file if file is not None else sys.stderr
        self.images = tqdm(total=total_images, desc="images", unit="img", disable=not enabled, file=self.file,
                           dynamic_ncols=True)
        self.inner = None

    def stage(self, name: str, total: int) -> None:
        self._close_inner()
        self.inner = self._tqdm(total=int(total), desc=f"  {name}", leave=False, disable=not self.enabled,
                                file=self.file, dynamic_ncols=True)

    def __call__(self, n: int = 1) -> None:
        super().__call__(n)
        if self.inner is not None:
            self.inner.update(n)

    def image_done(self) -> None:
        self._close_inner()
        self.images.update(1)

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
