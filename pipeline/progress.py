"""Progress of a sweep (done/total, rate, ETA, logged every few seconds) and its end summary."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """Raised in the driver's main thread by its SIGTERM handler, so SIGTERM ends a sweep as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_RECEIVED: list[int] = []  # the SIGTERMs the handler of the current `sigterm_interrupts` block took


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the block runs, the first SIGTERM raises `Interrupted` in the main thread (later ones are
    logged and ignored, so cleanup finishes); elsewhere than the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        _RECEIVED.append(signum)
        if len(_RECEIVED) == 1:
            raise Interrupted(signum)
        log.warning("SIGTERM again: already stopping")

    _RECEIVED.clear()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _RECEIVED.clear()


def interrupt_signal(err: BaseException) -> int:
    """The signal that ended the run with `err`: the one an `Interrupted` names; else a SIGTERM the handler
    took (Ray turns an exception raised by a signal handler inside its own blocking calls, `ray.wait`,
    into a plain KeyboardInterrupt); else SIGINT (Ctrl-C)."""
    signum = getattr(err, "signum", None)
    return int(signum) if signum is not None else (_RECEIVED[0] if _RECEIVED else int(signal.SIGINT))


def format_duration(seconds: float) -> str:
    """Seconds as "1h02m", "3m05s" or "12s"."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@dataclass
class Progress:
    """Counts jobs as they finish and logs one line at most every `interval_s` seconds."""

    total: int  # jobs to run this time (skipped ones excluded)
    skipped: int = 0
    label: str = ""
    interval_s: float = 5.0
    done: int = 0
    failed: int = 0
    retried: int = 0
    interrupted: bool = False  # the run stopped early (Ctrl-C or SIGTERM)
    signum: int = signal.SIGINT  # the signal that interrupted it
    stopped: str = ""  # why the run ended before every job ran, other than a signal ("": it did not)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (job key, error), in order
    started: float = field(default_factory=time.monotonic)
    _last_log: float = field(default_factory=time.monotonic)
    # Logs that are not a terminal (files, CI) get a line per `log_step` of the jobs or per `log_quiet_s`,
    # whichever comes first; neither kind ever gets a line whose job count has not changed.
    tty: bool = field(default_factory=lambda: sys.stderr.isatty())
    log_step: float = 0.1
    log_quiet_s: float = 60.0
    _last_done: int = -1

    def record(self, key: str, ok: bool, error: str | None = None) -> None:
        """Count one finished job (`ok` False: failed with `error`)."""
        self.done += 1
        if not ok:
            self.failed += 1
            self.errors.append((key, error or "unknown error"))

    def interrupt(self, err: KeyboardInterrupt) -> None:
        """Mark the run interrupted by Ctrl-C, or by the signal an `Interrupted` names."""
        self.interrupted = True
        self.signum = interrupt_signal(err)

    def exit_code(self) -> int:
        """0 all ok; 1 a job failed or did not run; 128 + the signal's number when interrupted (130, 143)."""
        if self.interrupted:
            return 128 + self.signum
        return 1 if self.failed or self.stopped else 0

    def line(self) -> str:
        """E.g. "[demo] 120/450 jobs (3 failed), 2.10 jobs/s, ETA 2m37s"."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        left = self.total - self.done
        eta = format_duration(left / rate) if rate > 0 else "?"
        prefix = f"[{self.label}] " if self.label else ""
        return (
            f"{prefix}{self.done}/{self.total} jobs ({self.failed} failed), "
            f"{rate:.2f} jobs/s, elapsed {format_duration(elapsed)}, ETA {eta}"
        )

    def maybe_log(self, force: bool = False) -> None:
        """Log the progress line if `interval_s` has passed since the last one (or `force`)."""
        now = time.monotonic()
        if not force and not self._due(now):
            return
        self._last_log, self._last_done = now, self.done
        log.info(self.line())

    def _due(self, now: float) -> bool:
        """Whether a line is due: the count changed, and (terminal) `interval_s` passed or (not a terminal)
        the count crossed a `log_step` fraction of the total or `log_quiet_s` passed."""
        if self.done == self._last_done:
            return False
        if self.tty:
            return now - self._last_log >= self.interval_s
        step = max(1, round(self.total * self.log_step))
        crossed = self.done // step > max(self._last_done, 0) // step
        return crossed or now - self._last_log >= self.log_quiet_s

    def summary(self, max_errors: int = 5) -> str:
        """The end-of-run summary: done, skipped, failed, and the first errors."""
        interrupted = self.interrupted
        ok = self.done - self.failed
        head = "finished"
        if interrupted:
            head = f"interrupted ({signal.Signals(self.signum).name})"
        elif self.stopped:
            head = "stopped"
        lines = [
            f"{head}{' ' + self.label if self.label else ''}: {ok} done, {self.skipped} skipped "
            f"(already done), {self.failed} failed, {self.total - self.done} not run, "
            f"in {format_duration(time.monotonic() - self.started)}"
        ]
        if self.stopped:
            lines.append(f"  stopped: {self.stopped}")
        if self.retried:
            lines.append(f"  {self.retried} job(s) retried after a worker died")
        for key, error in self.errors[:max_errors]:
            lines.append(f"  failed {key[:12]}: {error}")
        if len(self.errors) > max_errors:
            lines.append(f"  ... and {len(self.errors) - max_errors} more failures")
        if interrupted or self.stopped or self.total - self.done:
            lines.append("  re-run the same command to run only what is missing")
        elif self.failed:
            lines.append("  re-run with rerun_failed=true to retry the failed jobs")
        return "\n".join(lines)
