"""Where the pinned official reference code is (tests/official_pins.json), or a skip that says how to fetch it."""
from __future__ import annotations

from pathlib import Path

import pytest

from fetch_official import checkout_dir, is_fetched, pins


def fetch_command(name: str) -> str:
    return f"python tests/fetch_official.py {name}"


def official_dir(name: str) -> Path:
    """The checkout of `name` at its pinned commit; skips the calling test with the command to run when absent."""
    if name not in pins():
        raise KeyError(f"{name} is not pinned in tests/official_pins.json")
    if not is_fetched(name):
        pytest.skip(f"needs the official {name} @ {pins()[name]['commit'][:12]} in {checkout_dir(name).parent}: "
                    f"run `{fetch_command(name)}` (add `--from <a local clone>` offline)")
    return checkout_dir(name)
