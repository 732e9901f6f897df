"""The report's Answer and its bit-optimality section.

The Answer names a single bit-optimal precision only where the paired test says so (`analysis.summary`),
flags accuracies that are not distinguishable from chance (`analysis.chance`) and keeps them out: a
family whose headline metric is at chance is answered from the loss instead, where the study has one.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd

from analysis.chance import accuracy_chance_table, at_chance_families
from analysis.curves import check_sizes
from analysis.errors import AnalysisError
from analysis.metrics import higher_is_better, metric_label, metric_unit
from analysis.optimality import best_per_bits, bit_optimality
from analysis.plots_curves import plot_bit_optimality
from analysis.render import Block, Section
from analysis.sections import MAX_FAMILY_FIGURES, Study, paired_note, slug, study_draws
from analysis.summary import headline, overall_line
from analysis.units import JobDraws

OPTIMALITY_TITLE = "Bit-optimal precision per memory budget"
OPTIMALITY_COLUMNS = [
    "model_family", "budget_bits", "n_candidates", "winner", "winner_value", "runner_up", "margin",
    "margin_ci_low", "margin_ci_high", "decisive", "p_win", "other_bits", "other_bits_margin",
    "other_bits_decisive", "tied_bits", "tie_within", "baseline_dominated",
]  # fmt: skip
OPTIMALITY_TEXT = (
    "Each curve is interpolated at each budget (the paper's piecewise-linear interpolation in log bits). "
    "'decisive': the 95% CI of the margin is above 0; the replicates of every curve point are paired "
    "(the same chunks or documents resampled for every configuration) and interpolated like the points. "
    "p_win: share of replicates the winner wins. tied_bits: the winner's bit width and every other bit "
    "width whose best curve is not decisively worse; tie_within: the largest such margin; "
    "baseline_dominated: 16-bit decisively worse than the winner."
)
PRECISION_TEXT = (
    "A mixed allocation is a precision of its own, named by its target ('mixed 3.25'; its `bits` column is "
    "only its cheapest code's): every allocator and candidate set at that target competes as one, as the "
    "settings of a bit width do. So is a curve with recovery adapters ('4 +lora')."
)


def _point_draws(draws: JobDraws | None, points: pd.DataFrame) -> np.ndarray | None:
    return draws.for_groups(points["job_keys"].tolist()) if draws is not None else None


def optimality_table(
    study: Study, metric: str | None = None, draws: JobDraws | Literal["draw"] | None = "draw"
) -> pd.DataFrame:
    """The bit-optimality table of `metric` (default: the headline metric), with the study's paired
    replicates of it (`draws`: the `study_draws` already drawn, or "draw" to draw them here); raises
    `AnalysisError`."""
    study.require_tidy()
    metric = metric or study.metric
    assert metric is not None
    points = study.curve_points(metric)
    check_sizes(points)
    drawn = study_draws(study, metric) if draws == "draw" else draws
    table = bit_optimality(points, higher_is_better(metric), study.n_budgets, _point_draws(drawn, points))
    if table.empty:
        raise AnalysisError("no memory budget is covered by two or more curves")
    return table


def optimality_section(
    study: Study, table: pd.DataFrame, draws: JobDraws | Literal["draw"] | None = "draw"
) -> Section:
    """The table of winners per budget, and one figure per family (`draws`: as for `optimality_table`)."""
    assert study.metric is not None
    points = study.curve_points(study.metric)
    drawn = study_draws(study, study.metric) if draws == "draw" else draws
    best = best_per_bits(points, higher_is_better(study.metric), draws=_point_draws(drawn, points))
    shown = table[[c for c in OPTIMALITY_COLUMNS if c in table]].copy()
    shown["tied_bits"] = shown["tied_bits"].map(
        lambda t: ", ".join(map(str, t)) if isinstance(t, tuple) else None
    )
    other = "" if all(isinstance(b, int | np.integer) for b in best["bits"]) else f" {PRECISION_TEXT}"
    blocks = [
        Block(text=f"{OPTIMALITY_TEXT}{other} {paired_note(drawn)}"),
        Block(table=shown, name="Bit-optimality"),
    ]
    families = sorted(table["model_family"].unique())
    if len(families) > MAX_FAMILY_FIGURES:  # report at scale (issue 17): a stated rule, as for the curves
        blocks.append(Block(text=f"This study has {len(families)} model families, more than "
                                 f"{MAX_FAMILY_FIGURES}: figures for the first {MAX_FAMILY_FIGURES} by name; "
                                 "the table above has every family."))  # fmt: skip
    for family in families[:MAX_FAMILY_FIGURES]:
        fig = plot_bit_optimality(best, table, metric_label(study.metric), family)
        blocks.append(Block(figure=fig, name=f"optimality-{slug(family)}"))
    return Section(OPTIMALITY_TITLE, tuple(blocks))


def answer_section(study: Study, table: pd.DataFrame | None, reason: str) -> Section:
    """The study's answer in words: per family what the paired test decides, and flagged metrics."""
    flags = _chance_flags(study)
    if table is None:
        return Section("Answer", (Block(gap=f"no bit-optimality answer: {reason}"), *flags))
    assert study.metric is not None and study.tidy is not None
    at_chance = at_chance_families(study.tidy, study.metric, study.acc_tasks)
    label, unit = metric_label(study.metric), metric_unit(study.metric)
    lines = headline(table[~table["model_family"].isin(at_chance)], study.tidy, label, unit)
    lines += _from_loss(study, sorted(at_chance))
    if table["model_family"].nunique() > 1:
        lines.append(overall_line(table))
    return Section("Answer", (*(Block(text=line) for line in lines), *flags))


def _from_loss(study: Study, families: list[str]) -> list[str]:
    """The Answer for families whose headline metric is at chance: from the loss, if there is one."""
    if not families:
        return []
    assert study.metric is not None and study.tidy is not None
    if study.loss is None or study.loss == study.metric:
        return [
            f"{family}: no answer: {metric_label(study.metric)} is at chance (below)." for family in families
        ]
    try:
        loss_table = optimality_table(study, study.loss)
    except AnalysisError as err:
        return [f"{family}: no answer from {metric_label(study.loss)} either: {err}" for family in families]
    loss_table = loss_table[loss_table["model_family"].isin(families)]
    return [
        f"(Answered from the loss, as {metric_label(study.metric)} is at chance.) {line}"
        for line in headline(loss_table, study.tidy, metric_label(study.loss), metric_unit(study.loss))
    ]


def _chance_flags(study: Study) -> list[Block]:
    """One line per accuracy column and family that is not distinguishable from chance."""
    if study.tidy is None:
        return []
    table = accuracy_chance_table(study.tidy, study.acc_tasks)
    flagged = table[table["at_chance"].astype(bool)]
    return [Block(text=_flag_line(row)) for row in flagged.to_dict("records")]


def _flag_line(row: dict[str, Any]) -> str:
    chance, z = row["chance"], row["best_z"]
    evidence = (
        f"its best job scores {row['best_value']:.4g} against chance {chance:.4g}, z = {z:.2f}"
        if np.isfinite(z)
        else f"no job scores above chance {chance:.4g}"
    )
    test = f"a one-sided 5% test needs z > {row['z_critical']:.2f} after a Bonferroni correction for"
    return (
        f"Flagged: {metric_label(row['metric'])} is not distinguishable from chance in "
        f"{row['model_family']} ({evidence}; {test} {row['n_jobs']} jobs); it is kept out of the Answer."
    )
