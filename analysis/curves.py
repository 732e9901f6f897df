"""Scaling curves: one metric against total model bits, one curve per bit precision across sizes.

A curve's `precision` (`analysis.tidy.precision_key`) is what "per bit width" means downstream: its bit
width for a uniform curve, 'mixed 3.25' for a mixed allocation (whose `bits` column is only its cheapest
candidate's), '4 +lora' for a recovered one.

The paper's curves are "almost parallel" in log bits, so it interpolated each precision's curve
piecewise-linearly in log2(total model bits) between measured model sizes instead of fitting a power
law; `interpolate_curves` does exactly that, and never extrapolates past a curve's smallest or largest
model.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.metrics import check_metric, se_column
from analysis.tidy import BASELINE_SETTING, precision_keys

log = logging.getLogger(__name__)

CURVE_KEYS: tuple[str, ...] = ("model_family", "setting", "curve", "bits", "precision")
POINT_COLUMNS: tuple[str, ...] = (
    *CURVE_KEYS, "n_params", "n_quantized_params", "total_model_bits", "log2_bits", "value", "se", "job_keys",
    "seed_values",
)  # fmt: skip


def curve_points(tidy: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The points of every scaling curve: one row per (curve, model size) with `value` and `se`.

    Jobs of the same curve and size (repeats, seeds) are averaged; `job_keys` names them (a tuple), so
    paired replicates (`analysis.units.JobDraws.for_groups`) can be averaged the same way;
    `seed_values` holds the value of each trained model of that size (a ladder's `+seeds<N>` members,
    ordered by model label), which the fits resample. `se` is the metric's standard error where the
    results carry one, else NaN. `precision`: each curve's `analysis.tidy.precision_key`.

    Raises:
        AnalysisError: `metric` has no values.
    """
    check_metric(tidy, metric)
    se = tidy[se_column(metric)] if se_column(metric) in tidy else pd.Series(np.nan, index=tidy.index)
    rows = tidy.assign(value=tidy[metric], se=se, precision=precision_keys(tidy))
    rows = rows.dropna(subset=["value", "total_model_bits"])
    rows = rows[rows["total_model_bits"] > 0]
    keys = [*CURVE_KEYS, "n_params"]
    grouped = rows.groupby(keys, dropna=False, sort=True)
    points = grouped.agg(
        n_quantized_params=("n_quantized_params", "mean"), total_model_bits=("total_model_bits", "mean"),
        value=("value", "mean"), se=("se", "mean"),
    ).reset_index()  # fmt: skip
    points["job_keys"] = group_tuples(grouped.ngroup().to_numpy(), rows["job_key"].tolist(), len(points))
    per_model = rows.groupby([*keys, "model"], dropna=False, sort=True)["value"].mean()
    # the per-model means of one point, in model order: (curve, size) groups of per_model's first levels,
    # in the same sorted order as the points (every point has at least one model)
    of_point = per_model.groupby(level=list(range(len(keys))), dropna=False, sort=True).ngroup().to_numpy()
    points["seed_values"] = group_tuples(of_point, per_model.tolist(), len(points))
    points["log2_bits"] = np.log2(points["total_model_bits"])
    return points[list(POINT_COLUMNS)].sort_values([*CURVE_KEYS, "log2_bits"]).reset_index(drop=True)


def group_tuples(codes: np.ndarray, values: list[object], n_groups: int) -> list[tuple[object, ...]]:
    """Per group 0..n_groups-1, the tuple of the `values` whose `codes` name it, in their order: what
    `groupby(...).agg(tuple)` gives, without a Python call per group (~4 s a metric at 35,000 jobs)."""
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_groups + 1))
    ordered = [values[i] for i in order]
    return [tuple(ordered[a:b]) for a, b in itertools.pairwise(bounds)]


def check_sizes(points: pd.DataFrame, min_sizes: int = 2) -> None:
    """Raise `AnalysisError` unless every model family has at least `min_sizes` model sizes."""
    if points.empty:
        raise AnalysisError("no curve points: no finished job has a value for this metric")
    sizes = points.groupby("model_family")["n_params"].nunique()
    few = sizes[sizes < min_sizes]
    if not few.empty:
        detail = ", ".join(f"{family!r}: {n}" for family, n in few.items())
        raise AnalysisError(f"scaling curves need >= {min_sizes} model sizes per family; got {detail}")


def with_baseline(points: pd.DataFrame, family: str, setting: str) -> pd.DataFrame:
    """The points of one setting of one family plus that family's 16-bit baseline curve."""
    fam = points[points["model_family"] == family]
    return fam[fam["setting"].isin([setting, BASELINE_SETTING])]


def interpolation_weights(x: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Matrix W (len(at) x len(x)) with W @ y = piecewise-linear interpolation of (x, y) at `at`.

    `x` must be strictly increasing; rows for `at` outside [x[0], x[-1]] are NaN (no extrapolation).
    """
    if len(x) == 0 or np.any(np.diff(x) <= 0):
        raise AnalysisError(f"interpolation needs strictly increasing x; got {x.tolist()}")
    weights = np.full((len(at), len(x)), np.nan)
    inside = (at >= x[0]) & (at <= x[-1])
    weights[inside] = 0.0
    if len(x) == 1:
        weights[inside, 0] = 1.0
        return weights
    right = np.clip(np.searchsorted(x, at, side="right"), 1, len(x) - 1)
    left = right - 1
    frac = (at - x[left]) / (x[right] - x[left])
    rows = np.flatnonzero(inside)
    weights[rows, left[rows]] = 1.0 - frac[rows]
    weights[rows, right[rows]] += frac[rows]
    return weights


def interpolate_curves(points: pd.DataFrame, budgets_bits: Sequence[float]) -> pd.DataFrame:
    """Each curve's metric at each memory budget (total model bits), piecewise-linear in log2 bits.

    Returns one row per (curve, budget) inside the curve's measured range, columns `CURVE_KEYS`,
    `budget_bits`, `value`.
    """
    at = np.log2(np.asarray(budgets_bits, dtype=float))
    frames = []
    for keys, curve in points.groupby(list(CURVE_KEYS), dropna=False, sort=True):
        weights = interpolation_weights(curve["log2_bits"].to_numpy(), at)
        values = weights @ curve["value"].to_numpy()
        keep = ~np.isnan(values)
        frame = pd.DataFrame(
            {"budget_bits": np.asarray(budgets_bits, dtype=float)[keep], "value": values[keep]}
        )
        for name, key in zip(CURVE_KEYS, keys, strict=True):
            frame[name] = key
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*CURVE_KEYS, "budget_bits", "value"])
    return pd.concat(frames, ignore_index=True)[[*CURVE_KEYS, "budget_bits", "value"]]
