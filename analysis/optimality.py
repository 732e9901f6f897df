"""The bit-optimal precision per memory budget, and whether the data decide it.

For a grid of memory budgets (total model bits) per model family, every curve (bit width +
quantization setting) covering the budget is interpolated there (`analysis.curves`) and the best one
wins. Whether it wins decisively is a paired question: every configuration of a family was scored on
the same text chunks and documents, so their noise is shared. Each curve point's paired bootstrap
replicates (`analysis.units.JobDraws`: the same unit indices for every job) are interpolated exactly
like the point, and a margin's CI is the percentile interval of the replicates' differences.

Where the results carry no per-unit data (rows written before `unit_sums` existed) no CI is given:
margins are point estimates, `paired_ci` is False and nothing is declared decisive. Independent noise
per point (the previous approach) would be the wrong model for shared tokens, so it is not used.

Per budget the table names the tie set (`tied_bits`): the winner's bit width and every other bit width
whose best curve is not decisively worse; and whether the 16-bit baseline is dominated.

"Bit width" here is a curve's `precision` (`analysis.tidy.precision_key`): the bit width of a uniform
curve (an int, so uniform studies' tables are unchanged), 'mixed 3.25' for a mixed allocation and
'4 +lora' for a recovered curve; the columns keep their names (`winner_bits`, `tied_bits`, `bits`).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from analysis.curves import CURVE_KEYS, interpolation_weights
from analysis.errors import AnalysisError
from analysis.paired import CI_LEVEL, interval
from analysis.tidy import BASELINE_BITS, Precision, precision_order

log = logging.getLogger(__name__)

__all__ = ["CI_LEVEL", "best_per_bits", "bit_optimality", "budget_grid"]
MIN_CANDIDATES = 2


def budget_grid(points: pd.DataFrame, n_budgets: int = 12) -> dict[str, np.ndarray]:
    """Per family, `n_budgets` log-spaced budgets (bits) spanning its measured total model bits."""
    if n_budgets < 1:
        raise AnalysisError(f"n_budgets must be >= 1, got {n_budgets}")
    grid = {}
    for family, fam in points.groupby("model_family"):
        low, high = fam["total_model_bits"].min(), fam["total_model_bits"].max()
        grid[str(family)] = np.geomspace(low, high, n_budgets) if high > low else np.array([low])
    return grid


def _family_draws(fam: pd.DataFrame, draws: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """(n_points, 1 + n_boot) draws of a family's points with column 0 the measured values, and whether
    they are paired replicates (False: the values alone, when any point lacks units)."""
    values = fam["value"].to_numpy(float)[:, None]
    if draws is None or draws.shape[1] < 2:
        return values, False
    rows = draws[fam.index.to_numpy()]
    if np.isnan(rows[:, 1:]).all(axis=1).any():
        return values, False
    return np.column_stack([values, rows[:, 1:]]), True


def _interpolated(
    fam: pd.DataFrame, fam_draws: np.ndarray, budgets: np.ndarray
) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """(curves, values): values[c][j, d] is curve c at budget j in draw d (d=0: measured values)."""
    at = np.log2(budgets)
    curves, values = [], []
    for keys, curve in fam.groupby(list(CURVE_KEYS), sort=True):
        weights = interpolation_weights(curve["log2_bits"].to_numpy(), at)
        values.append(weights @ fam_draws[fam.index.get_indexer(curve.index)])
        curves.append(dict(zip(CURVE_KEYS, keys, strict=True)))
    return pd.DataFrame(curves), values


def bit_optimality(
    points: pd.DataFrame, higher_is_better: bool, n_budgets: int = 12, draws: np.ndarray | None = None
) -> pd.DataFrame:
    """One row per (family, budget) with >= 2 candidate curves: winner, runner-up, margins, CIs, ties.

    `draws`: (len(points), 1 + n_boot) paired replicates of each point (`JobDraws.for_groups` of
    `points["job_keys"]`; NaN rows where a point has no units), or None. Columns: model_family,
    budget_bits, n_candidates, winner, winner_bits, winner_setting, winner_value, runner_up,
    runner_up_value, margin, margin_ci_low, margin_ci_high, decisive (the CI is above 0; None without a
    CI), p_win (share of
    replicates the winner wins), the same margin columns against the best curve of another bit width
    (other_bits, other_bits_margin, ...), paired_ci, tied_bits (tuple of bit widths; None without a
    CI), tie_within (the largest margin to a tied bit width) and baseline_dominated (16-bit decisively
    worse; None where it is not measured at the budget or there is no CI).
    """
    points = points.reset_index(drop=True)
    sign = 1.0 if higher_is_better else -1.0
    rows = []
    for family, budgets in budget_grid(points, n_budgets).items():
        fam = points[points["model_family"] == family]
        fam_draws, paired = _family_draws(fam, draws)
        curves, values = _interpolated(fam, fam_draws, budgets)
        scores = np.stack(values)
        for j, budget in enumerate(budgets):
            row = _budget_row(curves, sign * scores[:, j, :], sign, paired)
            if row:
                rows.append({"model_family": family, "budget_bits": float(budget), **row})
    table = pd.DataFrame(rows)
    if table.empty:
        log.warning("no budget is covered by %d or more curves", MIN_CANDIDATES)
    return table


def _budget_row(curves: pd.DataFrame, scores: np.ndarray, sign: float, paired: bool) -> dict[str, object]:
    """scores: (n_curves, 1 + n_boot), larger is better, NaN where a curve misses the budget."""
    covered = np.flatnonzero(~np.isnan(scores[:, 0]))
    if len(covered) < MIN_CANDIDATES:
        return {}
    order = covered[np.argsort(-scores[covered, 0], kind="stable")]
    win, second = order[0], order[1]
    bits: list[Precision] = curves["precision"].tolist()  # a bit width, or 'mixed 3.25', '4 +lora'
    row: dict[str, object] = {
        "n_candidates": len(covered),
        "winner": curves.iloc[win]["curve"],
        "winner_bits": bits[win],
        "winner_setting": curves.iloc[win]["setting"],
        "winner_value": sign * scores[win, 0],
        "runner_up": curves.iloc[second]["curve"],
        "runner_up_value": sign * scores[second, 0],
        **_margin(scores[win], scores[second], prefix=""),
        "p_win": _p_win(scores, covered, win) if paired else np.nan,
    }
    best_of: dict[Precision, int] = {}
    for c in order:
        best_of.setdefault(bits[c], int(c))
    rivals = {b: _margin(scores[win], scores[c], prefix="") for b, c in best_of.items() if b != bits[win]}
    other = [c for c in order if bits[c] != bits[win]]
    row["other_bits"] = curves.iloc[other[0]]["curve"] if other else None
    row.update(_margin(scores[win], scores[other[0]], prefix="other_bits_") if other else {})
    row.update(_ties(bits[win], rivals, paired))
    return row


def _p_win(scores: np.ndarray, covered: np.ndarray, win: int) -> float:
    """Share of replicates in which the winner has the best score among the covered curves."""
    replicates = scores[covered, 1:]
    return float(np.mean(covered[np.argmax(replicates, axis=0)] == win))


def _ties(
    winner_bits: Precision, rivals: dict[Precision, dict[str, object]], paired: bool
) -> dict[str, object]:
    """The tie set (ordered by `precision_order`), its spread, and whether 16-bit is dominated (None
    where there is no CI)."""
    if not paired:
        return {"paired_ci": False, "tied_bits": None, "tie_within": np.nan, "baseline_dominated": None}
    tied = [b for b, m in rivals.items() if not m["decisive"]]
    dominated = (
        bool(rivals[BASELINE_BITS]["decisive"]) if BASELINE_BITS in rivals
        else False if winner_bits == BASELINE_BITS else None
    )  # fmt: skip
    return {
        "paired_ci": True,
        "tied_bits": tuple(sorted([winner_bits, *tied], key=precision_order)),
        "tie_within": max((float(rivals[b]["margin"]) for b in tied), default=0.0),  # type: ignore[arg-type]
        "baseline_dominated": dominated,
    }


def _margin(best: np.ndarray, rival: np.ndarray, prefix: str) -> dict[str, object]:
    """Margin (in metric units, positive = winner better) with its paired CI; decisive: CI above 0."""
    diff = best - rival
    low, high = interval(diff)
    return {
        f"{prefix}margin": float(diff[0]),
        f"{prefix}margin_ci_low": float(low),
        f"{prefix}margin_ci_high": float(high),
        f"{prefix}decisive": bool(low > 0) if np.isfinite(low) else None,  # None: no CI, no verdict
    }


BEST_COLUMNS = ["model_family", "bits", "budget_bits", "value", "ci_low", "ci_high", "curve"]


def _best_of_family(
    family: str, curves: pd.DataFrame, values: list[np.ndarray], budgets: np.ndarray, higher_is_better: bool
) -> pd.DataFrame:
    """One family's best curve per bit width and budget, with the interval of that curve's replicates
    there. Only the chosen rows' intervals are computed: a percentile over every curve at every budget
    was most of the report's bit-optimality part at 35,000 jobs (docs/benchmarks.md)."""
    frames = []
    for c, curve in curves.iterrows():
        keep = np.flatnonzero(~np.isnan(values[c][:, 0]))
        frames.append(pd.DataFrame({
            "model_family": family, "bits": curve["precision"], "budget_bits": budgets[keep],
            "value": values[c][keep, 0], "curve": curve["curve"], "_at": [(c, j) for j in keep],
        }))  # fmt: skip
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if table.empty:
        return pd.DataFrame(columns=BEST_COLUMNS)
    table = table.sort_values("value", ascending=not higher_is_better, kind="stable")
    best = table.drop_duplicates(["model_family", "bits", "budget_bits"])
    low, high = interval(np.stack([values[c][j] for c, j in best["_at"]]))
    return best.assign(ci_low=low, ci_high=high)[BEST_COLUMNS]


def best_per_bits(
    points: pd.DataFrame, higher_is_better: bool, n_budgets: int = 60, draws: np.ndarray | None = None
) -> pd.DataFrame:
    """Per family, bit width (`precision`: 'mixed 3.25' is one of its own) and budget: the best
    interpolated value over that width's settings.

    `ci_low` / `ci_high`: the 95% interval of that curve's interpolated value over the paired
    replicates (`draws`, as in `bit_optimality`); NaN without them. Columns: `BEST_COLUMNS`.
    """
    points = points.reset_index(drop=True)
    frames = []
    for family, budgets in budget_grid(points, n_budgets).items():
        fam = points[points["model_family"] == family]
        curves, values = _interpolated(fam, _family_draws(fam, draws)[0], budgets)
        best = _best_of_family(family, curves, values, budgets, higher_is_better)
        if not best.empty:
            frames.append(best)
    if not frames:
        return pd.DataFrame(columns=BEST_COLUMNS)
    best = pd.concat(frames, ignore_index=True)
    order = best["bits"].map(precision_order)  # bit widths and mixed keys together: never compared raw
    return (
        best.assign(_order=order)
        .sort_values(["model_family", "_order", "budget_bits"])
        .drop(columns="_order")
        .reset_index(drop=True)
    )
