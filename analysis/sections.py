"""The report's sections, each built from a `Study` by a small function that returns a `Section`.

A section that cannot be produced (too few model sizes, no proxy jobs, ...) becomes a gap that
names the reason; the rest of the report is still written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd

from analysis.compare import default_fixed_bits, dtype_block_table, proxy_effect, proxy_summary
from analysis.curves import check_sizes, curve_points
from analysis.errors import AnalysisError
from analysis.fits import fit_law
from analysis.methods import method_pairs, method_summary
from analysis.metrics import higher_is_better, metric_label, split_variant, variant_columns
from analysis.pareto import pareto_front
from analysis.plots_compare import plot_dtype_block, plot_family_curves, plot_pareto, plot_proxy_effect
from analysis.plots_curves import plot_scaling_curves
from analysis.render import Block, Section
from analysis.tidy import failed_jobs, study_grid
from analysis.tokens import tokens_note
from analysis.units import JobDraws, job_draws

log = logging.getLogger(__name__)

N_BOOT = 1000  # bootstrap replicates of every CI (the demo study's report takes about 20 s CPU at this)


@dataclass(frozen=True)
class SharedPoints:
    """Curve points per metric and the tidy table they were computed from: a `Study` holding another
    tidy table (a subset: `dataclasses.replace(study, tidy=...)`) computes its own."""

    tidy: pd.DataFrame | None = None
    by_metric: Mapping[str, pd.DataFrame] = field(default_factory=dict)


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
    metric_note: str = ""  # why the headline metric is not the default one (e.g. accuracy at chance)
    points: SharedPoints = field(default_factory=SharedPoints)  # `shared_points`

    def require_tidy(self) -> pd.DataFrame:
        if self.tidy is None or self.metric is None:
            raise AnalysisError("no finished job with a metric value")
        return self.tidy

    def curve_points(self, metric: str) -> pd.DataFrame:
        """`analysis.curves.curve_points` of the tidy table for `metric`: the one computed with the study
        (`shared_points`) where there is one for this tidy table, which every section reads (and none
        modifies)."""
        found = self.points.by_metric.get(metric) if self.points.tidy is self.tidy else None
        return found if found is not None else curve_points(self.require_tidy(), metric)


def shared_points(tidy: pd.DataFrame, metrics: Sequence[str | None]) -> SharedPoints:
    """The curve points of each of `metrics` that has values, computed once for the whole report (the
    headline metric's and the loss's are read by several sections; ~4 s each at 35,000 jobs)."""
    points = {}
    for metric in dict.fromkeys(m for m in metrics if m):
        try:
            points[metric] = curve_points(tidy, metric)
        except AnalysisError:
            continue  # no values: the sections that need it say so (`Study.curve_points` raises there)
    return SharedPoints(tidy, points)


def study_draws(study: Study, metric: str) -> JobDraws | None:
    """The paired replicates of `metric` for the study's jobs with per-unit data (None: no job has any).

    Seeded by the study, so every section compares the same replicates."""
    return job_draws(study.raw, metric, study.acc_tasks, study.n_boot, study.seed)


def paired_note(draws: JobDraws | None) -> str:
    """What the CI columns of a comparison mean here, or why they are empty."""
    if draws is None:
        return (
            "No paired CI is available: these results carry no per-chunk or per-document scores "
            "(unit_sums / unit_counts), so the CI columns are empty and no difference is called decisive."
        )
    return (
        f"CIs: paired bootstrap, {draws.n_boot} replicates resampling the same text chunks or documents "
        "for both sides of every comparison (ratio of sums); 'decisive': the 95% CI excludes 0."
    )


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
    note = [Block(text=t) for t in (study.metric_note, tokens_note(study.raw)) if t]
    blocks = [Block(text=text), *note, *_variants_note(study), Block(table=grid, name="Grid")]
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


MAX_FAMILY_FIGURES = 12  # per-family curve figures up to this many families; one combined figure beyond


def curves_section(study: Study) -> Section:
    """One scaling-curve figure per family (and per loss, if it differs from the headline metric); with
    more than `MAX_FAMILY_FIGURES` families, one combined figure per metric instead (a stated rule)."""
    tidy = study.require_tidy()
    metrics = [m for m in dict.fromkeys([study.metric, study.loss]) if m]
    families = sorted(tidy["model_family"].dropna().unique())
    if len(families) > MAX_FAMILY_FIGURES:
        return Section("Scaling curves", tuple(_combined_curve_blocks(study, metrics, len(families))))
    blocks = [Block(text="Lines join measured model sizes: the paper's piecewise-linear interpolation in "
                         "log bits. First panel: each bit width's best setting; then one panel per data "
                         "type, its best setting per bit width bold, the others thin. Dashed: the "
                         "shared-slope fit a_k + b·log2(total bits), where it passed.")]  # fmt: skip
    for metric in metrics:
        points = study.curve_points(metric)
        check_sizes(points)
        fit = fit_law(points, "shared_slope", n_boot=0)
        for family in sorted(points["model_family"].unique()):
            fig = plot_scaling_curves(points, metric_label(metric), family, fit=fit,
                                      higher_is_better=higher_is_better(metric))  # fmt: skip
            blocks.append(Block(figure=fig, name=f"curves-{slug(family)}-{slug(metric)}"))
    return Section("Scaling curves", tuple(blocks))


def _combined_curve_blocks(study: Study, metrics: list[str], n_families: int) -> list[Block]:
    """The rule for many families: one figure per metric, one small panel per family (best setting per
    bit width and the 16-bit baseline), in place of a multi-panel figure per family."""
    blocks = [Block(text=f"This study has {n_families} model families, more than {MAX_FAMILY_FIGURES}: "
                         "instead of one figure per family (one panel per data type), one figure per metric "
                         "shows every family in a small panel of its own, each bit width's best setting and "
                         "the 16-bit baseline; lines join measured model sizes (the paper's "
                         "piecewise-linear interpolation in log bits). Every setting's fit is in "
                         "'Parametric fits'.")]  # fmt: skip
    for metric in metrics:
        points = study.curve_points(metric)
        check_sizes(points)
        fig = plot_family_curves(points, metric_label(metric), higher_is_better=higher_is_better(metric))
        blocks.append(Block(figure=fig, name=f"curves-all-families-{slug(metric)}"))
    return blocks


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
    draws = study_draws(study, study.metric)
    table = dtype_block_table(tidy, study.metric, bits, draws)
    fig = plot_dtype_block(tidy, study.metric, metric_label(study.metric), bits)
    name = (f"{bits}-bit: data type x block size (one column per model; rank 1 = best mean; gap_to_best: "
            "mean over models, positive = worse)")  # fmt: skip
    return Section(
        "Data type and block size",
        (Block(text=paired_note(draws)), Block(table=table, name=name),
         Block(figure=fig, name=f"dtype-block-{bits}bit")),
    )  # fmt: skip


def has_proxy(study: Study) -> bool:
    """Whether the study holds a proxy-quantization job (only then does the report compare proxy)."""
    if study.tidy is None or "outlier_fraction" not in study.tidy:
        return False
    return bool((study.tidy["outlier_fraction"].fillna(0) > 0).any())


def proxy_section(study: Study) -> Section:
    """Proxy (outlier-dependent) quantization at 3 and 4 bits."""
    tidy = study.require_tidy()
    assert study.metric is not None
    draws = study_draws(study, study.metric)
    pairs = proxy_effect(tidy, study.metric, bits=(3, 4), draws=draws)
    label = metric_label(study.metric)
    blocks = (
        Block(
            text="gain: proxy minus plain, signed so that positive means proxy quantization is better. "
            + paired_note(draws)
        ),
        Block(table=proxy_summary(pairs), name="Mean gain per bit width and outlier fraction"),
        Block(table=pairs.drop(columns=["job_key_proxy", "job_key_plain"]), name="Matched pairs"),
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
    draws = study_draws(study, study.metric)
    pairs = method_pairs(tidy, study.metric, bits=(3, 4), draws=draws)
    blocks = (
        Block(
            text=f"{metric_label(study.metric)}: each job matched with the rtn job of the same model and "
            "recipe (scored on the same tokens); gain: signed so that positive means the method is better. "
            + paired_note(draws)
        ),
        Block(
            table=method_summary(pairs, draws),
            name="Mean over models per method, bits, data type and block size",
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
