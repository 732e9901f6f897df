"""Ray started on the driver's first line, on a guess from the command line, while the driver imports.

`python -m pipeline.run` spends its first seconds importing (torch, through the method registry;
pandas; Hydra) and composing the config, and only then could start Ray, whose start takes seconds
more. Ray's start needs three settings (`cluster.RayStart`: no address, and the local cluster's CPUs
and GPUs), which the command line almost always gives or leaves at their defaults. So `prestart` reads
them from the arguments and starts an embedded cluster at once (`cluster.EarlyStart`, no workers);
`pipeline.run.start_early` adopts it when the composed config asks for the same Ray, and otherwise
cancels it (Ray is stopped again) and starts the right one. No worker starts and no GPU is touched
before pre-flight passes, as without it. A cancelled guess costs the wait for its start (the error,
if any, is printed first). No guess for a dry run, `--cfg`, a cluster joined by address, anything the
guess cannot read, or `KBIT_EARLY_START=0`.
Light on purpose: it imports `pipeline.cluster` (Ray itself is imported on the start's thread).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.cluster import EarlyStart, RayStart

_PENDING: list[EarlyStart] = []  # at most one: the start made by `prestart`, until `take` hands it over

SKIP_ARGS = ("-h", "--help", "--cfg", "--config")  # answered without Ray
SKIP_PREFIXES = ("ray.address=", "+ray.address=", "ray=cluster", "dry_run=t", "dry_run=T", "dry_run=1")


def guess(argv: Sequence[str]) -> RayStart | None:
    """The Ray settings these arguments ask for (defaults where they say nothing), or None when no
    start should be made on them (see the module docstring)."""
    from pipeline.cluster import RayStart

    if os.environ.get("KBIT_EARLY_START", "1") == "0" or os.environ.get("RAY_ADDRESS"):
        return None
    sizes: dict[str, int | None] = {}
    for arg in argv:
        if arg in SKIP_ARGS or arg.startswith(SKIP_PREFIXES):
            return None
        if arg.startswith("-") and arg not in ("-m", "--multirun"):
            return None  # an unknown option: the driver refuses it
        key, _, value = arg.lstrip("+").partition("=")
        if key in ("ray.num_cpus", "ray.num_gpus"):
            if value.lower() in ("null", "none", "~"):
                sizes[key] = None
            elif value.isdigit():
                sizes[key] = int(value)
            else:
                return None  # a sweep over it, or a typo the driver will name
    return RayStart(num_cpus=sizes.get("ray.num_cpus"), num_gpus=sizes.get("ray.num_gpus"))


def prestart(argv: Sequence[str]) -> None:
    """Start Ray on a background thread when the arguments allow a guess (`guess`); `take` gets it."""
    settings = guess(argv)
    if settings is not None and not _PENDING:
        from pipeline.cluster import EarlyStart

        _PENDING.append(EarlyStart(settings, workers=False))


def take() -> EarlyStart | None:
    """The start `prestart` made (once; None if there was none): adopt it or cancel it."""
    return _PENDING.pop() if _PENDING else None
