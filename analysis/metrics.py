"""Names, directions and labels of the per-job metric columns that `tidy_jobs` produces.

Column names: `mean_acc` (mean zero-shot accuracy), `acc_<task>`, and for every perplexity text
set `ppl_<set>` (perplexity), `ce_<set>` (cross-entropy, nats per token), `bpb_<set>` (bits per
byte). The standard error of a column, where known, is in `<column>_se`.
"""

from __future__ import annotations

import pandas as pd

from analysis.errors import AnalysisError

MEAN_ACC = "mean_acc"
PREFIX_LABELS = {
    "acc_": "accuracy",
    "ppl_": "perplexity",
    "ce_": "cross-entropy (nats/token)",
    "bpb_": "bits per byte",
}
LOWER_IS_BETTER_PREFIXES = ("ppl_", "ce_", "bpb_")


def se_column(metric: str) -> str:
    """The column holding the standard error of `metric`."""
    return f"{metric}_se"


def is_metric_column(name: str) -> bool:
    """True for a metric value column (not its standard error, not a job attribute)."""
    if name.endswith("_se"):
        return False
    return name == MEAN_ACC or name.startswith(tuple(PREFIX_LABELS))


def higher_is_better(metric: str) -> bool:
    """Direction of a metric column: accuracy up, perplexity / cross-entropy / bits per byte down."""
    if metric == MEAN_ACC or metric.startswith("acc_"):
        return True
    if metric.startswith(LOWER_IS_BETTER_PREFIXES):
        return False
    raise AnalysisError(
        f"unknown metric {metric!r}; allowed: {MEAN_ACC!r} or a column starting with {sorted(PREFIX_LABELS)}"
    )


def metric_label(metric: str) -> str:
    """A readable axis label, e.g. 'perplexity (wikitext2)'."""
    if metric == MEAN_ACC:
        return "mean zero-shot accuracy"
    for prefix, label in PREFIX_LABELS.items():
        if metric.startswith(prefix):
            return f"{label} ({metric[len(prefix) :]})"
    raise AnalysisError(f"unknown metric {metric!r}")


def metric_columns(tidy: pd.DataFrame) -> list[str]:
    """Metric columns of a tidy table that hold at least one value."""
    return [c for c in tidy.columns if is_metric_column(c) and tidy[c].notna().any()]


def text_sets(tidy: pd.DataFrame) -> list[str]:
    """Perplexity text sets present in a tidy table, 'wikitext2' first when present."""
    sets = sorted(c[len("ce_") :] for c in metric_columns(tidy) if c.startswith("ce_"))
    return sorted(sets, key=lambda s: s != "wikitext2")


def default_metric(tidy: pd.DataFrame) -> str:
    """The study's headline metric: mean zero-shot accuracy if measured and not constant (tiny
    models score 0 everywhere), else the cross-entropy of the first text set."""
    present = metric_columns(tidy)
    if MEAN_ACC in present and tidy[MEAN_ACC].nunique() > 1:
        return MEAN_ACC
    sets = text_sets(tidy)
    if sets:
        return f"ce_{sets[0]}"
    if present:
        return present[0]
    raise AnalysisError("the results hold no metric values (no acc, perplexity or nats_per_token rows)")


def default_loss(tidy: pd.DataFrame) -> str | None:
    """The loss column for loss-shaped laws (cross-entropy of the first text set), if any."""
    sets = text_sets(tidy)
    return f"ce_{sets[0]}" if sets else None


def check_metric(tidy: pd.DataFrame, metric: str) -> None:
    """Raise `AnalysisError` unless `metric` is a column of `tidy` with values."""
    present = metric_columns(tidy)
    if metric not in present:
        raise AnalysisError(f"metric {metric!r} has no values in these results; allowed: {present}")
