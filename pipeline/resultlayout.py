"""Which file of a study folder holds a job's rows when several do (compaction, `pipeline.compact`).

A study folder holds per-job files, `<job_key>.parquet` (what workers write; a rerun replaces one
whole), other single files (e.g. a committed study's `rows.parquet`), and compacted parts,
`compact-<seq>-<id>.parquet`, many jobs each, a higher `seq` newer. Readers take the files in
`by_precedence` order, and a job's rows from the first file holding it: a part never adds a job
that a per-job file, another file or a newer part holds. (A job in two files that are not parts
stays an error, as before compaction: a copy of a study inside it.)

Compaction writes its new part before deleting the files it merged, so after a crash (kill -9
included) a job may sit in a per-job file or a newer part and also in an older part, with the same
rows, or older rows in the older part (a rerun after an earlier compaction): the file read first
holds the current rows either way, and nothing is read twice. Pure pyarrow: no torch, no ray.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

COMPACT_PREFIX = "compact-"
_JOB_FILE = re.compile(r"[0-9a-f]{64}\.parquet")
_COMPACT_FILE = re.compile(rf"{COMPACT_PREFIX}(\d+)-[0-9a-f]+\.parquet")


def is_job_file(path: Path) -> bool:
    """Whether `path` is a per-job file (`<sha256 key>.parquet`), holding that one job's rows."""
    return _JOB_FILE.fullmatch(path.name) is not None


def compact_seq(path: Path) -> int | None:
    """The sequence number of a compacted part; None for any other file."""
    match = _COMPACT_FILE.fullmatch(path.name)
    return int(match.group(1)) if match else None


def precedence(path: Path) -> tuple[int, int]:
    """Sort key, highest first: per-job files, then compacted parts newest first, then other files."""
    if is_job_file(path):
        return (2, 0)
    seq = compact_seq(path)
    return (1, seq) if seq is not None else (0, 0)


def by_precedence(files: Iterable[Path]) -> list[Path]:
    """`files` in reading order, folder by folder: every file but the compacted parts in name order
    (what a folder without parts always was), then the parts newest first."""

    def order(path: Path) -> tuple[Path, int, int, str]:
        seq = compact_seq(path)
        return (path.parent, seq is not None, -(seq or 0), path.name)

    return sorted(files, key=order)


class Shadow:
    """Drops from compacted parts, folder by folder, the jobs that a file read before already holds.

    Feed it the files of each folder highest precedence first (`by_precedence`). Per-job files are
    named by their key, so a folder of per-job files only (no compaction yet) costs no filtering.
    """

    def __init__(self) -> None:
        self._seen: dict[Path, set[str]] = {}

    def keep(self, file: Path, table: pa.Table) -> pa.Table:
        """`table` (the rows of `file`) less the jobs a file read before it in its folder holds."""
        seen = self._seen.setdefault(file.parent, set())
        if is_job_file(file):
            seen.add(file.name.removesuffix(".parquet"))
            return table
        if compact_seq(file) is None:  # another file (a committed rows.parquet): a job in two is an error
            return table
        keys = table.column("job_key")
        if seen:
            shadowed = pc.is_in(keys, value_set=pa.array(sorted(seen), type=pa.string()))
            if pc.any(shadowed).as_py():
                table = table.filter(pc.invert(shadowed))
                keys = table.column("job_key")
        seen.update(k for k in pc.unique(keys).to_pylist() if k is not None)
        return table
