"""Quantization methods against round-to-nearest, paired by model: the report's "methods" section.

Each job of a method other than `rtn` is matched with the `rtn` job of the same model, bits, data type,
exponent bits, block size, outlier fraction, centering and scope. Both were scored on the same tokens by
the same trained weights, so the comparison is paired: per (method, data type, block size, bits) the
table gives the mean of each side over models, the mean gain, and in how many models the method wins.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.metrics import check_metric, higher_is_better
from analysis.tidy import SCOPE_COLUMNS, method_labels, with_method

PAIR_COLUMNS = ["model", "bits", "dtype", "exponent_bits", "block_size", "outlier_fraction", "centering",
                *SCOPE_COLUMNS]  # fmt: skip
BASE_METHOD = "rtn"


def method_pairs(tidy: pd.DataFrame, metric: str, bits: tuple[int, ...] = (3, 4)) -> pd.DataFrame:
    """One row per (non-rtn job, its rtn match): both values and the gain (positive: the method is better).

    Raises:
        AnalysisError: `metric` has no values, or no job of another method has an rtn match at `bits`.
    """
    check_metric(tidy, metric)
    jobs = with_method(tidy)
    jobs = jobs[jobs["bits"].isin(bits) & jobs[metric].notna()].assign(method_label=method_labels(jobs))
    keys = jobs[PAIR_COLUMNS].astype(object).where(jobs[PAIR_COLUMNS].notna(), "none")
    jobs = jobs.assign(**{c: keys[c] for c in PAIR_COLUMNS})
    base = jobs[jobs["method"] == BASE_METHOD][[*PAIR_COLUMNS, metric]].rename(columns={metric: "rtn"})
    other = jobs[~jobs["method"].isin([BASE_METHOD, "none"])]
    if other.empty:
        raise AnalysisError(f"every quantized job at bits {list(bits)} is rtn: no other method to compare")
    pairs = other[[*PAIR_COLUMNS, "method_label", "n_params", metric]].merge(base, on=PAIR_COLUMNS)
    if pairs.empty:
        raise AnalysisError(f"no job of another method has an rtn match at bits {list(bits)}")
    sign = 1.0 if higher_is_better(metric) else -1.0
    return pairs.rename(columns={metric: "method_value", "method_label": "method"}).assign(
        gain=lambda p: sign * (p["method_value"] - p["rtn"])
    )


def method_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per (method, bits, data type, block size): mean rtn and method values over models, the mean
    gain (positive: the method is better) and in how many models the method wins."""
    groups = pairs.groupby(["method", "bits", "dtype", "block_size"], sort=True)
    table = groups.agg(
        models=("gain", "size"),
        rtn=("rtn", "mean"),
        method_value=("method_value", "mean"),
        gain=("gain", "mean"),
        wins=("gain", lambda g: int((g > 0).sum())),
    ).reset_index()
    table["wins"] = table["wins"].astype(str) + " of " + table["models"].astype(str)
    return table.drop(columns="models").assign(gain=lambda t: np.round(t["gain"], 6))
