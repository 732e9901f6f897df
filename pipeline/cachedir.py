"""Where kbitscale caches what it derives (`$KBIT_CACHE`, else ~/.cache/kbitscale): ladders, digests,
Evaluator pieces, shapes, inductor's and Python's bytecode. Imports nothing heavy, so the CLI's first
line (`pipeline.bytecode`) can use it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def cache_base(environ: Mapping[str, str] = os.environ) -> Path:
    """`$KBIT_CACHE`, else ~/.cache/kbitscale."""
    return Path(environ.get("KBIT_CACHE") or Path.home() / ".cache" / "kbitscale").expanduser()
