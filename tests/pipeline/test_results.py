from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.results import (
    COLUMNS,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    TMP_PREFIX,
    ResultsError,
    job_status,
    load_results,
    write_job_rows,
)


def _row(job_key: str, metric: str = "perplexity", value: float = 12.5, **extra: object) -> dict:
    row = {
        "job_key": job_key,
        "study": "s",
        "model": "m",
        "dtype": "fp",
        "bits": 4,
        "block_size": None,
        "task": "wikitext2",
        "metric": metric,
        "value": value,
        "status": "ok",
        "created_at": datetime.now(UTC),
    }
    return row | extra


def test_rows_round_trip_with_the_schema_and_its_version(tmp_path: Path) -> None:
    path = write_job_rows(tmp_path, "a", [_row("a"), _row("a", "bits_per_byte", 1.1)])
    write_job_rows(tmp_path, "b", [_row("b", block_size=64)])
    assert pq.read_metadata(path).metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()
    frame = load_results(tmp_path)
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == 3
    assert frame["method"].isna().all()  # a key the writer left out is null, never filled
    assert frame["block_size"].dtype == pd.Int64Dtype()
    assert frame.loc[frame.job_key == "b", "block_size"].iloc[0] == 64
    assert frame.loc[frame.job_key == "a", "block_size"].isna().all()


def test_rewriting_a_job_replaces_it_and_temp_files_are_ignored(tmp_path: Path) -> None:
    write_job_rows(tmp_path, "a", [_row("a", status="failed", error="boom")])
    assert job_status(tmp_path) == {"a": "failed"}
    write_job_rows(tmp_path, "a", [_row("a")])
    (tmp_path / f"{TMP_PREFIX}half-written.parquet").write_bytes(b"PAR1 truncated")
    assert job_status(tmp_path) == {"a": "ok"}
    assert len(load_results(tmp_path)) == 1


def test_unknown_column_is_rejected_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="bogus"):
        write_job_rows(tmp_path, "a", [_row("a", bogus=1)])
    assert not any(tmp_path.iterdir())


def test_bad_folders_and_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(tmp_path / "nope")
    with pytest.raises(ResultsError, match="no result files"):
        load_results(tmp_path)
    pq.write_table(pa.table({"job_key": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(ResultsError, match="missing columns"):
        load_results(tmp_path)
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(ResultsError, match="not a readable Parquet"):
        load_results(tmp_path)
