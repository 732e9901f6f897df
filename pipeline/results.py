"""The results store: one Parquet file per finished job under `results/<study>/`, tidy long format.

Pure pandas/pyarrow (no torch, no ray), so `analysis` can read results through `load_results`.
Files are written atomically (temp file in the same folder + `os.replace`), so a crash or kill -9
leaves either the old file or the new one, never half a file; readers skip temp files.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
TMP_PREFIX = ".tmp-"
STATUS_OK = "ok"
STATUS_FAILED = "failed"

SCHEMA = pa.schema(
    [
        ("job_key", pa.string()),
        ("study", pa.string()),
        ("model", pa.string()),  # name_or_path as given (hub id, local dir or ladder member)
        ("model_family", pa.string()),  # e.g. the ladder name or the HF model_type
        ("n_params", pa.int64()),
        ("n_quantized_params", pa.int64()),
        ("n_kept_params", pa.int64()),
        ("dtype", pa.string()),  # quantization data type; "none" for the 16-bit baseline
        ("bits", pa.int64()),
        ("block_size", pa.int64()),  # null: one absmax per tensor
        ("exponent_bits", pa.int64()),  # null unless dtype == "fp"
        ("outlier_fraction", pa.float64()),
        ("centering", pa.bool_()),
        ("bits_per_param", pa.float64()),
        ("total_model_bits", pa.int64()),
        ("task", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("n_examples", pa.int64()),
        ("status", pa.string()),  # "ok" or "failed"
        ("error", pa.string()),
        ("load_s", pa.float64()),  # model load, charged to the first job of a worker
        ("restore_s", pa.float64()),
        ("quantize_s", pa.float64()),
        ("eval_s", pa.float64()),
        ("device", pa.string()),
        ("versions", pa.string()),  # JSON: package versions of the worker
        ("job_json", pa.string()),  # canonical JSON of the job (model, quant, eval)
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)


class ResultsError(ValueError):
    """A results folder or file that does not match the schema."""


def job_path(study_dir: Path, job_key: str) -> Path:
    """Where the rows of one job live."""
    return study_dir / f"{job_key}.parquet"


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts keyed by column) -> a table with exactly SCHEMA; unknown keys are an error."""
    rows = list(rows)
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ResultsError(f"unknown result columns {sorted(unknown)}; allowed: {list(COLUMNS)}")
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    return pa.Table.from_pydict(columns, schema=SCHEMA)


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


def result_files(path: Path) -> list[Path]:
    """Finished result files under `path` (a study folder, a results root, or one file)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith(TMP_PREFIX))


def job_status(study_dir: Path) -> dict[str, str]:
    """job_key -> "ok" | "failed" for every finished job file of a study (cheap: reads two columns)."""
    status: dict[str, str] = {}
    for file in result_files(study_dir) if study_dir.exists() else []:
        table = pq.read_table(file, columns=["job_key", "status"])
        keys, states = table.column("job_key").to_pylist(), table.column("status").to_pylist()
        for key, state in zip(keys, states, strict=True):
            if status.get(key) != STATUS_FAILED:  # any failed row marks the job failed
                status[key] = state
    return status


def load_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read every finished result file under `path` into one DataFrame, validating the schema.

    Raises:
        FileNotFoundError: `path` does not exist.
        ResultsError: no result files, or a file whose columns or types differ from SCHEMA.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"results path {str(root)!r} does not exist")
    files = result_files(root)
    if not files:
        raise ResultsError(f"no result files (*.parquet) under {str(root)!r}")
    tables = [_read_validated(file) for file in files]
    return pa.concat_tables(tables).to_pandas(types_mapper=_pandas_type)


def _read_validated(file: Path) -> pa.Table:
    try:
        table = pq.read_table(file)
    except (pa.ArrowInvalid, OSError) as err:
        raise ResultsError(f"{file}: not a readable Parquet file ({err})") from err
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise ResultsError(f"{file}: missing columns {missing}; expected {list(COLUMNS)}")
    table = table.select(list(COLUMNS))
    for name in COLUMNS:
        got, want = table.schema.field(name).type, SCHEMA.field(name).type
        if got != want and not pa.types.is_null(got):
            raise ResultsError(f"{file}: column {name!r} has type {got}, expected {want}")
    return table.cast(SCHEMA)


def _pandas_type(arrow_type: pa.DataType) -> Any:
    """Nullable integer columns stay integers in pandas (block_size=None is common)."""
    if pa.types.is_int64(arrow_type):
        return pd.Int64Dtype()
    return None
