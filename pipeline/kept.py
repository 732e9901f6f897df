"""Workers that outlive a command (`ray.keep_workers=true`, on a cluster started with `ray start --head`).

A sweep's first minute goes to Ray's start, the workers' imports, the model load and the Evaluator's
build (docs/benchmarks.md, start-up). Researchers run one command after another on the same machine
and model, so with `keep_workers` the worker actors are named, detached actors in the `kbitscale`
namespace: the next command that asks for the same workers finds them alive, with their model, its
pristine copy and their Evaluators resident, and its first job starts at once.

"The same workers" is the name: `kbit-worker-<digest>-<i>`, the digest over everything fixed when a
worker starts (the Ray options, the results root, the plugins, the CPU threads, GPUs per worker) and
the source of `pipeline/`, `kernels/` and the plugin modules, so a worker never runs code older than
the driver's. Kept workers under another digest hold GPUs the new ones need: the driver kills them
first (and says so).
They are freed by `python -m pipeline.kept release [--address auto]` (or `ray stop`).
Trade-off: a kept worker holds its GPU memory between commands; that is the point, and the cost.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "kbitscale"
PREFIX = "kbit-worker-"
SOURCE_DIRS = ("pipeline", "kernels")
ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def code_version(root: Path = ROOT) -> str:
    """sha256 over the project's Python sources (paths and bytes): a worker started under other code
    is not reused."""
    digest = hashlib.sha256()
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def plugin_sources(plugins: Sequence[str]) -> str:
    """sha256 over the source files of the plugin modules (found, not imported): a worker that imported
    an older version of a plugin is not reused either. A module not found counts by its name alone."""
    import importlib.util

    digest = hashlib.sha256()
    for name in plugins:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        digest.update(name.encode() + b"\0" + (origin.read_bytes() if origin and origin.is_file() else b""))
    return digest.hexdigest()


def kept_prefix(options: dict[str, Any], args: Sequence[Any], kwargs: dict[str, Any], version: str) -> str:
    """`kbit-worker-<digest>-`: the name prefix of the kept workers started with these Ray options and
    constructor arguments under this code version."""
    fixed = json.dumps([options, list(args), kwargs, version], sort_keys=True, default=str)
    return f"{PREFIX}{hashlib.sha256(fixed.encode()).hexdigest()[:16]}-"


def stale_names(names: Sequence[str], prefix: str) -> list[str]:
    """Kept workers' names (of `names`, every named actor in the namespace) not under `prefix`."""
    return sorted(n for n in names if n.startswith(PREFIX) and not n.startswith(prefix))


def kill_named(names: Sequence[str]) -> int:
    """Kill the named actors of the current namespace; returns how many were found."""
    import ray

    killed = 0
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            killed += 1
        except ValueError:  # gone meanwhile
            continue
    return killed


def kept_names() -> list[str]:
    """Every kept worker's name in the `kbitscale` namespace of the connected cluster."""
    from ray.util import list_named_actors

    return sorted(n for n in list_named_actors(all_namespaces=False) if n.startswith(PREFIX))


def start_kept(remote_cls: Any, class_name: str, options: dict[str, Any], args: Sequence[Any],
               kwargs: dict[str, Any], count: int, plugins: Sequence[str] = ()) -> list[Any]:  # fmt: skip
    """`count` kept workers of `remote_cls` (`ray.remote` of the class named `class_name`, which imports
    `plugins`) started with `options`, `args` and `kwargs`: those alive under their name are reused as
    they are, the others started (named, detached); kept workers under another name are killed first."""
    version = code_version() + plugin_sources(plugins)
    prefix = kept_prefix({**options, "class": class_name}, args, kwargs, version)
    names = kept_names()
    stale = stale_names(names, prefix)
    if stale:
        log.warning(
            "killing %d kept worker(s) started under another configuration or code version "
            "(they hold the resources the new ones need): %s", len(stale), ", ".join(stale),
        )  # fmt: skip
        kill_named(stale)
    reused = sum(f"{prefix}{i}" in names for i in range(count))
    log.info("kept workers: %d reused, %d started (%s*)", reused, count - reused, prefix)
    return [
        remote_cls.options(
            **options, name=f"{prefix}{i}", namespace=NAMESPACE, lifetime="detached", get_if_exists=True
        ).remote(*args, **kwargs)
        for i in range(count)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.kept", description="Free the workers kept by ray.keep_workers=true."
    )
    parser.add_argument("action", choices=["release", "list"])
    parser.add_argument("--address", default="auto", help="the cluster's address (default: auto)")
    args = parser.parse_args(argv)
    import ray

    logging.basicConfig(level=logging.WARNING)
    from pipeline.preflight import address_problem

    problem = address_problem(args.address)
    if problem is not None:  # Ray itself would retry for a minute, then raise
        print(f"error: {problem}", file=sys.stderr)
        return 2
    ray.init(address=args.address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    try:
        names = kept_names()
        if args.action == "list":
            print("\n".join(names) if names else "no kept workers")
        else:
            print(f"released {kill_named(names)} kept worker(s)")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
