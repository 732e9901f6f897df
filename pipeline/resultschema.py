"""The results schema and its evolution (`pipeline.results` writes and reads the files).

Each file records its SCHEMA_VERSION in its Parquet metadata (none: schema 1); `upgrade` appends the
columns added since a file's version, filled from `ADDED_COLUMNS`. Fills derived from the row's `job_json`
are exact where the job held the value, at the cost of one JSON parse per distinct job. Pure pyarrow.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 6
SCHEMA_VERSION_KEY = b"kbitscale.schema_version"  # Parquet key-value metadata; absent: schema 1

SCHEMA = pa.schema(
    [
        ("job_key", pa.string()),
        ("study", pa.string()),
        ("model", pa.string()),  # name_or_path as given (hub id, local dir or ladder member)
        ("model_family", pa.string()),  # e.g. the ladder name or the HF model_type
        ("n_params", pa.int64()),
        ("train_tokens", pa.int64()),  # a ladder member's training tokens; null for other models
        ("n_quantized_params", pa.int64()),
        ("n_kept_params", pa.int64()),
        ("dtype", pa.string()),  # quantization data type; "none" for the 16-bit baseline
        ("bits", pa.int64()),
        ("block_size", pa.int64()),  # null: one absmax per tensor
        ("exponent_bits", pa.int64()),  # null unless dtype == "fp"
        ("outlier_fraction", pa.float64()),
        ("centering", pa.bool_()),
        ("method", pa.string()),  # registered quantization method, e.g. "rtn"; "none" iff bits == 16
        ("method_params", pa.string()),  # canonical JSON of the method's parameters off their defaults
        ("quantize_embeddings", pa.bool_()),  # scope: the input embeddings are quantized too
        ("quantize_lm_head", pa.bool_()),  # scope: the output head is quantized too
        # canonical JSON of the calibration (source, n_samples, seq_len, seed, sha256 of the token ids);
        # null for methods without calibration
        ("calibration", pa.string()),
        # mixed precision: canonical JSON of the allocator, target, candidates and layer -> candidate
        # (pipeline/methods/allocation.py); null where every layer has the recipe's codes
        ("allocation", pa.string()),
        ("bits_per_param", pa.float64()),
        ("total_model_bits", pa.int64()),  # adapters' bits included (adapter_bits)
        ("recover", pa.string()),  # recovery adapters trained after quantization: none, lora, vblora
        # canonical JSON of the recovery (settings, sha256 of the training token ids, first and last
        # training loss); null without recovery
        ("recover_params", pa.string()),
        ("adapter_bits", pa.int64()),  # 16 x adapter parameters (in total_model_bits, bits_per_param)
        ("task", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("stderr", pa.float64()),
        ("n_examples", pa.int64()),
        ("scorer", pa.string()),  # lm-eval task rows: the scorer used ("hflm" or "fast"); else null
        ("eval_limit", pa.int64()),  # lm-eval task rows: examples per task (null: all); else null
        ("context_length", pa.int64()),  # perplexity rows: tokens per window; else null
        ("stride", pa.int64()),  # perplexity rows: tokens between window starts; else null
        ("max_tokens", pa.int64()),  # perplexity rows: leading tokens scored (null: all); else null
        # Paired-bootstrap units (pipeline/evals/units.py), null where a metric has none; value = sum(sums)
        # / sum(counts), exp of it on perplexity rows. Perplexity sets: summed NLL (kl_to_16bit: KL) nats
        # and tokens per fixed text chunk (none on bits_per_byte); tasks: per document (or chunk past
        # 2,000) its value (perplexity: NLL) and count 1, in document order
        ("unit_sums", pa.list_(pa.float64())),
        ("unit_counts", pa.list_(pa.float64())),
        ("status", pa.string()),  # "ok" or "failed"
        ("error", pa.string()),
        ("load_s", pa.float64()),  # model load, charged to the first job of a worker
        ("restore_s", pa.float64()),
        ("quantize_s", pa.float64()),
        ("recover_s", pa.float64()),  # adapter training; null without recovery
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


@dataclass(frozen=True)
class FillInput:
    """What a fill may read: one distinct (job_json, task, bits) of rows from an older file."""

    job: Mapping[str, Any]  # the rows' job_json, parsed (canonical JSON of the job)
    task: str | None  # null on a failed row
    bits: int | None


@dataclass(frozen=True)
class AddedColumn:
    """A column added to SCHEMA after schema 1, and its value on rows of files written before."""

    since: int  # the SCHEMA_VERSION that added it
    fill: Callable[[FillInput], Any]  # its value on rows whose file predates `since`


def _evals(row: FillInput) -> Mapping[str, Any]:
    return row.job.get("evals") or {}


def _perplexity_window(row: FillInput) -> Mapping[str, Any]:
    """The evals.perplexity entry named like the row's task ({} when the row is no perplexity row)."""
    entries = _evals(row).get("perplexity") or ()
    return next((entry for entry in entries if entry.get("name") == row.task), {})


def _lm_eval_setting(name: str, default: Any = None) -> Callable[[FillInput], Any]:
    """evals.<name> on lm-eval task rows (task set, not a perplexity name); null on other rows."""

    def fill(row: FillInput) -> Any:
        lm_eval_row = row.task is not None and not _perplexity_window(row)
        return _evals(row).get(name, default) if lm_eval_row else None

    return fill


def _window_setting(name: str) -> Callable[[FillInput], Any]:
    """The perplexity entry's <name> on perplexity rows; null on other rows."""
    return lambda row: _perplexity_window(row).get(name)


def _ladder_tokens(row: FillInput) -> int | None:
    """A ladder member's training tokens where its label pins them: `ladder:<name>/<size>@<hash>` of a
    registered ladder whose config hash still starts with <hash> (one member per size; no ladder kept
    several before schema 6); null for other models and for retuned, reseeded or smoke ladders."""
    from pipeline.ladders.configs import LADDER_PREFIX, LADDERS, config_hash

    label = str((row.job.get("model") or {}).get("name_or_path") or "")
    body, at, version = label.removeprefix(LADDER_PREFIX).rpartition("@")
    config = LADDERS.get(body.partition("/")[0]) if label.startswith(LADDER_PREFIX) and at else None
    if config is None or config.keep_tokens or not config_hash(config).startswith(version):
        return None
    return config.tokens


def _scope(name: str) -> Callable[[FillInput], bool]:
    """model.<name> of the job (False where the job predates the field)."""
    return lambda row: bool((row.job.get("model") or {}).get(name, False))


# Every column added after schema 1: the next schema change adds one entry here (and bumps
# SCHEMA_VERSION); `load_results` fills it on rows of older files. Schema 1 knew one method,
# round-to-nearest ("rtn"), with no parameters; the unquantized baseline ran at 16 bits.
ADDED_COLUMNS: dict[str, AddedColumn] = {
    "method": AddedColumn(2, lambda row: "none" if row.bits == 16 else "rtn"),
    "method_params": AddedColumn(2, lambda row: "{}"),
    "quantize_embeddings": AddedColumn(2, _scope("quantize_embeddings")),
    "quantize_lm_head": AddedColumn(2, _scope("quantize_lm_head")),
    "calibration": AddedColumn(2, lambda row: None),  # no method calibrated before schema 2
    "scorer": AddedColumn(2, _lm_eval_setting("scorer", "hflm")),  # jobs before `scorer` ran HFLM
    "eval_limit": AddedColumn(2, _lm_eval_setting("limit")),
    "context_length": AddedColumn(2, _window_setting("context_length")),
    "stride": AddedColumn(2, _window_setting("stride")),
    "max_tokens": AddedColumn(2, _window_setting("max_tokens")),
    "unit_sums": AddedColumn(3, lambda row: None),  # no job recorded units before schema 3
    "unit_counts": AddedColumn(3, lambda row: None),
    "recover": AddedColumn(4, lambda row: "none"),  # no job trained adapters before schema 4
    "recover_params": AddedColumn(4, lambda row: None),
    "adapter_bits": AddedColumn(4, lambda row: 0),
    "recover_s": AddedColumn(4, lambda row: None),
    "allocation": AddedColumn(5, lambda row: None),  # every job before schema 5 was uniform
    "train_tokens": AddedColumn(6, lambda row: _ladder_tokens(row)),
}
assert set(ADDED_COLUMNS) <= set(COLUMNS), "every added column is in SCHEMA"
assert all(1 < c.since <= SCHEMA_VERSION for c in ADDED_COLUMNS.values()), "added in 2..SCHEMA_VERSION"


def schema_columns(version: int) -> tuple[str, ...]:
    """The columns a file written under schema `version` holds, in SCHEMA order."""
    if not 1 <= version <= SCHEMA_VERSION:
        raise ValueError(f"schema version {version!r} unknown; known: 1..{SCHEMA_VERSION}")
    return tuple(n for n in COLUMNS if n not in ADDED_COLUMNS or ADDED_COLUMNS[n].since <= version)


SCHEMAS = {  # schema version -> the Arrow schema its files hold
    v: pa.schema([SCHEMA.field(n) for n in schema_columns(v)]) for v in range(1, SCHEMA_VERSION + 1)
}


def schema_version(file: Path, schema: pa.Schema) -> int:
    """The schema version a file was written under (1 when its metadata has none)."""
    raw = (schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    if raw is None:
        return 1
    try:
        version = int(raw)
    except ValueError:
        version = -1
    if not 1 <= version <= SCHEMA_VERSION:
        raise ResultsError(
            f"{file}: schema version {raw!r} unknown; this code reads 1..{SCHEMA_VERSION} "
            "(a newer kbitscale may have written it)"
        )
    return version


def upgrade(table: pa.Table, version: int, sizes: Sequence[tuple[Path, int]]) -> pa.Table:
    """Append the columns added after `version`, filled per distinct (job_json, task, bits).

    `table` is the files of `sizes` (file, row count) concatenated in order; they name a bad file.
    """
    added = [name for name, column in ADDED_COLUMNS.items() if column.since > version]
    if not added:
        return table
    inputs, row_input = _fill_inputs(table, sizes)
    for name in added:
        field = SCHEMA.field(name)
        values = pa.array([ADDED_COLUMNS[name].fill(row) for row in inputs], type=field.type)
        table = table.append_column(field, values.take(row_input))
    return table.select(list(COLUMNS))


def _fill_inputs(table: pa.Table, sizes: Sequence[tuple[Path, int]]) -> tuple[list[FillInput], pa.Array]:
    """The distinct (job_json, task, bits) of `table` as FillInputs, and each row's index into them.

    Vectorized: each column is dictionary-encoded, the codes combined, and only the distinct
    combinations (about one per job and task) reach Python; each distinct job_json is parsed once.
    """
    codes, values = [], []
    for name in ("job_json", "task", "bits"):
        encoded = pc.dictionary_encode(table.column(name).combine_chunks(), null_encoding="encode")
        codes.append(encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64))
        values.append(encoded.dictionary.to_pylist())
    jobs = [_parse_job(text) for text in values[0]]
    for code, job in enumerate(jobs):
        if job is None:
            file = _file_of_row(sizes, int(np.argmax(codes[0] == code)))
            raise ResultsError(
                f"{file}: job_json {str(values[0][code])[:80]!r} is no JSON object; "
                f"the columns added since the file's schema are filled from it: {list(ADDED_COLUMNS)}"
            )
    n_tasks, n_bits = len(values[1]), len(values[2])
    distinct, row_input = np.unique((codes[0] * n_tasks + codes[1]) * n_bits + codes[2], return_inverse=True)
    inputs = []
    for combined in distinct.tolist():
        job_code, rest = divmod(combined, n_tasks * n_bits)
        task_code, bits_code = divmod(rest, n_bits)
        inputs.append(FillInput(jobs[job_code], values[1][task_code], values[2][bits_code]))
    return inputs, pa.array(row_input.reshape(-1))


def _parse_job(text: str | None) -> dict[str, Any] | None:
    """A job_json parsed; None when it is null, no JSON, or no JSON object."""
    try:
        job = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
    return job if isinstance(job, dict) else None


def _file_of_row(sizes: Sequence[tuple[Path, int]], row: int) -> Path:
    """The file that row `row` of the concatenated `sizes` files came from."""
    ends = np.cumsum([n_rows for _, n_rows in sizes])
    return sizes[int(np.searchsorted(ends, row, side="right"))][0]
