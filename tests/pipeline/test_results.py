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
    remove_temp_files,
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


def test_planning_skips_an_unreadable_file_naming_it(tmp_path: Path, caplog) -> None:
    write_job_rows(tmp_path, "a", [_row("a")])
    write_job_rows(tmp_path, "b", [_row("b")])
    whole = (tmp_path / "b.parquet").read_bytes()
    (tmp_path / "b.parquet").write_bytes(whole[: len(whole) // 2])  # truncated by a full disk
    pq.write_table(pa.table({"x": [1]}), tmp_path / "foreign.parquet")  # someone else's table
    assert job_status(tmp_path) == {"a": "ok"}  # b counts as not done, so it runs again
    assert "b.parquet: not a readable Parquet" in caplog.text
    assert "foreign.parquet: missing columns" in caplog.text


def test_load_results_reads_a_study_not_a_backup_inside_it(tmp_path: Path, caplog) -> None:
    study = tmp_path / "s"
    write_job_rows(study, "a", [_row("a")])
    write_job_rows(study / "backup", "a", [_row("a")])  # a copy of the study kept inside it
    assert load_results(study).job_key.tolist() == ["a"]
    assert job_status(study) == {"a": "ok"}
    assert "['backup'] are not read" in caplog.text
    assert load_results(study / "backup").job_key.tolist() == ["a"]  # the copy itself, read on purpose


def test_one_job_in_two_files_of_one_study_is_refused(tmp_path: Path) -> None:
    write_job_rows(tmp_path / "s", "a", [_row("a")])
    write_job_rows(tmp_path / "s", "copy-of-a", [_row("a")])
    with pytest.raises(ResultsError, match=r"job a of study 's' is in two files, .*a\.parquet and .*copy-of"):
        load_results(tmp_path / "s")
    (tmp_path / "s" / "copy-of-a.parquet").unlink()
    write_job_rows(tmp_path / "t", "a", [_row("a", study="t")])
    frame = load_results(tmp_path)  # a results root: each study's own files, one job in two studies
    assert sorted(frame.study) == ["s", "t"]


def test_temp_files_left_by_a_crash_are_removed(tmp_path: Path) -> None:
    write_job_rows(tmp_path, "a", [_row("a")])
    left = tmp_path / f"{TMP_PREFIX}b-1234abcd.parquet"
    left.write_bytes(b"PAR1 half")
    assert remove_temp_files(tmp_path) == [left]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet"]
