"""Start-up phase lines: where a sweep's first minute goes, for the user and for `benchmarks/startup.py`.

Each phase is one INFO line on stderr, `startup phase=<name> s=<seconds> at=<unix time> k=v ...` (`at`:
when it ended). The driver logs its own phases (imports, config, pre-flight, plan; Ray's start and the
workers' creation on the early-start thread); each worker logs its start (with how long its process had
run before the actor began, its imports and its device query), the model load, the snapshot, the
Evaluator build and the first job. Workers' lines reach the driver through Ray's log forwarding.
No torch or ray here: the driver imports this before anything heavy.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

PHASE_LOGGER = "pipeline.startup.phases"


def phase_logger() -> logging.Logger:
    """The logger of the start-up phases (its own stderr handler, so a bare worker process shows them)."""
    logger = logging.getLogger(PHASE_LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def phase_line(name: str, seconds: float, **facts: Any) -> str:
    """`startup phase=<name> s=<seconds> at=<unix time> k=v ...`: one start-up phase, parseable
    (`benchmarks/startup.py` reads them); `at` is when it ended."""
    extra = "".join(f" {key}={value}" for key, value in facts.items())
    return f"startup phase={name} s={seconds:.3f} at={time.time():.3f}{extra}"


def log_phase(name: str, seconds: float, **facts: Any) -> None:
    """Log one start-up phase (`phase_line`)."""
    phase_logger().info("%s", phase_line(name, seconds, **facts))


def process_age() -> float:
    """Seconds since this process started, to 0.01 s (Linux: /proc; elsewhere 0.0, unknown)."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start, in ticks since boot
    except (OSError, IndexError, ValueError):
        return 0.0
    return max(0.0, uptime - started)


class PhaseClock:
    """Consecutive phases of one process: `mark(name)` logs the seconds since the previous mark (the
    first mark counts from the process's start)."""

    def __init__(self) -> None:
        self._last = time.perf_counter() - process_age()

    def mark(self, name: str, **facts: Any) -> float:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        log_phase(name, seconds, **facts)
        return seconds
