"""Fixed-precision comparisons (the paper's Figure 3): data type x block size, and proxy quantization."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.metrics import check_metric, higher_is_better
from analysis.tidy import METHOD_COLUMNS, method_scope_labels, with_method

SETTING_COLUMNS = ["dtype", "exponent_bits", "block_size"]
MATCH_COLUMNS = [
    "model_family",
    "model",
    "n_params",
    "bits",
    "dtype",
    "exponent_bits",
    "block_size",
    "centering",
]
METHOD = "method"  # column naming method + scope, shown only where a comparison holds several


def default_fixed_bits(tidy: pd.DataFrame) -> int:
    """The precision to compare settings at: 4 if measured, else the most measured quantized width."""
    quantized = tidy[(tidy["dtype"] != "none") & (tidy["bits"] < 16)]
    if quantized.empty:
        raise AnalysisError("no quantized jobs (only the 16-bit baseline): nothing to compare")
    counts = quantized["bits"].value_counts()
    return 4 if 4 in counts.index else int(counts.idxmax())


def _plain(tidy: pd.DataFrame) -> pd.DataFrame:
    """Jobs without proxy columns and without centering, where the study has such jobs."""
    plain = tidy[(tidy["outlier_fraction"].fillna(0) == 0) & ~tidy["centering"].fillna(False).astype(bool)]
    return plain if not plain.empty else tidy


def dtype_block_table(tidy: pd.DataFrame, metric: str, bits: int) -> pd.DataFrame:
    """Metric per (data type, block size) at one precision: one column per model, mean and rank.

    Only jobs without proxy columns or centering are compared (where the study has them). Rank 1
    is the best mean over models; a setting missing a model gets NaN for it and no mean. Where the
    jobs use more than one method or scope, a `method` column keeps them apart.

    Raises:
        AnalysisError: `metric` has no values, or no job has `bits`.
    """
    check_metric(tidy, metric)
    rows = _plain(tidy)
    rows = rows[(rows["bits"] == bits) & (rows["dtype"] != "none") & rows[metric].notna()]
    if rows.empty:
        have = sorted(tidy.loc[tidy["dtype"] != "none", "bits"].unique().tolist())
        raise AnalysisError(f"no quantized {bits}-bit job with {metric!r}; measured bit widths: {have}")
    key = rows[SETTING_COLUMNS].astype(object).where(rows[SETTING_COLUMNS].notna(), "per-tensor")
    key["exponent_bits"] = rows["exponent_bits"].astype(object).where(rows["exponent_bits"].notna(), "-")
    rows = rows.assign(**{c: key[c] for c in SETTING_COLUMNS}, **{METHOD: method_scope_labels(rows)})
    index = [*SETTING_COLUMNS, METHOD] if rows[METHOD].nunique() > 1 else SETTING_COLUMNS
    table = rows.pivot_table(index=index, columns="model", values=metric, aggfunc="mean")
    models = rows.drop_duplicates("model").sort_values("n_params")["model"].tolist()
    table = table.reindex(columns=models)
    table["mean"] = table.mean(axis=1, skipna=False)
    table["rank"] = table["mean"].rank(ascending=not higher_is_better(metric), method="min")
    return table.sort_values("rank").reset_index().rename_axis(columns=None)


def proxy_effect(tidy: pd.DataFrame, metric: str, bits: Sequence[int] = (3, 4)) -> pd.DataFrame:
    """Effect of proxy quantization: each job with outlier_fraction > 0 against its match without.

    Returns one row per matched pair with `value_plain`, `value_proxy`, `delta` (proxy - plain),
    `gain` (delta signed so positive = proxy better), and the extra bits per parameter it costs.
    Pairs match in method and scope too; a `method` column names them where pairs hold several.

    Raises:
        AnalysisError: `metric` has no values, or no job at `bits` used proxy quantization.
    """
    check_metric(tidy, metric)
    rows = with_method(tidy[tidy["bits"].isin(list(bits)) & tidy[metric].notna()])
    proxy = rows[rows["outlier_fraction"].fillna(0) > 0]
    plain = rows[rows["outlier_fraction"].fillna(0) == 0]
    if proxy.empty or plain.empty:
        raise AnalysisError(
            f"proxy quantization needs jobs with and without outlier_fraction > 0 at bits {list(bits)}; "
            f"found {len(proxy)} with and {len(plain)} without"
        )
    match = [*MATCH_COLUMNS, *METHOD_COLUMNS]
    keep = [*match, "bits_per_param", metric]
    pairs = proxy[[*keep, "outlier_fraction"]].merge(plain[keep], on=match, suffixes=("_proxy", "_plain"))
    methods = method_scope_labels(pairs)
    pairs = pairs.drop(columns=list(METHOD_COLUMNS))
    if methods.nunique() > 1:
        pairs.insert(len(MATCH_COLUMNS), METHOD, methods)
    pairs = pairs.rename(columns={f"{metric}_proxy": "value_proxy", f"{metric}_plain": "value_plain"})
    pairs["delta"] = pairs["value_proxy"] - pairs["value_plain"]
    pairs["gain"] = pairs["delta"] * (1.0 if higher_is_better(metric) else -1.0)
    pairs["extra_bits_per_param"] = pairs["bits_per_param_proxy"] - pairs["bits_per_param_plain"]
    return (
        pairs.drop(columns=["bits_per_param_proxy", "bits_per_param_plain"])
        .sort_values(["bits", "model_family", "n_params", "dtype"])
        .reset_index(drop=True)
    )


def proxy_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Mean gain of proxy quantization per (bits, [method,] outlier_fraction) and how often it helps."""
    keys = ["bits", METHOD, "outlier_fraction"] if METHOD in pairs else ["bits", "outlier_fraction"]
    return (
        pairs.groupby(keys)
        .agg(
            n_pairs=("gain", "size"),
            mean_gain=("gain", "mean"),
            share_helped=("gain", lambda g: float(np.mean(g > 0))),
        )
        .reset_index()
    )
