"""Fixed-precision comparisons (the paper's Figure 3): data type x block size, and proxy quantization.

Every comparison here is between jobs scored on the same chunks and documents, so where the results
carry per-unit data (`analysis.units`) it gets a paired bootstrap CI: each setting's gap to the best
setting (mean over models), each proxy pair's gain. Without per-unit data those columns are empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.metrics import check_metric, higher_is_better
from analysis.tidy import METHOD_COLUMNS, method_scope_labels, with_method
from analysis.units import JobDraws, gain_intervals, paired_gains

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


def dtype_block_table(
    tidy: pd.DataFrame, metric: str, bits: int, draws: JobDraws | None = None
) -> pd.DataFrame:
    """Metric per (data type, block size) at one precision: one column per model, mean and rank, and
    each setting's gap to the best one (mean over models, positive = worse) with its paired CI and
    whether it is tied with the best (the CI includes 0; None without `draws`, and for the best itself).

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
    table = table.sort_values("rank")
    keys = rows.groupby([*index, "model"])["job_key"].agg(tuple).unstack("model")
    keys = keys.reindex(index=table.index, columns=models)
    gaps = _gaps_to_best(table["mean"], keys, draws, 1.0 if higher_is_better(metric) else -1.0)
    return pd.concat([table.reset_index().rename_axis(columns=None), gaps], axis=1)


def _gaps_to_best(means: pd.Series, keys: pd.DataFrame, draws: JobDraws | None, sign: float) -> pd.DataFrame:
    """gap_to_best, its paired CI and tied_with_best per row (rows in rank order, the best first)."""
    gap = (sign * (means.iloc[0] - means)).to_numpy(float) + 0.0  # + 0.0: the best row reads 0, not -0
    complete = keys.notna().all(axis=1).to_numpy()
    draws_rows = None
    if draws is not None and draws.n_boot and complete[0]:
        cells = [k if isinstance(k, tuple) else () for k in keys.to_numpy().ravel()]
        per_model = draws.for_groups(cells).reshape(len(keys), len(keys.columns), -1).mean(axis=1)
        draws_rows = sign * (per_model[0][None] - per_model)
    ci = gain_intervals(draws_rows, len(keys), prefix="gap")
    tied = [None if i == 0 or d is None else not d for i, d in enumerate(ci.pop("decisive"))]
    return ci.assign(gap_to_best=gap, tied_with_best=tied)[["gap_to_best", "gap_ci_low", "gap_ci_high",
                                                             "tied_with_best"]]  # fmt: skip


def proxy_effect(
    tidy: pd.DataFrame, metric: str, bits: Sequence[int] = (3, 4), draws: JobDraws | None = None
) -> pd.DataFrame:
    """Effect of proxy quantization: each job with outlier_fraction > 0 against its match without.

    Returns one row per matched pair with `value_plain`, `value_proxy`, `delta` (proxy - plain),
    `gain` (delta signed so positive = proxy better) with its paired CI (`gain_ci_low`,
    `gain_ci_high`, `decisive`; empty without `draws`), the extra bits per parameter it costs, and the
    two job keys. Pairs match in method and scope too; a `method` column names them where pairs hold
    several.

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
    keep = [*match, "bits_per_param", "job_key", metric]
    pairs = proxy[[*keep, "outlier_fraction"]].merge(plain[keep], on=match, suffixes=("_proxy", "_plain"))
    methods = method_scope_labels(pairs)
    pairs = pairs.drop(columns=list(METHOD_COLUMNS))
    if methods.nunique() > 1:
        pairs.insert(len(MATCH_COLUMNS), METHOD, methods)
    pairs = pairs.rename(columns={f"{metric}_proxy": "value_proxy", f"{metric}_plain": "value_plain"})
    sign = 1.0 if higher_is_better(metric) else -1.0
    pairs["delta"] = pairs["value_proxy"] - pairs["value_plain"]
    pairs["gain"] = pairs["delta"] * sign
    pairs["extra_bits_per_param"] = pairs["bits_per_param_proxy"] - pairs["bits_per_param_plain"]
    pairs = pairs.drop(columns=["bits_per_param_proxy", "bits_per_param_plain"])
    pairs = pairs.sort_values(["bits", "model_family", "n_params", "dtype"]).reset_index(drop=True)
    gains = paired_gains(draws, [[k] for k in pairs["job_key_proxy"]], [[k] for k in pairs["job_key_plain"]],
                         sign)  # fmt: skip
    ci = gain_intervals(gains, len(pairs))
    keys = ["job_key_proxy", "job_key_plain"]
    return pd.concat([pairs.drop(columns=keys), ci, pairs[keys]], axis=1)


def proxy_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Mean gain of proxy quantization per (bits, [method,] outlier_fraction), how often it helps, and
    how often it helps or hurts decisively by the paired test ('no CI' without per-unit data)."""
    keys = ["bits", METHOD, "outlier_fraction"] if METHOD in pairs else ["bits", "outlier_fraction"]
    rows = []
    for values, group in pairs.groupby(keys):
        decisive = group["decisive"].dropna().astype(bool) if "decisive" in group else pd.Series(dtype=bool)
        gains = group.loc[decisive.index, "gain"]
        helped, hurt = int((decisive & (gains > 0)).sum()), int((decisive & (gains < 0)).sum())
        verdict = f"{helped} helped, {hurt} hurt of {len(decisive)}" if len(decisive) else "no CI"
        rows.append({**dict(zip(keys, values, strict=True)), "n_pairs": len(group),
                     "mean_gain": group["gain"].mean(), "share_helped": float(np.mean(group["gain"] > 0)),
                     "decisive": verdict})  # fmt: skip
    return pd.DataFrame(rows)
