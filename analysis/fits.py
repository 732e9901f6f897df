"""Parametric bit-level scaling laws with model-level bootstrap confidence intervals.

Two laws, each fit per (model family, quantization setting) on that setting's curves plus the
family's 16-bit baseline, so that every precision shares one structure:

- `shared_slope`: metric = a_k + b * log2(total model bits), one intercept a_k per bit width k and
  one slope b for all (the paper's "almost parallel" curves made explicit);
- `effective_params`: L = A * (N_u + N_q * (1 - exp(-k / gamma)))^(-alpha) + E for a loss L, with
  only the quantized parameters N_q shrinking (`analysis.effective` says how this differs from Kumar
  et al.'s own forms).

Intervals resample whole models, not residuals: the points of one fit come from a handful of trained
models, and everything a model's training did to its loss moves all its points together. A replicate
draws the group's model sizes with replacement (all points of a drawn size, seeds of one size
included: they are one cluster) and refits with each point weighted by how often its size was drawn;
where a size has several trained seeds, the replicate also redraws them (`seed_targets`: a second
level, the same draw for all points of the size), so seed-to-seed variance enters the intervals.
With fewer than `MIN_CLUSTERS` sizes no interval is given. A parameter is marked not identified
(`identified`, `note`) when its estimate sits at a bound of the fit, lies outside its own interval,
or the interval reaches a bound (the replicates pile up there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis import effective
from analysis.curves import with_baseline
from analysis.errors import AnalysisError
from analysis.paired import CI_LEVEL
from analysis.tidy import BASELINE_SETTING, precision_name, precision_order

log = logging.getLogger(__name__)

MIN_CLUSTERS = 3  # model sizes needed for a model-level interval
BOUND_RTOL = 1e-3  # an estimate this close to a bound (relatively) sits at it
PARAM_COLUMNS = ["model_family", "setting", "law", "param", "estimate", "ci_low", "ci_high", "replicates",
                 "identified", "note"]  # fmt: skip
QUALITY_COLUMNS = ["model_family", "setting", "law", "n_points", "n_sizes", "n_fit_params", "r2", "rmse"]
SKIPPED_COLUMNS = ["model_family", "setting", "law", "reason"]


@dataclass(frozen=True)
class FitResult:
    """Fitted parameters with CIs, per-point predictions, and goodness of fit (R², RMSE) per group."""

    params: pd.DataFrame  # PARAM_COLUMNS
    predictions: pd.DataFrame  # curve points + law, predicted, residual
    quality: pd.DataFrame  # QUALITY_COLUMNS
    skipped: pd.DataFrame  # model_family, setting, law, reason


Bounds = dict[str, tuple[float, float] | None]


@dataclass(frozen=True)
class FitDraws:
    """draws[name][0] the estimate, draws[name][1:] the replicates; fitted values; each parameter's box."""

    draws: dict[str, np.ndarray]
    fitted: np.ndarray
    bounds: Bounds


FitInput = tuple[pd.DataFrame, np.ndarray, np.ndarray]  # group, replicate weights (R, n), targets (R, n)
# every group's input -> its draws (a law may solve the groups together: `effective.solve_many`)
Fitter = Callable[[Sequence[FitInput]], list[FitDraws]]


def fit_law(points: pd.DataFrame, law: str, n_boot: int = 200, seed: int = 0) -> FitResult:
    """Fit `law` ('shared_slope' or 'effective_params') to every (family, setting) of `points`.

    Groups where the law is not identifiable (one size, too few points, one precision for
    `effective_params`) are listed in `skipped` with the reason, not fit.

    Raises:
        AnalysisError: unknown law.
    """
    if law not in LAWS:
        raise AnalysisError(f"unknown law {law!r}; allowed: {sorted(LAWS)}")
    fitter, min_precisions = LAWS[law]
    rng = np.random.default_rng(seed)
    heads, inputs, skipped = [], [], []
    for family, setting in _groups(points):
        group = with_baseline(points, family, setting).reset_index(drop=True)
        head = {"model_family": family, "setting": setting, "law": law}
        reason = _unfit_reason(group, min_precisions, n_fit_params=_n_params(law, group))
        if reason:
            skipped.append({**head, "reason": reason})
            continue
        weights = cluster_weights(group, n_boot, rng)  # drawn group by group, as the fits do not draw
        inputs.append((group, weights, seed_targets(group, len(weights), rng)))
        heads.append(head)
    params, predictions, quality = [], [], []
    for head, (group, _, _), fit in zip(heads, inputs, fitter(inputs), strict=True):
        params.extend(_summarize(head, fit))
        predictions.append(group.assign(law=law, predicted=fit.fitted, residual=group["value"] - fit.fitted))
        quality.append({**head, **_quality(group["value"].to_numpy(), fit.fitted), "n_points": len(group),
                        "n_sizes": group["n_params"].nunique(),
                        "n_fit_params": _n_params(law, group)})  # fmt: skip
    return FitResult(
        params=pd.DataFrame(params, columns=PARAM_COLUMNS),
        predictions=pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame(),
        quality=pd.DataFrame(quality, columns=QUALITY_COLUMNS),
        skipped=pd.DataFrame(skipped, columns=SKIPPED_COLUMNS),
    )


def fit_families(
    points: pd.DataFrame, law: str, families: Sequence[str], n_boot: int = 200, seed: int = 0
) -> FitResult:
    """`fit_law` for each of `families` on its own, every family's replicates drawn from `seed` (common
    random numbers, as the paired draws of `analysis.units`), results in family order: a family's fit
    does not depend on which other families are fit with it, so the families can be fit apart (in
    worker processes) and joined (`join_fit_results`) into what one call over all of them gives."""
    return join_fit_results(
        [fit_law(points[points["model_family"] == family], law, n_boot, seed) for family in families]
    )


def join_fit_results(parts: Sequence[FitResult]) -> FitResult:
    """The fits of disjoint families as one `FitResult` (parts in family order)."""
    if not parts:
        params, quality = pd.DataFrame(columns=PARAM_COLUMNS), pd.DataFrame(columns=QUALITY_COLUMNS)
        return FitResult(params, pd.DataFrame(), quality, pd.DataFrame(columns=SKIPPED_COLUMNS))
    predictions = [p.predictions for p in parts if not p.predictions.empty]
    return FitResult(
        params=pd.concat([p.params for p in parts], ignore_index=True),
        predictions=pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame(),
        quality=pd.concat([p.quality for p in parts], ignore_index=True),
        skipped=pd.concat([p.skipped for p in parts], ignore_index=True),
    )


def cluster_weights(group: pd.DataFrame, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(R, n) point weights of the model-level bootstrap: each replicate draws the group's model sizes
    (clusters: `n_params`, so seeds of one size stay together) with replacement, and a point weighs
    how often its size was drawn. Replicates that drew a single size are left out (R <= n_boot);
    (0, n) with fewer than `MIN_CLUSTERS` sizes."""
    codes, sizes = pd.factorize(group["n_params"], sort=True)
    if len(sizes) < MIN_CLUSTERS or n_boot <= 0:
        return np.zeros((0, len(group)))
    counts = rng.multinomial(len(sizes), np.full(len(sizes), 1.0 / len(sizes)), size=n_boot)
    counts = counts[(counts > 0).sum(axis=1) >= 2]
    return counts[:, codes].astype(float)


def seed_targets(group: pd.DataFrame, n_rows: int, rng: np.random.Generator) -> np.ndarray:
    """(R, n) point values of the bootstrap's second level: where a size has several trained seeds
    (`seed_values`), each replicate redraws that size's seeds with replacement, the same draw for every
    point of the size (one seed's model made all of them), and a point takes the mean over the drawn
    seeds; a point with one model keeps its value. So seed-to-seed variance enters the intervals."""
    values = group["value"].to_numpy(float)
    targets = np.broadcast_to(values, (n_rows, len(group))).copy()
    if "seed_values" not in group or n_rows == 0 or all(np.size(v) < 2 for v in group["seed_values"]):
        return targets  # nothing to redraw (and no draw made: the stream continues as it was)
    for _, rows in group.groupby("n_params").groups.items():
        per_point = [np.asarray(group.at[i, "seed_values"], float) for i in rows]
        k = len(per_point[0])
        if k < 2 or any(len(v) != k for v in per_point):
            continue  # one seed, or seeds missing for some point: that size keeps its values
        draws = rng.integers(0, k, size=(n_rows, k))
        for i, seed_values in zip(rows, per_point, strict=True):
            targets[:, group.index.get_loc(i)] = seed_values[draws].mean(axis=1)
    return targets


def _groups(points: pd.DataFrame) -> list[tuple[str, str]]:
    pairs = points[["model_family", "setting"]].drop_duplicates()
    families_with_other = set(pairs.loc[pairs["setting"] != BASELINE_SETTING, "model_family"])
    keep = (pairs["setting"] != BASELINE_SETTING) | ~pairs["model_family"].isin(families_with_other)
    return sorted(map(tuple, pairs[keep].to_numpy().tolist()))


def _n_params(law: str, group: pd.DataFrame) -> int:
    return group[_key_column(group)].nunique() + 1 if law == "shared_slope" else 4


def _unfit_reason(group: pd.DataFrame, min_precisions: int, n_fit_params: int) -> str:
    if group["n_params"].nunique() < 2:
        return f"needs >= 2 model sizes, has {group['n_params'].nunique()}"
    n_precisions = group[_key_column(group)].nunique()
    if n_precisions < min_precisions:
        return f"needs >= {min_precisions} bit widths, has {n_precisions}"
    if len(group) <= n_fit_params:
        return f"needs more points than parameters ({len(group)} <= {n_fit_params})"
    return ""


def _summarize(head: dict[str, str], fit: FitDraws) -> list[dict[str, object]]:
    """One row per parameter: estimate, percentile CI of the finite replicates, identification."""
    tail = (1 - CI_LEVEL) / 2 * 100
    rows = []
    for name, values in fit.draws.items():
        boot = values[1:][np.isfinite(values[1:])]
        low, high = np.percentile(boot, [tail, 100 - tail]) if len(boot) else (np.nan, np.nan)
        note = identification_note(float(values[0]), float(low), float(high), fit.bounds.get(name))
        rows.append({**head, "param": name, "estimate": float(values[0]), "ci_low": low, "ci_high": high,
                     "replicates": len(boot), "identified": not note, "note": note})  # fmt: skip
    return rows


def identification_note(estimate: float, low: float, high: float, bounds: tuple[float, float] | None) -> str:
    """Why a parameter is not identified ('' if it is): at a bound, outside its CI, CI at a bound."""
    reasons = []
    for bound in bounds or ():
        if _near(estimate, bound):
            reasons.append(f"estimate at bound {bound:g}")
    if np.isfinite(low) and np.isfinite(high) and not low <= estimate <= high:
        reasons.append("estimate outside its CI")
    for bound in bounds or ():
        if any(np.isfinite(end) and _near(end, bound) for end in (low, high)) and not _near(estimate, bound):
            reasons.append(f"CI reaches bound {bound:g}")
    return "; ".join(reasons)


def _near(value: float, bound: float) -> bool:
    return bool(abs(value - bound) <= BOUND_RTOL * max(abs(bound), 1e-2))


def _quality(observed: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    residual = observed - predicted
    total = np.sum((observed - observed.mean()) ** 2)
    r2 = 1.0 - np.sum(residual**2) / total if total > 0 else np.nan
    return {"r2": float(r2), "rmse": float(np.sqrt(np.mean(residual**2)))}


def _key_column(group: pd.DataFrame) -> str:
    """The column that tells precisions apart: `precision` (mixed and recovered curves keyed by their own)
    where curve points carry it, else `bits`."""
    return "precision" if "precision" in group else "bits"


def _fit_shared_slope(group: pd.DataFrame, weights: np.ndarray, targets: np.ndarray) -> FitDraws:
    column = group[_key_column(group)]
    bits = sorted(column.unique(), key=precision_order)
    design = np.column_stack([(column == k).to_numpy(float) for k in bits] + [group["log2_bits"]])
    y = group["value"].to_numpy(float)
    coef = np.linalg.pinv(design) @ y
    # Each replicate is solved on its own, so equal (weights, targets) rows -- a bootstrap over a few
    # model sizes redraws the same counts often -- are solved once and scattered back, bit for bit.
    unique, inverse = np.unique(np.hstack([weights, targets]), axis=0, return_inverse=True)
    root_w = np.sqrt(unique[:, : len(y)])[:, :, None]
    weighted = root_w * design[None]  # (U, n, p): a replicate's rows, each repeated as often as drawn
    replicates = (np.linalg.pinv(weighted) @ (root_w * unique[:, len(y) :, None]))[:, :, 0]  # (U, p)
    full_rank = np.linalg.matrix_rank(weighted) == design.shape[1] if len(unique) else np.zeros(0, bool)
    replicates[~full_rank] = np.nan
    all_coef = np.vstack([coef, replicates[inverse.reshape(-1)]]).T  # (p, 1 + R)
    names = [f"a_{precision_name(k)}" for k in bits] + ["b"]
    return FitDraws(dict(zip(names, all_coef, strict=True)), design @ coef, {})


def _fit_shared_slopes(inputs: Sequence[FitInput]) -> list[FitDraws]:
    return [_fit_shared_slope(*one) for one in inputs]


def _fit_effective_params(inputs: Sequence[FitInput]) -> list[FitDraws]:
    """The effective-parameter law of every group, all groups' solves batched together (`effective.
    best_fits`, `effective.refits`: the same numbers as one group at a time, bit for bit)."""
    laws = [effective.LawInputs.from_points(group) for group, _, _ in inputs]
    ys = [group["value"].to_numpy(float) for group, _, _ in inputs]
    best = effective.best_fits(list(zip(laws, ys, strict=True)))
    boot = [i for i, (_, weights, _) in enumerate(inputs) if len(weights)]
    solved = effective.refits([(laws[i], inputs[i][2], best[i], inputs[i][1]) for i in boot])
    replicates = dict(zip(boot, solved, strict=True))
    draws = []
    for i, (law, y) in enumerate(zip(laws, ys, strict=True)):
        rows = np.vstack([best[i], replicates.get(i, np.zeros((0, 4)))])
        draws.append(FitDraws(effective.reported(rows, law.n_ref), effective.model(best[i], law),
                              effective.bounds_of(y)))  # fmt: skip
    return draws


LAWS: dict[str, tuple[Fitter, int]] = {
    "shared_slope": (_fit_shared_slopes, 1),
    "effective_params": (_fit_effective_params, 2),
}


def interpolation_loo(points: pd.DataFrame) -> FitResult:
    """Goodness of fit of the paper's piecewise-linear interpolation, by leave-one-out.

    Each interior point of a curve (not its smallest or largest model) is predicted by
    interpolating its two neighbours in log2 bits; the residuals show whether curves are straight
    enough in log bits for interpolation between measured sizes to be trusted.
    """
    predictions = _loo_predictions(points)
    if predictions.empty:
        reason = "leave-one-out needs curves with >= 3 model sizes"
        pairs = points[["model_family", "setting"]].drop_duplicates()
        skipped = pairs.assign(law="interpolation", reason=reason)
        return FitResult(
            pd.DataFrame(columns=PARAM_COLUMNS),
            pd.DataFrame(),
            pd.DataFrame(columns=QUALITY_COLUMNS),
            skipped,
        )
    quality = [
        {"model_family": f, "setting": s, "law": "interpolation", "n_points": len(g),
         "n_sizes": g["n_params"].nunique(), "n_fit_params": 0,
         **_quality(g["value"].to_numpy(), g["predicted"].to_numpy())}
        for (f, s), g in predictions.groupby(["model_family", "setting"])
    ]  # fmt: skip
    return FitResult(
        params=pd.DataFrame(columns=PARAM_COLUMNS),
        predictions=predictions,
        quality=pd.DataFrame(quality, columns=QUALITY_COLUMNS),
        skipped=pd.DataFrame(columns=SKIPPED_COLUMNS),
    )


def _loo_predictions(points: pd.DataFrame) -> pd.DataFrame:
    """Every interior point of every (family, curve), in group order, predicted from its neighbours:
    what a loop over `points.groupby(["model_family", "curve"])` gives, computed for all curves at
    once (the same arithmetic per point, so the same values bit for bit)."""
    rows = points.dropna(subset=["model_family", "curve"])
    order = np.lexsort((np.arange(len(rows)), rows["curve"].to_numpy(), rows["model_family"].to_numpy()))
    rows = rows.iloc[order]
    key = rows["model_family"].astype(str) + "\x00" + rows["curve"].astype(str)
    start = (key != key.shift()).to_numpy()
    group = np.cumsum(start) - 1
    size = np.bincount(group)[group]
    position = np.arange(len(rows)) - np.flatnonzero(start)[group]
    inner = (size >= 3) & (position >= 1) & (position <= size - 2)
    x, y = rows["log2_bits"].to_numpy(), rows["value"].to_numpy()
    at = np.flatnonzero(inner)
    frac = (x[at] - x[at - 1]) / (x[at + 1] - x[at - 1])
    predicted = y[at - 1] + frac * (y[at + 1] - y[at - 1])
    kept = rows.iloc[at]
    return kept.assign(
        law="interpolation", predicted=predicted, residual=kept["value"] - predicted
    ).reset_index(drop=True)
