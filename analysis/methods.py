"""Quantization methods against round-to-nearest, paired by model: the report's "methods" section.

Each job of a method other than `rtn` is matched with the `rtn` job of the same model, bits, data type,
exponent bits, block size, outlier fraction, centering and scope. Both were scored on the same tokens by
the same trained weights, so the comparison is paired: with per-unit data (`analysis.units`) each gain
gets a paired bootstrap CI (the same chunks or documents resampled for both jobs), and per (method,
data type, block size, bits) the table gives the mean of each side over models, the mean gain with its
paired CI, in how many models the method wins, and in how many it wins or loses decisively. Without
per-unit data the CI columns are empty: no CI is available, and none is made up.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.metrics import check_metric, higher_is_better
from analysis.paired import interval
from analysis.tidy import SCOPE_COLUMNS, method_labels, with_method
from analysis.units import JobDraws, gain_intervals, paired_gains

PAIR_COLUMNS = ["model", "bits", "dtype", "exponent_bits", "block_size", "outlier_fraction", "centering",
                *SCOPE_COLUMNS]  # fmt: skip
BASE_METHOD = "rtn"


def method_pairs(
    tidy: pd.DataFrame, metric: str, bits: tuple[int, ...] = (3, 4), draws: JobDraws | None = None
) -> pd.DataFrame:
    """One row per (non-rtn job, its rtn match): both values and the gain (positive: the method is
    better), with its paired CI (`gain_ci_low`, `gain_ci_high`, `decisive`; empty without `draws`).

    Raises:
        AnalysisError: `metric` has no values, or no job of another method has an rtn match at `bits`.
    """
    check_metric(tidy, metric)
    jobs = with_method(tidy)
    jobs = jobs[jobs["bits"].isin(bits) & jobs[metric].notna()].assign(method_label=method_labels(jobs))
    keys = jobs[PAIR_COLUMNS].astype(object).where(jobs[PAIR_COLUMNS].notna(), "none")
    jobs = jobs.assign(**{c: keys[c] for c in PAIR_COLUMNS})
    base = jobs[jobs["method"] == BASE_METHOD][[*PAIR_COLUMNS, metric, "job_key"]].rename(
        columns={metric: "rtn", "job_key": "rtn_job_key"}
    )
    other = jobs[~jobs["method"].isin([BASE_METHOD, "none"])]
    if other.empty:
        raise AnalysisError(f"every quantized job at bits {list(bits)} is rtn: no other method to compare")
    pairs = other[[*PAIR_COLUMNS, "method_label", "n_params", metric, "job_key"]].merge(base, on=PAIR_COLUMNS)
    if pairs.empty:
        raise AnalysisError(f"no job of another method has an rtn match at bits {list(bits)}")
    sign = 1.0 if higher_is_better(metric) else -1.0
    pairs = pairs.rename(columns={metric: "method_value", "method_label": "method"}).reset_index(drop=True)
    pairs["gain"] = sign * (pairs["method_value"] - pairs["rtn"])
    gains = _gains(pairs, draws, sign)
    return pd.concat([pairs, gain_intervals(gains, len(pairs))], axis=1)


def _gains(pairs: pd.DataFrame, draws: JobDraws | None, sign: float) -> np.ndarray | None:
    return paired_gains(draws, [[k] for k in pairs["job_key"]], [[k] for k in pairs["rtn_job_key"]], sign)


def method_summary(pairs: pd.DataFrame, draws: JobDraws | None = None) -> pd.DataFrame:
    """Per (method, bits, data type, block size): mean rtn and method values over models, the mean
    gain (positive: the method is better) with its paired CI (empty without `draws`), in how many
    models the method wins, and in how many its win or loss is decisive by the paired test."""
    sign = 1.0 if np.allclose(pairs["gain"], pairs["method_value"] - pairs["rtn"]) else -1.0
    gains = _gains(pairs, draws, sign)
    rows = []
    for (method, bits, dtype, block), group in pairs.groupby(["method", "bits", "dtype", "block_size"]):
        mean_gain = gains[group.index].mean(axis=0) if gains is not None else np.full(1, np.nan)
        low, high = interval(mean_gain) if not np.isnan(mean_gain).any() else (np.nan, np.nan)
        decisive = group["decisive"].dropna()
        rows.append({
            "method": method, "bits": bits, "dtype": dtype, "block_size": block,
            "rtn": group["rtn"].mean(), "method_value": group["method_value"].mean(),
            "gain": round(float(group["gain"].mean()), 6),
            "gain_ci_low": float(low), "gain_ci_high": float(high),
            "wins": f"{int((group['gain'] > 0).sum())} of {len(group)}",
            "decisive": _decisive_counts(group, decisive),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _decisive_counts(group: pd.DataFrame, decisive: pd.Series) -> str:
    """'3 wins, 0 losses of 4' by the paired test, or 'no CI' where no pair has one."""
    if decisive.empty:
        return "no CI"
    won = int((decisive.astype(bool) & (group.loc[decisive.index, "gain"] > 0)).sum())
    lost = int((decisive.astype(bool) & (group.loc[decisive.index, "gain"] < 0)).sum())
    return f"{won} wins, {lost} losses of {len(decisive)}"
