"""Per-job evaluation units of a metric column, and their paired bootstrap replicates (`JobDraws`).

Result rows may carry two list columns, `unit_sums` and `unit_counts`: a perplexity row's summed NLL
and scored tokens over a fixed partition of its text into chunks (identical across configurations of
one model and text, so chunk i pairs across jobs), an accuracy row's correct answers and documents per
document or per contiguous chunk of documents. A row's value is sum(sums) / sum(counts) (perplexity:
exp of it). Rows without them (results written before they existed, or nulls) get no replicates, and
every comparison that needs one says that no paired CI is available; none is ever made up.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.metrics import MEAN_ACC, split_variant
from analysis.paired import interval, ratio_draws, resample_weights
from analysis.tidy import mean_acc_parts, metric_rows

log = logging.getLogger(__name__)

UNIT_COLUMNS: tuple[str, str] = ("unit_sums", "unit_counts")
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"perplexity": np.exp}  # value = f(ratio)
# bits_per_byte rows carry their text's NLL units, but their value divides by bytes, not tokens: no
# replicates for them (a chunk's bytes are not recorded), and no warning either
NO_UNITS_METRICS = frozenset({"bits_per_byte"})
VALUE_RTOL = 1e-6  # units must reproduce the row's value this closely, or they are not used


@dataclass(frozen=True)
class JobDraws:
    """values[i, 0]: job i's metric from its units; values[i, 1:]: its bootstrap replicates, drawn with
    the same unit indices for every job (so differences between any jobs are paired)."""

    index: Mapping[str, int]  # job_key -> row of values
    values: np.ndarray  # (n_jobs, 1 + n_boot)

    @property
    def n_boot(self) -> int:
        return int(self.values.shape[1] - 1)

    def for_groups(self, groups: Sequence[Sequence[str]]) -> np.ndarray:
        """(n_groups, 1 + n_boot): each group's mean over its jobs; a NaN row where a job has no units."""
        out = np.full((len(groups), self.values.shape[1]), np.nan)
        for g, keys in enumerate(groups):
            if keys and all(k in self.index for k in keys):
                out[g] = self.values[[self.index[k] for k in keys]].mean(axis=0)
        return out


def unit_rows(raw: pd.DataFrame) -> pd.DataFrame:
    """job_key, column, sums, counts of every finished metric row whose units reproduce its value.

    Rows with units that do not (another transform, a broken writer) are left out with a warning.
    """
    empty = pd.DataFrame(columns=["job_key", "column", "sums", "counts"])
    if not all(c in raw for c in UNIT_COLUMNS):
        return empty
    rows = metric_rows(raw)
    has_units = rows["unit_sums"].notna() & rows["unit_counts"].notna()
    rows = rows[has_units & ~rows["metric"].isin(NO_UNITS_METRICS)]
    kept = _checked_rows(rows)
    found = [k for k in kept if k is not None]
    if len(found) < len(kept):
        log.warning("%d rows carry units that do not reproduce their value: no paired CI from them",
                    len(kept) - len(found))  # fmt: skip
    return pd.DataFrame(found, columns=empty.columns) if found else empty


def _checked_rows(rows: pd.DataFrame) -> list[tuple[str, str, np.ndarray, np.ndarray] | None]:
    """`_checked` of every row, in order: rows whose sums and counts have one length L are checked
    together as (m, L) arrays (a study's rows share a few partitions), any other row on its own."""
    cols = ["job_key", "column", "metric", "value", "unit_sums", "unit_counts"]
    records = list(zip(*(rows[c] for c in cols), strict=True))
    kept: list[tuple[str, str, np.ndarray, np.ndarray] | None] = [None] * len(records)
    by_length: dict[int, list[int]] = {}
    for i, (*_, unit_sums, unit_counts) in enumerate(records):
        n = _flat_length(unit_sums)
        if n is not None and n == _flat_length(unit_counts) and n > 0:
            by_length.setdefault(n, []).append(i)
        else:
            kept[i] = _checked(*records[i])  # malformed or empty: the per-row check says so
    for members in by_length.values():
        sums = np.array([np.asarray(records[i][4], dtype=float) for i in members])
        counts = np.array([np.asarray(records[i][5], dtype=float) for i in members])
        ok = _units_reproduce(
            sums, counts, [records[i][2] for i in members], [records[i][3] for i in members]
        )
        for j, i in enumerate(members):
            if ok[j]:
                kept[i] = (records[i][0], records[i][1], sums[j], counts[j])
    return kept


def _flat_length(values: object) -> int | None:
    """The length of a one-dimensional list of numbers, else None."""
    array = np.asarray(values)
    return len(array) if array.ndim == 1 and array.dtype != object else None


def _units_reproduce(
    sums: np.ndarray, counts: np.ndarray, metrics: list[str], values: list[float]
) -> np.ndarray:
    """(m,) whether each row's units are well formed and reproduce its value (`_checked`, vectorised)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ratio = sums.sum(axis=1) / counts.sum(axis=1)
        for metric, transform in TRANSFORMS.items():
            mask = np.array([m == metric for m in metrics])
            ratio[mask] = transform(ratio[mask])
        value = np.array(values, dtype=float)
        close = np.abs(ratio - value) <= VALUE_RTOL * np.maximum(1.0, np.abs(value))
    wellformed = np.isfinite(sums).all(axis=1) & (counts >= 0).all(axis=1) & (counts.sum(axis=1) > 0)
    return wellformed & close


def _checked(
    job_key: str, column: str, metric: str, value: float, unit_sums: object, unit_counts: object
) -> tuple[str, str, np.ndarray, np.ndarray] | None:
    """(job_key, column, sums, counts) if the units are well formed and reproduce `value`, else None."""
    sums = np.asarray(unit_sums, dtype=float)
    counts = np.asarray(unit_counts, dtype=float)
    if sums.ndim != 1 or sums.shape != counts.shape or not len(sums) or not np.all(np.isfinite(sums)):
        return None
    if not np.all(counts >= 0) or not counts.sum() > 0:
        return None
    ratio = TRANSFORMS.get(metric, lambda r: r)(sums.sum() / counts.sum())
    if abs(ratio - float(value)) > VALUE_RTOL * max(1.0, abs(float(value))):
        return None
    return job_key, column, sums, counts


def job_draws(
    raw: pd.DataFrame, metric: str, tasks: Sequence[str], n_boot: int, seed: int = 0
) -> JobDraws | None:
    """The paired replicates of `metric` for every job whose rows carry units; None if no job has them.

    A mean accuracy column averages its tasks' replicates (documents of different tasks drawn
    independently). The indices come from (seed, text set or task), so every caller that asks for the
    same column gets the same draws, sections of one report agree, and the metrics of one text set
    (cross-entropy, perplexity, KL) are drawn on the same chunks.
    """
    units = unit_rows(raw)
    if units.empty:
        return None
    if split_variant(metric)[0] == MEAN_ACC:
        parts = mean_acc_parts(list(metric_rows(raw)["column"].unique()), tasks).get(metric)
        if not parts:
            return None
        found = [_column_draws(units, c, n_boot, seed) for c in parts]
        return _mean_of([d for d in found if d is not None]) if all(d is not None for d in found) else None
    return _column_draws(units, metric, n_boot, seed)


def _column_draws(units: pd.DataFrame, column: str, n_boot: int, seed: int) -> JobDraws | None:
    rows = units[units["column"] == column].drop_duplicates("job_key")
    if rows.empty:
        return None
    lengths = rows["sums"].map(len)
    if lengths.nunique() > 1:
        log.warning("%s: jobs hold %s units: they were not scored on one partition, no paired CI",
                    column, sorted(lengths.unique().tolist()))  # fmt: skip
        return None
    text = column.split("_", 1)[1]  # ce_/ppl_/kl_ of one text set (and acc_ of one task) share draws
    rng = np.random.default_rng([seed, zlib.crc32(text.encode())])
    weights = resample_weights(int(lengths.iloc[0]), n_boot, rng)
    values = ratio_draws(np.vstack(rows["sums"].tolist()), np.vstack(rows["counts"].tolist()), weights)
    metric = column.split("_", 1)[0]
    if metric == "ppl":
        values = np.exp(values)
    return JobDraws({k: i for i, k in enumerate(rows["job_key"])}, values)


def _mean_of(parts: list[JobDraws]) -> JobDraws | None:
    """The mean over task columns, for the jobs that have every one of them."""
    keys = [k for k in parts[0].index if all(k in p.index for p in parts[1:])]
    if not keys:
        return None
    values = np.mean([p.values[[p.index[k] for k in keys]] for p in parts], axis=0)
    return JobDraws({k: i for i, k in enumerate(keys)}, values)


def paired_gains(
    draws: JobDraws | None, keys_a: Sequence[Sequence[str]], keys_b: Sequence[Sequence[str]], sign: float
) -> np.ndarray | None:
    """(n, 1 + n_boot): sign × (A − B) per pair from paired replicates (A and B: groups of job keys,
    averaged); NaN rows where a side has no units; None without draws."""
    if draws is None or draws.n_boot == 0:
        return None
    return sign * (draws.for_groups(keys_a) - draws.for_groups(keys_b))


def gain_intervals(gains: np.ndarray | None, n: int, prefix: str = "gain") -> pd.DataFrame:
    """Per row of `gains` (see `paired_gains`): `<prefix>_ci_low`, `<prefix>_ci_high` and `decisive`
    (the CI excludes 0; None where there is no CI)."""
    if gains is None:
        low = high = np.full(n, np.nan)
    else:
        low, high = interval(gains)
    decisive = [None if np.isnan(lo) else bool(lo > 0 or hi < 0) for lo, hi in zip(low, high, strict=True)]
    return pd.DataFrame({f"{prefix}_ci_low": low, f"{prefix}_ci_high": high, "decisive": decisive})
