"""The report's sections, each built from a `Study` by a small function that returns a `Section`.

A section that cannot be produced (too few model sizes, no proxy jobs, ...) becomes a gap that
names the reason; the rest of the report is still written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from analysis.compare import default_fixed_bits, dtype_block_table, proxy_effect, proxy_summary
from analysis.curves import check_sizes, curve_points
from analysis.errors import AnalysisError
from analysis.fits import FitResult, fit_law, interpolation_loo
from analysis.methods import method_pairs, method_summary
from analysis.metrics import higher_is_better, metric_label, split_variant, variant_columns
from analysis.optimality import best_per_bits, bit_optimality
from analysis.pareto import pareto_front
from analysis.plots_compare import plot_dtype_block, plot_pareto, plot_proxy_effect
from analysis.plots_curves import MAX_PANELS, plot_bit_optimality, plot_fit_quality, plot_scaling_curves
from analysis.render import Block, Section
from analysis.summary import headline, overall_line
from analysis.tidy import BASELINE_SETTING, failed_jobs, study_grid

log = logging.getLogger(__name__)

N_BOOT = 1000  # bootstrap replicates of every CI (the demo study's report takes about 20 s CPU at this)


@dataclass(frozen=True)
class Study:
    """Everything the sections read: the raw rows, the tidy table, and the chosen metrics."""

    name: str
    raw: pd.DataFrame
    tidy: pd.DataFrame | None  # None when no job finished
    metric: str | None  # headline metric column
    loss: str | None  # loss column for the effective-parameter law
    acc_tasks: tuple[str, ...]
    n_boot: int = N_BOOT
    n_budgets: int = 12
    seed: int = 0
    fixed_bits: int | None = (
        None  # precision of the data type x block size comparison; None: 4 or most common
    )

    def require_tidy(self) -> pd.DataFrame:
        if self.tidy is None or self.metric is None:
            raise AnalysisError("no finished job with a metric value")
        return self.tidy


def slug(text: str) -> str:
    """A file-name-safe version of a label."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def guarded(title: str, build: Callable[[], Section]) -> Section:
    """`build()`, or a section holding one gap if the analysis raised `AnalysisError`."""
    try:
        return build()
    except AnalysisError as err:
        log.warning("%s: %s", title, err)
        return Section(title, (Block(gap=str(err)),))


def study_section(study: Study) -> Section:
    """The grid, job counts and what the headline metric is."""
    grid = study_grid(study.raw)
    n_jobs = study.raw["job_key"].nunique()
    text = f"Study {study.name!r}: {n_jobs} jobs."
    if study.metric:
        text += f" Headline metric: {metric_label(study.metric)}."
    if study.acc_tasks:
        text += f" Mean zero-shot accuracy over: {', '.join(study.acc_tasks)}."
    blocks = [Block(text=text), *_variants_note(study), Block(table=grid, name="Grid")]
    if study.tidy is not None:
        counts = study.tidy.pivot_table(
            index="model", columns="bits", values="job_key", aggfunc="count", fill_value=0
        )
        counts = counts.reindex(study.tidy.sort_values("n_params")["model"].unique())
        blocks.append(
            Block(
                table=counts.reset_index().rename_axis(columns=None), name="Finished jobs per model and bits"
            )
        )
    return Section("Study", tuple(blocks))


def _variants_note(study: Study) -> list[Block]:
    """Which metrics were measured under several evaluation variants, and which column is used."""
    split = variant_columns(study.tidy) if study.tidy is not None else []
    if not split:
        return []
    bases = sorted({split_variant(c)[0] for c in split})
    chosen = ", ".join(f"{role} {c}" for role, c in (("headline", study.metric), ("loss", study.loss)) if c)
    return [Block(text=f"Evaluation variants: {', '.join(bases)} were measured under more than one "
                       "evaluation setting (scorer / example limit, or context / stride / max tokens). Each "
                       f"variant is its own column, never averaged with another: {', '.join(split)}. This "
                       f"report uses {chosen} (--metric picks the headline).")]  # fmt: skip


def curves_section(study: Study) -> Section:
    """One scaling-curve figure per family (and per loss, if it differs from the headline metric)."""
    tidy = study.require_tidy()
    metrics = [m for m in dict.fromkeys([study.metric, study.loss]) if m]
    blocks = [Block(text="Lines join measured model sizes: the paper's piecewise-linear interpolation in "
                         "log bits. Dashed: the shared-slope fit a_k + b·log2(total bits).")]  # fmt: skip
    for metric in metrics:
        points = curve_points(tidy, metric)
        check_sizes(points)
        fit = fit_law(points, "shared_slope", n_boot=0)
        for family in sorted(points["model_family"].unique()):
            blocks += _omitted_settings(points, family)
            fig = plot_scaling_curves(points, metric_label(metric), family, fit=fit)
            blocks.append(Block(figure=fig, name=f"curves-{slug(family)}-{slug(metric)}"))
    return Section("Scaling curves", tuple(blocks))


def _omitted_settings(points: pd.DataFrame, family: str) -> list[Block]:
    settings = set(points.loc[points["model_family"] == family, "setting"]) - {BASELINE_SETTING}
    extra = len(settings) - MAX_PANELS
    if extra <= 0:
        return []
    return [Block(text=f"{family}: {extra} of {len(settings)} settings not drawn (the figure shows the "
                       f"{MAX_PANELS} with most points); the tables below cover all.")]  # fmt: skip


def _fit_blocks(fit: FitResult, label: str, title: str, name: str) -> list[Block]:
    blocks = [Block(gap=f"{r.model_family} / {r.setting}: {r.reason}") for r in fit.skipped.itertuples()]
    if fit.predictions.empty:
        return blocks or [Block(gap=f"{title}: nothing to fit")]
    if not fit.params.empty:
        blocks.append(Block(table=fit.params, name=f"{title}: parameters with bootstrap 95% CIs"))
    blocks.append(Block(table=fit.quality, name=f"{title}: goodness of fit"))
    blocks.append(Block(figure=plot_fit_quality(fit, label, title), name=name))
    return blocks


def fits_section(study: Study) -> Section:
    """Interpolation (leave-one-out), shared-slope law, and the effective-parameter law on the loss."""
    tidy = study.require_tidy()
    assert study.metric is not None
    points = curve_points(tidy, study.metric)
    check_sizes(points)
    label = metric_label(study.metric)
    blocks = [Block(text="Intervals: residual bootstrap (refit on fitted values plus resampled residuals), "
                         f"{study.n_boot} replicates. log2 is of total model bits.")]  # fmt: skip
    blocks += _fit_blocks(
        interpolation_loo(points), label, "Interpolation, leave-one-out", "fit-interpolation"
    )
    shared = fit_law(points, "shared_slope", n_boot=study.n_boot, seed=study.seed)
    blocks += _fit_blocks(shared, label, f"Shared slope: {label} = a_k + b·log2(bits)", "fit-shared-slope")
    if study.loss is None:
        blocks.append(Block(gap="effective-parameter law: no perplexity text set, so no loss to fit"))
    else:
        loss_points = curve_points(tidy, study.loss)
        law = fit_law(loss_points, "effective_params", n_boot=study.n_boot, seed=study.seed)
        title = "Effective parameters: L = A·(N·(1 − e^(−k/γ)))^(−α) + E"
        blocks += _fit_blocks(law, metric_label(study.loss), title, "fit-effective-params")
    return Section("Parametric fits", tuple(blocks))


OPTIMALITY_COLUMNS = [
    "model_family", "budget_bits", "n_candidates", "winner", "winner_value", "runner_up", "margin",
    "margin_ci_low", "margin_ci_high", "decisive", "p_win", "other_bits", "other_bits_margin",
    "other_bits_decisive",
]  # fmt: skip


def optimality_table(study: Study) -> pd.DataFrame:
    """The bit-optimality table of the headline metric (raises `AnalysisError` if impossible)."""
    tidy = study.require_tidy()
    assert study.metric is not None
    points = curve_points(tidy, study.metric)
    check_sizes(points)
    table = bit_optimality(points, higher_is_better(study.metric), study.n_budgets, study.n_boot, study.seed)
    if table.empty:
        raise AnalysisError("no memory budget is covered by two or more curves")
    return table


def optimality_section(study: Study, table: pd.DataFrame) -> Section:
    """The table of winners per budget, and one figure per family."""
    assert study.metric is not None
    tidy = study.require_tidy()
    points = curve_points(tidy, study.metric)
    best = best_per_bits(points, higher_is_better(study.metric), n_boot=study.n_boot, seed=study.seed)
    text = ("Each curve is interpolated at each budget; 'decisive': the bootstrap 95% CI of the margin "
            "excludes 0 (points redrawn from their standard errors, or where the results carry none, from "
            "the residual scatter around a_k + b_k·x + c·x², x = log2 bits); p_win: share of draws "
            "the winner wins.")  # fmt: skip
    blocks = [
        Block(text=text),
        Block(table=table[[c for c in OPTIMALITY_COLUMNS if c in table]], name="Bit-optimality"),
    ]
    for family in sorted(table["model_family"].unique()):
        fig = plot_bit_optimality(best, table, metric_label(study.metric), family)
        blocks.append(Block(figure=fig, name=f"optimality-{slug(family)}"))
    return Section("Bit-optimal precision per memory budget", tuple(blocks))


def answer_section(study: Study, table: pd.DataFrame | None, reason: str) -> Section:
    """The study's answer in words."""
    if table is None:
        return Section("Answer", (Block(gap=f"no bit-optimality answer: {reason}"),))
    assert study.metric is not None and study.tidy is not None
    lines = headline(table, study.tidy, metric_label(study.metric))
    if table["model_family"].nunique() > 1:
        lines.append(overall_line(table))
    return Section("Answer", tuple(Block(text=line) for line in lines))


def pareto_section(study: Study) -> Section:
    """The Pareto front of the headline metric against memory."""
    tidy = study.require_tidy()
    assert study.metric is not None
    front = pareto_front(tidy, study.metric, higher_is_better(study.metric))
    cols = ["model_family", "model", "curve", "bits_per_param", "total_model_bits", study.metric]
    fig = plot_pareto(tidy, front, study.metric, metric_label(study.metric))
    return Section(
        "Pareto front",
        (Block(table=front[cols], name="Configurations on the front"), Block(figure=fig, name="pareto")),
    )


def fixed_precision_section(study: Study) -> Section:
    """Data type x block size at one precision (the paper's Figure 3)."""
    tidy = study.require_tidy()
    assert study.metric is not None
    bits = study.fixed_bits if study.fixed_bits is not None else default_fixed_bits(tidy)
    table = dtype_block_table(tidy, study.metric, bits)
    fig = plot_dtype_block(tidy, study.metric, metric_label(study.metric), bits)
    name = f"{bits}-bit: data type x block size (one column per model; rank 1 = best mean)"
    return Section(
        "Data type and block size",
        (Block(table=table, name=name), Block(figure=fig, name=f"dtype-block-{bits}bit")),
    )


def proxy_section(study: Study) -> Section:
    """Proxy (outlier-dependent) quantization at 3 and 4 bits."""
    tidy = study.require_tidy()
    assert study.metric is not None
    pairs = proxy_effect(tidy, study.metric, bits=(3, 4))
    label = metric_label(study.metric)
    blocks = (
        Block(text="gain: proxy minus plain, signed so that positive means proxy quantization is better."),
        Block(table=proxy_summary(pairs), name="Mean gain per bit width and outlier fraction"),
        Block(table=pairs, name="Matched pairs"),
        Block(figure=plot_proxy_effect(pairs, label), name="proxy"),
    )
    return Section("Proxy quantization at 3 and 4 bits", blocks)


METHODS_TITLE = "Methods against round-to-nearest at 3 and 4 bits"


def has_methods(study: Study) -> bool:
    """Whether the study holds a method other than rtn (only then does the report compare methods)."""
    if study.tidy is None or "method" not in study.tidy:
        return False
    return bool((~study.tidy["method"].isin(["rtn", "none"])).any())


def methods_section(study: Study) -> Section:
    """Each method other than rtn against rtn per data type x block size at 3 and 4 bits, paired by model."""
    tidy = study.require_tidy()
    assert study.metric is not None
    pairs = method_pairs(tidy, study.metric, bits=(3, 4))
    blocks = (
        Block(
            text=f"{metric_label(study.metric)}: each job matched with the rtn job of the same model and "
            "recipe (scored on the same tokens); gain: signed so that positive means the method is better."
        ),
        Block(
            table=method_summary(pairs), name="Mean over models per method, bits, data type and block size"
        ),
    )
    return Section(METHODS_TITLE, blocks)


def failures_section(study: Study) -> Section:
    """Failed jobs, listed with their errors."""
    failed = failed_jobs(study.raw)
    if failed.empty:
        return Section("Failed jobs", (Block(text="No job failed."),))
    return Section(
        "Failed jobs", (Block(text=f"{len(failed)} jobs failed."), Block(table=failed, name="Failed jobs"))
    )


def gaps_section(sections: list[Section]) -> Section:
    """Every gap of the report in one list."""
    gaps = [f"{s.title}: {gap}" for s in sections for gap in s.gaps]
    if not gaps:
        return Section("Gaps", (Block(text="None: every part of the report was produced."),))
    return Section("Gaps", tuple(Block(text=g) for g in gaps))
