"""A bytecode cache for the pipeline's processes where the environment writes none: `$KBIT_CACHE/pycache`.

A worker imports ~1,500 modules before its first job: torch, and through transformers' `modeling_utils`
torch.distributed, torch._dynamo, sympy and more (`benchmarks/worker_profile.py`). Where writing bytecode
is off (PYTHONDONTWRITEBYTECODE) and the installed packages ship no .pyc files, as on the lent H200
image, every process compiles them from source again: 3.2 s of `compile` inside one model load there,
on top of torch's and the job modules' imports (twelfth session). There, the CLI (driver) and the Ray
processes it starts, and the workers, keep their bytecode under `$KBIT_CACHE/pycache` (Python's
`PYTHONPYCACHEPREFIX`), outside the installed trees. Nothing changes where bytecode is written as usual,
where the packages ship theirs (pip writes it at install: a prefix would only bypass it), where the user
chose a prefix, or with KBIT_BYTECODE_CACHE=0.
Trade-off: a prefix makes Python ignore the in-tree `__pycache__`, so the first process on a new cache
compiles once what an image may have shipped compiled; every later process reads the cache.
Light on purpose: the CLI calls `use_in_this_process` before its heavy imports.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from pipeline.cachedir import cache_base


@functools.cache
def shipped_bytecode(package: str = "torch") -> bool:
    """Whether `package` (torch: the largest of a worker's imports) has bytecode beside its source, as pip
    writes it when it installs; found without importing it, and without regard to any prefix in use."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return True  # nothing here to compile
    source = Path(spec.origin)
    return (source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc").exists()


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """`$KBIT_CACHE/pycache` (else ~/.cache/kbitscale/pycache) when this environment writes no bytecode,
    its packages ship none (`shipped_bytecode`) and it names no prefix of its own; else None."""
    if not environ.get("PYTHONDONTWRITEBYTECODE") or environ.get("PYTHONPYCACHEPREFIX"):
        return None
    if environ.get("KBIT_BYTECODE_CACHE", "1") == "0" or shipped_bytecode():
        return None
    return cache_base(environ).absolute() / "pycache"  # absolute: workers start in other directories


def worker_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Environment variables that give a process started from here the cache (none where `cache_dir`
    is None). An empty PYTHONDONTWRITEBYTECODE turns writing back on."""
    where = cache_dir(environ)
    return {} if where is None else {"PYTHONPYCACHEPREFIX": str(where), "PYTHONDONTWRITEBYTECODE": ""}


def use_in_this_process() -> Path | None:
    """Write and read this process's bytecode under `cache_dir` from now on, and let the processes it
    starts (an embedded Ray cluster's, its workers) inherit the setting; returns the directory or None."""
    where = cache_dir()
    if where is None:
        return None
    os.environ.update(worker_env())
    sys.pycache_prefix = str(where)
    sys.dont_write_bytecode = False
    return where
