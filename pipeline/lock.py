"""One driver per study: a lock file in the study folder naming its holder (host, pid, start time).

The lock is an advisory `flock` on `<study>/.driver.lock`, held as long as the driver runs; the file
says who holds it, so a refused driver names the holder. The kernel drops a flock when its process
dies (kill -9 included), so a lock left by a dead driver on this host is taken over at once (stale-lock
recovery; where flock is not supported, a holder on this host is checked by its pid). A lock file
written on another host is not taken over: on a shared folder whose filesystem does not lock across
hosts that driver may still run, so the message asks to delete the file if it has ended. On release
the file is removed; an acquirer that locked a file already removed (its path now names another file
or none) tries again, so two drivers never hold two files of one path.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pipeline.jobs import Job
from pipeline.results import STATUS_OK, job_outcome, job_path, remove_temp_files

log = logging.getLogger(__name__)

LOCK_NAME = ".driver.lock"


class StudyLocked(RuntimeError):
    """Another driver holds the study's lock."""


def holder_text(info: dict[str, object]) -> str:
    """E.g. "pid 4242 on host gpu-3 (since 2026-12-02T10:00:00+00:00)"."""
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('started')})"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _read_holder(fd: int) -> dict[str, object]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace")
    try:
        info = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def _refusal(path: Path, info: dict[str, object], host: str) -> StudyLocked:
    pid, study = info.get("pid"), str(path.parent)
    if not info:  # locked, not written yet
        return StudyLocked(f"study {study!r} is in use by another driver (starting now; lock file {path})")
    if info.get("host") != host:
        advice = f"if that driver has ended, delete {path}"
    elif isinstance(pid, int) and not pid_alive(pid):
        advice = "that process has ended, but a process it started still holds the lock: stop it"
    else:
        advice = "wait for it to end or stop it (the lock of a driver that died is taken over by itself)"
    return StudyLocked(f"study {study!r} is in use by another driver: {holder_text(info)}; {advice}")


def _try_lock(path: Path, host: str) -> int | None:
    """The locked file's descriptor, or None when the path changed under us (try again).

    Raises:
        StudyLocked: another driver holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        info = _read_holder(fd)
        os.close(fd)
        raise _refusal(path, info, host) from None
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        log.warning("%s: this filesystem cannot lock files; only the holder's pid is checked", path)
        locked = False
    try:
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        same = False
    if not same:  # the holder released (removed) it between our open and our lock
        os.close(fd)
        return None
    info = _read_holder(fd)
    pid = info.get("pid")
    foreign = info.get("host") not in (None, host)
    if foreign or (not locked and isinstance(pid, int) and pid_alive(pid)):
        os.close(fd)
        raise _refusal(path, info, host)
    if pid is not None:
        log.warning("study %s: taking over the lock of an ended driver (%s)", path.parent, holder_text(info))
    return fd


@contextmanager
def study_lock(study_dir: Path) -> Iterator[Path]:
    """Hold `study_dir`'s driver lock for the block (the folder is created if missing).

    Raises:
        StudyLocked: another driver holds it, naming that driver's host and pid.
    """
    study_dir.mkdir(parents=True, exist_ok=True)
    path, host = study_dir / LOCK_NAME, socket.gethostname()
    fd = None
    while fd is None:
        fd = _try_lock(path, host)
    info = {"host": host, "pid": os.getpid(), "started": datetime.now(UTC).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still locked: a waiter then finds the path changed
        os.close(fd)


@contextmanager
def claim_studies(jobs: Sequence[Job], results_root: Path) -> Iterator[list[Job]]:
    """Hold the lock of every study of `jobs` (in sorted order) for the block, which gets `jobs` less
    those another driver finished since they were planned; temp files a crash left are removed first.

    Raises:
        StudyLocked: another driver holds one of the locks.
    """
    studies = sorted({job.study for job in jobs})
    with ExitStack() as stack:
        for study in studies:
            stack.enter_context(study_lock(results_root / study))
            removed = remove_temp_files(results_root / study)
            if removed:
                log.info("study %s: removed %d temp file(s) that a crashed write left", study, len(removed))
        yield [job for job in jobs if not _finished(job, results_root)]


def _finished(job: Job, results_root: Path) -> bool:
    path = job_path(results_root / job.study, job.key)
    return path.exists() and (job_outcome(path) or ("",))[0] == STATUS_OK
