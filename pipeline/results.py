"""The results store: one Parquet file per finished job under `results/<study>/`, tidy long format.

Pure pandas/pyarrow (no torch, no ray), so `analysis` can read results through `load_results`.
Files are written atomically (temp file in the same folder + `os.replace`), so a crash or kill -9
leaves either the old file or the new one, never half a file; readers skip temp files, and the next
driver removes those a crash left (`remove_temp_files`). Planning skips a file it cannot read, with a
warning naming it (`job_status`); `load_results` reads a study's own files, never a copy in a subfolder.

Compaction (`pipeline.compact`) merges a study's per-job files into a few `compact-*.parquet` parts;
`pipeline.resultlayout` says which file holds a job's rows when a crash left it in two, and both
`job_status` and `load_results` read compacted, uncompacted and half-compacted folders alike.

Schema evolution (`pipeline.resultschema`): each file records its SCHEMA_VERSION, and `load_results`
fills the columns added since from `ADDED_COLUMNS`.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.resultlayout import Shadow, by_precedence
from pipeline.resultschema import (
    ADDED_COLUMNS,
    COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    SCHEMAS,
    ResultsError,
    schema_columns,
    schema_version,
    upgrade,
)

__all__ = [  # the schema's names too: callers read the store and its schema from one module
    "ADDED_COLUMNS", "COLUMNS", "SCHEMA", "SCHEMA_VERSION", "SCHEMA_VERSION_KEY", "STATUS_FAILED",
    "STATUS_OK", "TMP_PREFIX", "ResultsError", "job_outcome", "job_path", "job_status", "load_results",
    "load_table", "remove_temp_files", "result_files", "schema_columns", "study_files", "write_job_rows",
]  # fmt: skip

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
STATUS_OK = "ok"
STATUS_FAILED = "failed"
_ATTEMPTS = 3  # reads of a folder a concurrent compaction changed under the reader


class _Vanished(ResultsError):
    """A result file listed a moment ago is gone (a concurrent compaction merged it): list again."""


def job_path(study_dir: Path, job_key: str) -> Path:
    """Where the rows of one job live."""
    return study_dir / f"{job_key}.parquet"


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts keyed by column) -> a table with exactly SCHEMA, tagged with SCHEMA_VERSION.

    Missing keys become null; unknown keys are an error.
    """
    rows = list(rows)
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ResultsError(f"unknown result columns {sorted(unknown)}; allowed: {list(COLUMNS)}")
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    return table.replace_schema_metadata({SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})


def write_job_rows(study_dir: Path, job_key: str, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write one job's rows atomically; an existing file for the same key is replaced whole."""
    table = rows_to_table(rows)
    study_dir.mkdir(parents=True, exist_ok=True)
    final = job_path(study_dir, job_key)
    tmp = study_dir / f"{TMP_PREFIX}{job_key}-{uuid.uuid4().hex[:8]}.parquet"
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def study_files(study_dir: Path) -> list[Path]:
    """A study's own finished result files: the *.parquet directly in its folder (no temp files)."""
    return sorted(p for p in study_dir.glob("*.parquet") if not p.name.startswith(TMP_PREFIX) and p.is_file())


def result_files(path: Path) -> list[Path]:
    """Finished result files: `path` itself (one file); a study folder's own files (a folder holding
    result files: its subfolders, such as a backup copy, are not read); or, for a folder holding none
    itself (a results root), every result file under it."""
    if path.is_file():
        return [path]
    own = study_files(path)
    if not own:
        return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith(TMP_PREFIX))
    copies = sorted(d.name for d in path.iterdir() if d.is_dir() and next(d.rglob("*.parquet"), None))
    if copies:
        log.warning("%s: result files in its subfolders %s are not read (a study's own only)", path, copies)
    return own


def remove_temp_files(study_dir: Path) -> list[Path]:
    """Delete the temp files a crashed write left in a study folder (call it holding the study's lock)."""
    removed = [p for p in study_dir.glob(f"{TMP_PREFIX}*.parquet") if p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def job_status(study_dir: Path) -> dict[str, str]:
    """job_key -> "ok" | "failed" for every finished job file of a study (cheap: reads two columns).

    Both columns exist since schema 1, so files of every schema answer. A file that cannot be read
    (truncated, foreign, without `job_key` or `status`) is skipped with a warning naming it: its jobs
    count as not done, so they run again (and a job's own file is then replaced).
    """
    for attempt in range(_ATTEMPTS):
        status: dict[str, str] = {}
        for file in by_precedence(study_files(study_dir)) if study_dir.is_dir() else []:
            try:
                table = _read(file, columns=["job_key", "status"])
            except ResultsError as err:
                if not file.exists() and attempt + 1 < _ATTEMPTS:
                    break  # a compaction merged it away meanwhile: list the folder again
                log.warning(
                    "skipping a result file that cannot be read (its jobs count as not done): %s", err
                )
                continue
            keys, states = table.column("job_key").to_pylist(), table.column("status").to_pylist()
            own: dict[str, str] = {}
            for key, state in zip(keys, states, strict=True):
                if own.get(key) != STATUS_FAILED:  # any failed row marks the job failed
                    own[key] = state
            for key, state in own.items():  # a file of higher precedence, read before, decides
                status.setdefault(key, state)
        else:
            return status
    raise AssertionError("unreachable: the last attempt returns")


def job_outcome(file: Path) -> tuple[str, str | None] | None:
    """(status, error) of the one job a file holds; None when it cannot be read."""
    try:
        table = _read(file, columns=["status", "error"])
    except ResultsError:
        return None
    states, errors = table.column("status").to_pylist(), table.column("error").to_pylist()
    failed = [error for state, error in zip(states, errors, strict=True) if state != STATUS_OK]
    return (STATUS_FAILED, failed[0]) if failed else (STATUS_OK, None)


def load_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read every finished result file under `path` into one DataFrame with SCHEMA's columns.

    Files of any schema version read: columns added after a file's version are filled as
    `ADDED_COLUMNS` says. Rows keep file order (`resultlayout.by_precedence`: files by name, then compacted
    parts newest first); a job in two files of one folder is read from one.

    Raises:
        FileNotFoundError: `path` does not exist.
        ResultsError: no result files; a file that is no readable Parquet, names an unknown schema
            version, or whose columns or types differ from its own schema version's; one job of one
            study in two files (a copy of a study inside the folder read).
    """
    return load_table(path).to_pandas(types_mapper=_pandas_type)


def load_table(path: str | os.PathLike[str], only: Sequence[Path] | None = None) -> pa.Table:
    """`load_results` as an Arrow table (SCHEMA, current version); `only`: just these files of the
    folder `path` (what compaction merges)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"results path {str(root)!r} does not exist")
    for attempt in range(_ATTEMPTS):
        try:
            return _load_files(root, by_precedence(result_files(root) if only is None else only))
        except _Vanished:
            if attempt + 1 == _ATTEMPTS:
                raise
            log.info("a result file went away while reading (a compaction): reading again")
    raise AssertionError("unreachable: the last attempt returns or raises")


def _load_files(root: Path, files: list[Path]) -> pa.Table:
    if not files:
        raise ResultsError(f"no result files (*.parquet) under {str(root)!r}")
    by_version: dict[int, list[tuple[int, Path, pa.Table]]] = {}
    owner: dict[tuple[Any, Any], Path] = {}  # (study, job_key) -> the file holding its rows
    shadow = Shadow()  # a job in two files of one folder (a crash during compaction): the higher one
    for index, file in enumerate(files):
        try:
            version, table = _read_validated(file)
        except ResultsError as err:
            if not file.exists():
                raise _Vanished(str(err)) from err
            raise
        table = shadow.keep(file, table)
        _claim_jobs(owner, file, table)
        by_version.setdefault(version, []).append((index, file, table))
    parts: dict[int, pa.Table] = {}
    for version, members in by_version.items():
        sizes = [(file, table.num_rows) for _, file, table in members]
        if version == SCHEMA_VERSION:  # nothing to fill: each file's table as it is
            parts.update((index, table) for index, _, table in members)
            continue
        # one chunk, so that cutting it back into files is O(1) a file (a slice of a many-chunk table
        # walks its chunks: quadratic in the number of files)
        upgraded = upgrade(
            pa.concat_tables([table for _, _, table in members]), version, sizes
        ).combine_chunks()
        offset = 0
        for index, _, table in members:  # cut back into files (zero-copy) to keep file order
            parts[index] = upgraded.slice(offset, table.num_rows)
            offset += table.num_rows
    return pa.concat_tables([parts[i] for i in range(len(files))])


def _claim_jobs(owner: dict[tuple[Any, Any], Path], file: Path, table: pa.Table) -> None:
    """Record which file holds each (study, job_key) of `table`; a job already in another file is refused."""
    for pair in table.select(["study", "job_key"]).group_by(["study", "job_key"]).aggregate([]).to_pylist():
        study, key = pair["study"], pair["job_key"]
        first = owner.setdefault((study, key), file)
        if first != file:
            raise ResultsError(
                f"job {key} of study {study!r} is in two files, {first} and {file}: read one copy of a "
                "study (move a backup out of the folder read)"
            )


def _read(file: Path, columns: list[str] | None = None) -> pa.Table:
    """One file's table (or just `columns` of it); a foreign or broken file is a ResultsError."""
    try:
        with pq.ParquetFile(file) as parquet:  # about twice as fast as pq.read_table on small files
            missing = [name for name in columns or () if name not in parquet.schema_arrow.names]
            if missing:
                raise ResultsError(f"{file}: missing columns {missing}; expected {columns}")
            return parquet.read(columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise ResultsError(f"{file}: not a readable Parquet file ({err})") from err


def _read_validated(file: Path) -> tuple[int, pa.Table]:
    """(schema version, table with exactly that version's columns and types)."""
    table = _read(file)
    version = schema_version(file, table.schema)
    want = SCHEMAS[version]
    present = set(table.column_names)
    missing = [name for name in want.names if name not in present]
    if missing:
        raise ResultsError(
            f"{file}: missing columns {missing} of its schema {version}; expected {want.names}"
        )
    table = table.select(want.names)
    if table.schema.equals(want):  # the common case, without a look at each field
        return version, table
    for field in want:
        got = table.schema.field(field.name).type
        if got != field.type and not pa.types.is_null(got):
            raise ResultsError(f"{file}: column {field.name!r} has type {got}, expected {field.type}")
    return version, table.cast(want)


def _pandas_type(arrow_type: pa.DataType) -> Any:
    """Nullable integer columns stay integers in pandas (block_size=None is common)."""
    if pa.types.is_int64(arrow_type):
        return pd.Int64Dtype()
    return None
