"""Schema evolution: files of every earlier schema still load, with the added columns filled.

`tests/fixtures/results-v1/` holds six real files written by the schema-1 code (never rewrite them).
"""

import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.results import (
    ADDED_COLUMNS,
    COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    ResultsError,
    job_status,
    load_results,
    schema_columns,
    write_job_rows,
)

V1_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "results-v1"
V1_FILES = sorted(V1_DIR.glob("*.parquet"))
EVAL_COLUMNS = ["scorer", "eval_limit", "context_length", "stride", "max_tokens"]


def _v2_row(job_key: str, task: str | None, **extra: object) -> dict:
    row = {
        "job_key": job_key,
        "study": "s",
        "model": "m",
        "dtype": "int",
        "bits": 3,
        "method": "gptq",
        "method_params": '{"damp":0.01}',
        "quantize_embeddings": True,
        "quantize_lm_head": False,
        "task": task,
        "metric": "acc",
        "value": 0.5,
        "scorer": "fast",
        "eval_limit": None,
        "status": "ok",
        "job_json": "{}",
        "created_at": datetime.now(UTC),
    }
    return row | extra


def _v1_job_json(**evals: object) -> str:
    """A schema-1 job_json, canonical like the old code wrote it, with `evals` overriding fields."""
    window = {"context_length": 256, "max_tokens": None, "name": "c4", "path": "c4.txt", "stride": 64}
    job = {
        "evals": {"batch_size": 8, "limit": None, "perplexity": [window], "tasks": ["piqa"]} | evals,
        "model": {"name_or_path": "m", "quantize_embeddings": True, "quantize_lm_head": True},
        "outlier_fraction": 0.0,
        "quant": {"bits": 4, "block_size": 64, "centering": False, "dtype": "int", "exponent_bits": None},
        "schema_version": 1,
    }
    return json.dumps(job, sort_keys=True, separators=(",", ":"))


def _write_v1(path: Path, rows: list[dict]) -> None:
    """A file as the schema-1 code wrote it: its columns only, no version metadata."""
    schema = pa.schema([SCHEMA.field(name) for name in schema_columns(1)])
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), path)


def test_v1_fixtures_load_with_every_column() -> None:
    assert len(V1_FILES) == 6
    frame = load_results(V1_DIR)
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == 30 and frame["job_key"].nunique() == 6
    assert frame["eval_limit"].dtype == pd.Int64Dtype()


def test_v1_fixture_fills_follow_bits_and_job_json() -> None:
    frame = load_results(V1_DIR)
    baseline = frame["bits"] == 16
    assert baseline.sum() == 5 and (frame.loc[baseline, "dtype"] == "none").all()
    assert (frame.loc[baseline, "method"] == "none").all()
    assert (frame.loc[~baseline, "method"] == "rtn").all()
    assert (frame["method_params"] == "{}").all()
    assert not frame["quantize_embeddings"].any() and not frame["quantize_lm_head"].any()
    wikitext = frame[frame["task"] == "wikitext2"]
    lambada = frame[frame["task"] == "lambada_openai"]
    assert len(wikitext) == 18 and len(lambada) == 12
    assert (wikitext["context_length"] == 128).all() and (wikitext["stride"] == 128).all()
    assert (wikitext["max_tokens"] == 1024).all()
    assert wikitext["scorer"].isna().all() and wikitext["eval_limit"].isna().all()
    assert (lambada["scorer"] == "hflm").all() and (lambada["eval_limit"] == 8).all()
    assert lambada[["context_length", "stride", "max_tokens"]].isna().all().all()


def test_v1_fixture_values_equal_a_plain_pyarrow_read() -> None:
    int64_nullable = {pa.int64(): pd.Int64Dtype()}.get
    plain = pa.concat_tables([pq.read_table(f) for f in V1_FILES]).to_pandas(types_mapper=int64_nullable)
    loaded = load_results(V1_DIR)
    v1 = list(schema_columns(1))
    assert list(plain.columns) == v1
    pd.testing.assert_frame_equal(loaded[v1], plain[v1])


def test_v1_fill_rules_on_failed_rows_scope_and_old_eval_specs(tmp_path: Path) -> None:
    """A failed row gets null eval settings; a job_json from before `scorer` reads "hflm"."""
    base = {"study": "s", "bits": 4, "status": "ok", "metric": "acc", "value": 0.5}
    rows = [
        base | {"job_key": "a", "task": "piqa", "job_json": _v1_job_json()},
        base | {"job_key": "a", "task": "c4", "job_json": _v1_job_json()},
        base | {"job_key": "b", "task": "piqa", "job_json": _v1_job_json(scorer="fast", limit=50)},
        base | {"job_key": "c", "task": None, "status": "failed", "job_json": _v1_job_json(scorer="fast")},
    ]
    _write_v1(tmp_path / "old.parquet", rows)
    frame = load_results(tmp_path).set_index("job_key")
    assert frame["quantize_embeddings"].all() and frame["quantize_lm_head"].all()
    assert (frame["method"] == "rtn").all()
    piqa, c4 = frame[frame["task"] == "piqa"], frame[frame["task"] == "c4"]
    assert piqa.loc["a", "scorer"] == "hflm" and pd.isna(piqa.loc["a", "eval_limit"])
    assert piqa.loc["b", "scorer"] == "fast" and piqa.loc["b", "eval_limit"] == 50
    assert c4[["context_length", "stride"]].iloc[0].tolist() == [256, 64]
    assert pd.isna(c4["max_tokens"].iloc[0]) and pd.isna(c4["scorer"].iloc[0])
    assert frame.loc["c", EVAL_COLUMNS].isna().all()


def test_v2_file_round_trips_and_carries_its_version(tmp_path: Path) -> None:
    path = write_job_rows(tmp_path, "k", [_v2_row("k", "piqa"), _v2_row("k", None, status="failed")])
    assert pq.read_metadata(path).metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()
    frame = load_results(tmp_path)
    assert list(frame.columns) == list(COLUMNS)
    assert frame["method"].tolist() == ["gptq", "gptq"]  # written values, never filled
    assert frame["method_params"].tolist() == ['{"damp":0.01}'] * 2
    assert frame["scorer"].tolist() == ["fast", "fast"]
    assert frame["quantize_embeddings"].all() and not frame["quantize_lm_head"].any()
    assert frame["eval_limit"].isna().all()


def test_mixed_folder_of_v1_and_v2_files_loads_in_file_order(tmp_path: Path) -> None:
    write_job_rows(tmp_path, "0000", [_v2_row("0000", "piqa")])
    for file in V1_FILES:
        shutil.copy(file, tmp_path / file.name)
    write_job_rows(tmp_path, "ffff", [_v2_row("ffff", "piqa"), _v2_row("ffff", "arc_easy")])
    frame = load_results(tmp_path)
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) == 33
    assert frame["job_key"].iloc[0] == "0000" and (frame["job_key"].iloc[-2:] == "ffff").all()
    assert frame["method"].tolist() == ["gptq"] + ["rtn"] * 25 + ["none"] * 5 + ["gptq"] * 2
    assert frame["scorer"].iloc[[0, 4, 5, -1]].tolist() == ["fast", "hflm", "hflm", "fast"]
    assert job_status(tmp_path) == {key: "ok" for key in ["0000", "ffff", *(f.stem for f in V1_FILES)]}


def test_a_file_missing_a_column_of_its_own_schema_is_refused(tmp_path: Path) -> None:
    v1 = pq.read_table(V1_FILES[0])
    pq.write_table(v1.drop_columns(["n_examples"]), tmp_path / "old.parquet")
    with pytest.raises(ResultsError, match=r"old\.parquet: missing columns \['n_examples'\] of its schema 1"):
        load_results(tmp_path)
    (tmp_path / "old.parquet").unlink()
    path = write_job_rows(tmp_path, "new", [_v2_row("new", "piqa")])
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["method", "scorer"]), path)  # keeps the version metadata
    with pytest.raises(ResultsError, match=r"new\.parquet: missing columns \['method', 'scorer'\]"):
        load_results(tmp_path)


def test_unknown_versions_and_broken_job_json_are_refused_naming_the_file(tmp_path: Path) -> None:
    table = pq.read_table(V1_FILES[0])
    unknown = rf"x\.parquet: schema version .* unknown; this code reads 1\.\.{SCHEMA_VERSION}"
    for version in (str(SCHEMA_VERSION + 1).encode(), b"two"):
        pq.write_table(table.replace_schema_metadata({SCHEMA_VERSION_KEY: version}), tmp_path / "x.parquet")
        with pytest.raises(ResultsError, match=unknown):
            load_results(tmp_path)
    shutil.copy(V1_FILES[1], tmp_path / "a.parquet")
    broken = table.set_column(
        table.schema.get_field_index("job_json"), "job_json", pa.array(["{not json"] * table.num_rows)
    )
    pq.write_table(broken, tmp_path / "x.parquet")
    with pytest.raises(ResultsError, match=r"x\.parquet: job_json '\{not json' is no JSON object"):
        load_results(tmp_path)


def test_job_status_reads_the_v1_fixture_folder() -> None:
    assert job_status(V1_DIR) == {file.stem: "ok" for file in V1_FILES}


def test_job_status_names_a_file_without_its_columns(tmp_path: Path, caplog) -> None:
    pq.write_table(pa.table({"job_key": ["x"]}), tmp_path / "x.parquet")
    assert job_status(tmp_path) == {}  # skipped with a warning, never counted as done (issue 16)
    assert re.search(r"x\.parquet: missing columns \['status'\]", caplog.text)


def test_added_columns_table_matches_the_schema() -> None:
    assert set(ADDED_COLUMNS) <= set(COLUMNS)
    assert all(2 <= column.since <= SCHEMA_VERSION for column in ADDED_COLUMNS.values())
    assert schema_columns(SCHEMA_VERSION) == COLUMNS
    assert set(schema_columns(1)) == set(COLUMNS) - set(ADDED_COLUMNS)
    with pytest.raises(ValueError, match=rf"schema version 0 unknown; known: 1\.\.{SCHEMA_VERSION}"):
        schema_columns(0)


def _write_version(path: Path, rows: list[dict], version: int) -> None:
    """A file as the schema-`version` code wrote it: its columns and its version in the metadata."""
    schema = pa.schema([SCHEMA.field(name) for name in schema_columns(version)])
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    pq.write_table(table.replace_schema_metadata({SCHEMA_VERSION_KEY: str(version).encode()}), path)


def test_v3_units_round_trip_as_lists_and_older_files_read_null(tmp_path: Path) -> None:
    sums, counts = [3.5, 2.25, 4.0], [2.0, 1.0, 2.0]
    units = {"unit_sums": sums, "unit_counts": counts, "metric": "nats_per_token", "value": 9.75 / 5}
    write_job_rows(tmp_path, "b-new", [_v2_row("b-new", "wiki", **units), _v2_row("b-new", "piqa")])
    _write_version(tmp_path / "a-v2.parquet", [_v2_row("a-v2", "piqa")], 2)
    shutil.copy(V1_FILES[0], tmp_path / "c-v1.parquet")
    frame = load_results(tmp_path)
    assert list(frame.columns) == list(COLUMNS) and SCHEMA_VERSION >= 3
    assert frame["job_key"].tolist()[:3] == ["a-v2", "b-new", "b-new"]
    new = frame.iloc[1]
    assert list(new["unit_sums"]) == sums and list(new["unit_counts"]) == counts
    assert new["value"] == sum(new["unit_sums"]) / sum(new["unit_counts"])
    assert (
        frame["unit_sums"].isna().sum() == len(frame) - 1
        and frame["unit_counts"].isna().sum() == len(frame) - 1
    )
    assert ADDED_COLUMNS["unit_sums"].since == ADDED_COLUMNS["unit_counts"].since == 3
