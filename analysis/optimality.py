"""The bit-optimal precision per memory budget, and how sure we are of it.

For a grid of memory budgets (total model bits) per model family, every curve (bit width +
quantization setting) covering the budget is interpolated there (`analysis.curves`), the best one
wins, and its margin over the runner-up is compared with a parametric bootstrap: each measured point
is redrawn from Normal(value, se) and the whole interpolation repeated. `se` is the metric's own
standard error where the results carry it, else the family's scatter around smooth curves
(`residual_se`; a conservative stand-in: it includes any misfit as well as noise).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from analysis.curves import CURVE_KEYS, interpolation_weights
from analysis.errors import AnalysisError

log = logging.getLogger(__name__)

CI_LEVEL = 0.95
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


def fill_noise(points: pd.DataFrame) -> pd.DataFrame:
    """Points with `se` filled where missing (see module doc) and `noise_source` saying from where."""
    filled = points.copy()
    filled["noise_source"] = np.where(filled["se"].notna(), "stderr", "fit residual")
    if filled["se"].notna().all():
        return filled
    filled["se"] = filled["se"].fillna(filled["model_family"].map(residual_se(points)))
    none = filled["se"].isna()
    filled.loc[none, "noise_source"] = "none"
    filled["se"] = filled["se"].fillna(0.0)
    if none.any():
        log.warning("no standard error and no fit residual for %d points: margins get no CI", int(none.sum()))
    return filled


def residual_se(points: pd.DataFrame) -> pd.Series:
    """Per family, the scatter of points around smooth curves: the dof-corrected residual RMS of
    value = a_k + b_k*x + c*x^2 (x = log2 bits; a line per bit width, curvature c shared per setting).

    NaN for a family without residual degrees of freedom.
    """
    result = {}
    for family, fam in points.groupby("model_family"):
        ssr, dof = 0.0, 0
        for _, group in fam.groupby("setting"):
            x = group["log2_bits"].to_numpy() - group["log2_bits"].mean()
            dummies = [(group["bits"] == k).to_numpy(float) for k in sorted(group["bits"].unique())]
            design = np.column_stack([*dummies, *(d * x for d in dummies), x**2])
            coef, *_ = np.linalg.lstsq(design, group["value"].to_numpy(), rcond=None)
            ssr += float(np.sum((group["value"].to_numpy() - design @ coef) ** 2))
            dof += len(group) - np.linalg.matrix_rank(design)
        result[family] = np.sqrt(ssr / dof) if dof > 0 else np.nan
    return pd.Series(result, dtype=float)


def bit_optimality(
    points: pd.DataFrame,
    higher_is_better: bool,
    n_budgets: int = 12,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (family, budget) with >= 2 candidate curves: winner, runner-up, margins, CIs.

    Columns: model_family, budget_bits, n_candidates, winner, winner_bits, winner_setting,
    winner_value, runner_up, runner_up_value, margin, margin_ci_low, margin_ci_high, decisive
    (CI excludes 0), p_win (share of bootstrap draws the winner wins), and the same margin columns
    against the best curve of another bit width (other_bits, other_bits_margin, ...).
    """
    points = fill_noise(points)
    rng = np.random.default_rng(seed)
    sign = 1.0 if higher_is_better else -1.0
    rows = []
    for family, budgets in budget_grid(points, n_budgets).items():
        fam = points[points["model_family"] == family]
        curves, scores = _interpolated_draws(fam, budgets, n_boot, rng)
        for j, budget in enumerate(budgets):
            row = _budget_row(curves, sign * scores[:, j, :], sign)
            if row:
                rows.append({"model_family": family, "budget_bits": float(budget), **row})
    table = pd.DataFrame(rows)
    if table.empty:
        log.warning("no budget is covered by %d or more curves", MIN_CANDIDATES)
    return table


def _interpolated_draws(
    fam: pd.DataFrame, budgets: np.ndarray, n_boot: int, rng: np.random.Generator
) -> tuple[pd.DataFrame, np.ndarray]:
    """(curves, values): values[c, j, d] is curve c at budget j in draw d (d=0: measured values)."""
    at = np.log2(budgets)
    curves, values = [], []
    for keys, curve in fam.groupby(list(CURVE_KEYS), sort=True):
        weights = interpolation_weights(curve["log2_bits"].to_numpy(), at)
        noise = rng.standard_normal((len(curve), n_boot)) * curve["se"].to_numpy()[:, None]
        draws = curve["value"].to_numpy()[:, None] + np.column_stack([np.zeros(len(curve)), noise])
        values.append(weights @ draws)
        curves.append(dict(zip(CURVE_KEYS, keys, strict=True)))
    return pd.DataFrame(curves), np.stack(values)


def _budget_row(curves: pd.DataFrame, scores: np.ndarray, sign: float) -> dict[str, object]:
    """scores: (n_curves, 1 + n_boot), larger is better, NaN where a curve misses the budget."""
    covered = np.flatnonzero(~np.isnan(scores[:, 0]))
    if len(covered) < MIN_CANDIDATES:
        return {}
    order = covered[np.argsort(-scores[covered, 0], kind="stable")]
    win, second = order[0], order[1]
    winner = curves.iloc[win]
    row: dict[str, object] = {
        "n_candidates": len(covered),
        "winner": winner["curve"],
        "winner_bits": int(winner["bits"]),
        "winner_setting": winner["setting"],
        "winner_value": sign * scores[win, 0],
        "runner_up": curves.iloc[second]["curve"],
        "runner_up_value": sign * scores[second, 0],
        **_margin(scores[win], scores[second], prefix=""),
        "p_win": float(
            np.mean(np.nanargmax(np.where(np.isnan(scores), -np.inf, scores)[:, 1:], axis=0) == win)
        )
        if scores.shape[1] > 1
        else np.nan,
    }
    other = [c for c in order if curves.iloc[c]["bits"] != winner["bits"]]
    row["other_bits"] = curves.iloc[other[0]]["curve"] if other else None
    row.update(_margin(scores[win], scores[other[0]], prefix="other_bits_") if other else {})
    return row


def _margin(best: np.ndarray, rival: np.ndarray, prefix: str) -> dict[str, object]:
    """Margin (in metric units, positive = winner better) with its bootstrap CI."""
    diff = best - rival
    tail = (1 - CI_LEVEL) / 2 * 100
    low, high = np.percentile(diff[1:], [tail, 100 - tail]) if len(diff) > 1 else (np.nan, np.nan)
    return {
        f"{prefix}margin": float(diff[0]),
        f"{prefix}margin_ci_low": float(low),
        f"{prefix}margin_ci_high": float(high),
        f"{prefix}decisive": bool(low > 0),
    }


BEST_COLUMNS = ["model_family", "bits", "budget_bits", "value", "ci_low", "ci_high", "curve"]


def best_per_bits(
    points: pd.DataFrame, higher_is_better: bool, n_budgets: int = 60, n_boot: int = 200, seed: int = 0
) -> pd.DataFrame:
    """Per family, bit width and budget: the best interpolated value over that width's settings.

    `ci_low` / `ci_high`: the bootstrap 95% interval of that curve's interpolated value (points
    redrawn as in `bit_optimality`). Columns: `BEST_COLUMNS` (curve: the setting that gives it).
    """
    points = fill_noise(points)
    rng = np.random.default_rng(seed)
    tail = (1 - CI_LEVEL) / 2 * 100
    frames = []
    for family, budgets in budget_grid(points, n_budgets).items():
        curves, values = _interpolated_draws(points[points["model_family"] == family], budgets, n_boot, rng)
        low, high = (
            np.percentile(values[:, :, 1:], [tail, 100 - tail], axis=2) if n_boot else (values[:, :, 0],) * 2
        )
        for c, curve in curves.iterrows():
            keep = ~np.isnan(values[c, :, 0])
            frames.append(pd.DataFrame({
                "model_family": family, "bits": curve["bits"], "budget_bits": budgets[keep],
                "value": values[c, keep, 0], "ci_low": low[c, keep], "ci_high": high[c, keep],
                "curve": curve["curve"],
            }))  # fmt: skip
    if not frames:
        return pd.DataFrame(columns=BEST_COLUMNS)
    table = pd.concat(frames, ignore_index=True).sort_values("value", ascending=not higher_is_better)
    best = table.drop_duplicates(["model_family", "bits", "budget_bits"])
    return best[BEST_COLUMNS].sort_values(["model_family", "bits", "budget_bits"]).reset_index(drop=True)
