"""Names, directions and labels of the per-job metric columns that `tidy_jobs` produces.

Column names: `mean_acc` (mean zero-shot accuracy), `acc_<task>`, and for every perplexity text
set `ppl_<set>` (perplexity), `ce_<set>` (cross-entropy, nats per token), `bpb_<set>` (bits per
byte) and `kl_<set>` (mean per-token KL divergence from the 16-bit model, nats). The standard
error of a column, where known, is in `<column>_se`.

A task measured under more than one evaluation variant in one study (perplexity context / stride /
max_tokens, or lm-eval scorer / example limit) gets one column per variant, named
`<metric>@<variant>` (e.g. `ppl_wikitext2@ctx128s128`, `acc_piqa@fast-limit500`,
`mean_acc@fast-limit500`), so that jobs scored differently are never averaged into one value.
"""

from __future__ import annotations

import logging

import pandas as pd

from analysis.errors import AnalysisError

log = logging.getLogger(__name__)

MEAN_ACC = "mean_acc"
VARIANT_SEP = "@"
PREFIX_LABELS = {
    "acc_": "accuracy",
    "ppl_": "perplexity",
    "ce_": "cross-entropy (nats/token)",
    "bpb_": "bits per byte",
    "kl_": "KL to the 16-bit model (nats/token)",
}
LOWER_IS_BETTER_PREFIXES = ("ppl_", "ce_", "bpb_", "kl_")
NATS_PREFIXES = ("ce_", "kl_")  # metrics in nats per token


def se_column(metric: str) -> str:
    """The column holding the standard error of `metric`."""
    return f"{metric}_se"


def variant_column(metric: str, variant: str) -> str:
    """`metric` measured under evaluation variant `variant` ('' = the study's only variant)."""
    return f"{metric}{VARIANT_SEP}{variant}" if variant else metric


def split_variant(column: str) -> tuple[str, str]:
    """'ppl_wikitext2@ctx128s128' -> ('ppl_wikitext2', 'ctx128s128'); no suffix -> (column, '')."""
    base, _, variant = column.partition(VARIANT_SEP)
    return base, variant


def is_metric_column(name: str) -> bool:
    """True for a metric value column (not its standard error, not a job attribute)."""
    if name.endswith("_se"):
        return False
    base = split_variant(name)[0]
    return base == MEAN_ACC or base.startswith(tuple(PREFIX_LABELS))


def higher_is_better(metric: str) -> bool:
    """Direction of a metric column: accuracy up, perplexity / cross-entropy / bits per byte down."""
    base = split_variant(metric)[0]
    if base == MEAN_ACC or base.startswith("acc_"):
        return True
    if base.startswith(LOWER_IS_BETTER_PREFIXES):
        return False
    raise AnalysisError(
        f"unknown metric {metric!r}; allowed: {MEAN_ACC!r} or a column starting with {sorted(PREFIX_LABELS)}"
    )


def metric_label(metric: str) -> str:
    """A readable axis label, e.g. 'perplexity (wikitext2)' or 'perplexity (wikitext2@ctx128s128)'."""
    base, variant = split_variant(metric)
    if base == MEAN_ACC:
        return "mean zero-shot accuracy" + (f" ({variant})" if variant else "")
    for prefix, label in PREFIX_LABELS.items():
        if metric.startswith(prefix):
            return f"{label} ({metric[len(prefix) :]})"
    raise AnalysisError(f"unknown metric {metric!r}")


def metric_unit(metric: str) -> str:
    """The unit a difference of `metric` is in, for sentences: 'nats' for cross-entropy and KL, else ''."""
    return "nats" if split_variant(metric)[0].startswith(NATS_PREFIXES) else ""


def metric_columns(tidy: pd.DataFrame) -> list[str]:
    """Metric columns of a tidy table that hold at least one value."""
    return [c for c in tidy.columns if is_metric_column(c) and tidy[c].notna().any()]


def variant_columns(tidy: pd.DataFrame) -> list[str]:
    """Metric columns with values that carry an evaluation-variant suffix (empty in most studies)."""
    return [c for c in metric_columns(tidy) if split_variant(c)[1]]


def variants(tidy: pd.DataFrame, metric: str) -> list[str]:
    """The columns of `metric` (plain or any variant) that hold values, most values first."""
    cols = [c for c in metric_columns(tidy) if split_variant(c)[0] == metric]
    return sorted(cols, key=lambda c: (-int(tidy[c].notna().sum()), c))


def text_sets(tidy: pd.DataFrame) -> list[str]:
    """Perplexity text sets present in a tidy table (without variant), 'wikitext2' first when present."""
    sets = sorted({split_variant(c)[0][len("ce_") :] for c in metric_columns(tidy) if c.startswith("ce_")})
    return sorted(sets, key=lambda s: s != "wikitext2")


def default_metric(tidy: pd.DataFrame) -> str:
    """The study's headline metric: mean zero-shot accuracy if measured and not constant (tiny
    models score 0 everywhere), else the cross-entropy of the first text set. Of several
    evaluation variants, the one with most jobs is chosen (and logged)."""
    accuracy = [c for c in variants(tidy, MEAN_ACC) if tidy[c].nunique() > 1]
    if accuracy:
        return _chosen(tidy, accuracy, "headline metric")
    sets = text_sets(tidy)
    if sets:
        return _chosen(tidy, variants(tidy, f"ce_{sets[0]}"), "headline metric")
    present = metric_columns(tidy)
    if present:
        return present[0]
    raise AnalysisError("the results hold no metric values (no acc, perplexity or nats_per_token rows)")


def default_loss(tidy: pd.DataFrame) -> str | None:
    """The loss column for loss-shaped laws (cross-entropy of the first text set), if any."""
    sets = text_sets(tidy)
    return _chosen(tidy, variants(tidy, f"ce_{sets[0]}"), "loss") if sets else None


def _chosen(tidy: pd.DataFrame, candidates: list[str], role: str) -> str:
    """The first candidate; says so in the log when evaluation variants were to choose from."""
    chosen = candidates[0]
    if split_variant(chosen)[1]:
        counts = ", ".join(f"{c} ({int(tidy[c].notna().sum())} jobs)" for c in candidates)
        log.info("%s: %s, the evaluation variant with most jobs of: %s", role, chosen, counts)
    return chosen


def check_metric(tidy: pd.DataFrame, metric: str) -> None:
    """Raise `AnalysisError` unless `metric` is a column of `tidy` with values."""
    present = metric_columns(tidy)
    if metric in present:
        return
    split = variants(tidy, metric)
    if split:
        raise AnalysisError(f"metric {metric!r} was measured under several evaluation variants; "
                            f"choose one of {split}")  # fmt: skip
    raise AnalysisError(f"metric {metric!r} has no values in these results; allowed: {present}")
