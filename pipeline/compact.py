"""Compaction: a study's per-job files merged into one consolidated Parquet part, so a 35,000-job
study opens in seconds (one file read instead of 35,000; docs/benchmarks.md, "results at scale").

    python -m pipeline.compact results/<study> [results/<other> ...]

Under the study's driver lock (`pipeline.lock`: never while a sweep of that study runs; a sweep's
driver, which holds it, may call `compact_study(..., locked=True)` when its jobs are done):
1. every per-job file and every earlier part is read (`results.load_table`: the current schema, each
   job from the file `resultlayout` ranks first) and written as ONE new part, temp file + fsync +
   `os.replace` + fsync of the folder, named `compact-<seq>-<id>.parquet` with seq one past the last;
2. the per-job files merged are deleted (one replaced since it was read is kept: it is newer and
   read first), then the earlier parts; the folder is fsynced.
A kill at any point leaves every job readable exactly once (`resultlayout` ranks a job's copies):
a temp file (removed by the next driver or compaction), or the new part next to files it merged.
Running it again finishes the work; on a compacted folder with nothing new it does nothing.
Other files (a committed `rows.parquet`) are left as they are. Reruns write per-job files as ever.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.lock import study_lock
from pipeline.resultlayout import COMPACT_PREFIX, compact_seq, is_job_file
from pipeline.results import TMP_PREFIX, load_table, remove_temp_files, study_files

log = logging.getLogger(__name__)

# tests: a folder; at a step whose <step>.pause file is there, touch <step> and wait for <step>.go
HOOK_ENV = "KBIT_COMPACT_HOOK"
ROW_GROUP_ROWS = 65_536


@dataclass(frozen=True)
class Compaction:
    """What one `compact_study` did."""

    part: Path | None  # the part written; None: nothing to do
    job_files: int  # per-job files merged (and deleted)
    parts: int  # earlier parts merged (and deleted)
    rows: int


def _hook(step: str) -> None:
    """Pause at `step` while the test in HOOK_ENV's folder has not released it (kill -9 tests)."""
    folder = os.environ.get(HOOK_ENV)
    if not folder or not (Path(folder) / f"{step}.pause").exists():
        return
    (Path(folder) / step).touch()
    while not (Path(folder) / f"{step}.go").exists():
        time.sleep(0.01)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns)


def compact_study(study_dir: Path, *, locked: bool = False) -> Compaction:
    """Merge `study_dir`'s per-job files and earlier parts into one new part (see the module doc).

    `locked`: the caller holds the study's lock (a sweep's driver); else it is taken here.

    Raises:
        pipeline.lock.StudyLocked: another driver holds the study's lock.
        pipeline.results.ResultsError: a file that cannot be read (nothing is changed then).
    """
    guard: AbstractContextManager[object] = nullcontext() if locked else study_lock(study_dir)
    with guard:
        remove_temp_files(study_dir)
        files = study_files(study_dir)
        job_files = [f for f in files if is_job_file(f)]
        parts = [f for f in files if compact_seq(f) is not None]
        if not job_files and len(parts) <= 1:
            return Compaction(None, 0, 0, 0)
        identity = {f: _identity(f) for f in job_files}
        table = load_table(study_dir, only=job_files + parts)
        seq = max((compact_seq(p) or 0 for p in parts), default=0) + 1
        part = study_dir / f"{COMPACT_PREFIX}{seq:06d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = study_dir / f"{TMP_PREFIX}{part.name}"
        try:
            pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            _hook("written")
            os.replace(tmp, part)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(study_dir)
        _hook("replaced")
        for index, file in enumerate(job_files):
            if index == len(job_files) // 2:
                _hook("deleting")
            if _identity(file) == identity[file]:
                file.unlink(missing_ok=True)
            else:
                log.warning("%s changed while compacting: kept (it is read before the part)", file)
        _hook("parts")
        for old in parts:
            old.unlink(missing_ok=True)
        _fsync_dir(study_dir)
        log.info(
            "study %s: %d job file(s) and %d part(s) -> %s (%d rows)",
            study_dir.name,
            len(job_files),
            len(parts),
            part.name,
            table.num_rows,
        )
        return Compaction(part, len(job_files), len(parts), table.num_rows)


# `compact` (a run-wide config key): after a sweep, each of its studies is compacted under the lock the
# driver holds -- "auto": when it holds more than AUTO_MIN_JOB_FILES per-job files; "always": when it
# holds any (or several parts); "never": not (`python -m pipeline.compact` remains).
COMPACT_SETTINGS = ("auto", "always", "never")
AUTO_MIN_JOB_FILES = 1000  # ~10 s of load_results at 7-17 ms a file (docs/benchmarks.md)


def compact_problems(setting: str) -> list[str]:
    """A message if `setting` is not one of `COMPACT_SETTINGS` (pre-flight)."""
    if setting in COMPACT_SETTINGS:
        return []
    return [f"compact={setting!r}: must be one of {', '.join(COMPACT_SETTINGS)}"]


def should_compact(setting: str, job_files: int, threshold: int = AUTO_MIN_JOB_FILES) -> bool:
    """Whether a study with `job_files` loose per-job files is compacted after a sweep."""
    if setting not in COMPACT_SETTINGS:
        raise ValueError(compact_problems(setting)[0])
    return setting == "always" or (setting == "auto" and job_files > threshold)


def compact_after_sweep(
    study_dir: Path, setting: str, threshold: int = AUTO_MIN_JOB_FILES
) -> Compaction | None:
    """The end-of-sweep hook: compact `study_dir` if `should_compact`; the caller (the sweep's driver)
    holds the study's lock. A file that cannot be read is logged and the study left as it is."""
    from pipeline.results import ResultsError

    loose = sum(1 for f in study_files(study_dir) if is_job_file(f)) if study_dir.is_dir() else 0
    if not should_compact(setting, loose, threshold):
        return None
    try:
        return compact_study(study_dir, locked=True)
    except (ResultsError, OSError) as err:
        log.warning("study %s not compacted: %s", study_dir.name, err)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.compact",
        description="Merge each study's per-job result files into one Parquet part (safe to rerun).",
    )
    parser.add_argument("studies", nargs="+", type=Path, help="study folders, e.g. results/my-study")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pipeline.lock import StudyLocked

    status = 0
    for study in args.studies:
        if not study.is_dir():
            print(f"{study}: no such study folder", file=sys.stderr)
            status = 2
            continue
        try:
            done = compact_study(study)
        except StudyLocked as err:
            print(f"{study}: skipped: {err}", file=sys.stderr)
            status = 1
            continue
        if done.part is None:
            print(f"{study}: already compacted")
        else:
            merged = f"{done.job_files} job files + {done.parts} parts"
            print(f"{study}: {merged} -> {done.part.name} ({done.rows} rows)")
    return status


if __name__ == "__main__":
    sys.exit(main())
