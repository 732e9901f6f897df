"""Parametric bit-level scaling laws with residual-bootstrap confidence intervals.

Two laws, each fit per (model family, quantization setting) on that setting's curves plus the
family's 16-bit baseline, so that every precision shares one structure:

- `shared_slope`: metric = a_k + b * log2(total model bits), one intercept a_k per bit width k and
  one slope b for all (the paper's "almost parallel" curves made explicit);
- `effective_params` (Kumar et al. 2024): L = A * (N * (1 - exp(-k / gamma)))^(-alpha) + E for a
  loss L (cross-entropy), N parameters and k bits: fewer bits act as fewer effective parameters.

Intervals come from a residual bootstrap: refit on fitted values plus resampled residuals. The
replicates are solved together: `shared_slope` by one pseudo-inverse product for all of them,
`effective_params` by a batched, bounded Levenberg-Marquardt (`_solve_effective_batch`) from the
point estimate and three other gammas per replicate, keeping the lowest cost (at least as good a
least-squares fit as the per-replicate `least_squares` loop it replaced, hundreds of times faster).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import OptimizeResult, least_squares

from analysis.curves import with_baseline
from analysis.errors import AnalysisError
from analysis.tidy import BASELINE_SETTING

log = logging.getLogger(__name__)

CI_LEVEL = 0.95
PARAM_COLUMNS = ["model_family", "setting", "law", "param", "estimate", "ci_low", "ci_high"]
QUALITY_COLUMNS = ["model_family", "setting", "law", "n_points", "n_fit_params", "r2", "rmse"]


@dataclass(frozen=True)
class FitResult:
    """Fitted parameters with CIs, per-point predictions, and goodness of fit (R², RMSE) per group."""

    params: pd.DataFrame  # PARAM_COLUMNS
    predictions: pd.DataFrame  # curve points + law, predicted, residual
    quality: pd.DataFrame  # QUALITY_COLUMNS
    skipped: pd.DataFrame  # model_family, setting, law, reason


FitDraws = tuple[dict[str, np.ndarray], np.ndarray]  # (param -> [estimate, *replicates]), fitted values
Fitter = Callable[[pd.DataFrame, int, np.random.Generator], FitDraws]


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
    params, predictions, quality, skipped = [], [], [], []
    for family, setting in _groups(points):
        group = with_baseline(points, family, setting).reset_index(drop=True)
        head = {"model_family": family, "setting": setting, "law": law}
        reason = _unfit_reason(group, min_precisions, n_fit_params=_n_params(law, group))
        if reason:
            skipped.append({**head, "reason": reason})
            continue
        draws, predicted = fitter(group, n_boot, rng)
        params.extend(_summarize(head, draws))
        predictions.append(group.assign(law=law, predicted=predicted, residual=group["value"] - predicted))
        quality.append(
            {
                **head,
                **_quality(group["value"].to_numpy(), predicted),
                "n_points": len(group),
                "n_fit_params": _n_params(law, group),
            }
        )
    return FitResult(
        params=pd.DataFrame(params, columns=PARAM_COLUMNS),
        predictions=pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame(),
        quality=pd.DataFrame(quality, columns=QUALITY_COLUMNS),
        skipped=pd.DataFrame(skipped, columns=["model_family", "setting", "law", "reason"]),
    )


def _groups(points: pd.DataFrame) -> list[tuple[str, str]]:
    pairs = points[["model_family", "setting"]].drop_duplicates()
    families_with_other = set(pairs.loc[pairs["setting"] != BASELINE_SETTING, "model_family"])
    keep = (pairs["setting"] != BASELINE_SETTING) | ~pairs["model_family"].isin(families_with_other)
    return sorted(map(tuple, pairs[keep].to_numpy().tolist()))


def _n_params(law: str, group: pd.DataFrame) -> int:
    return group["bits"].nunique() + 1 if law == "shared_slope" else 4


def _unfit_reason(group: pd.DataFrame, min_precisions: int, n_fit_params: int) -> str:
    if group["n_params"].nunique() < 2:
        return f"needs >= 2 model sizes, has {group['n_params'].nunique()}"
    if group["bits"].nunique() < min_precisions:
        return f"needs >= {min_precisions} bit widths, has {group['bits'].nunique()}"
    if len(group) <= n_fit_params:
        return f"needs more points than parameters ({len(group)} <= {n_fit_params})"
    return ""


def _summarize(head: dict[str, str], draws: dict[str, np.ndarray]) -> list[dict[str, object]]:
    """draws[name][0] is the point estimate, draws[name][1:] the bootstrap replicates."""
    tail = (1 - CI_LEVEL) / 2 * 100
    rows = []
    for name, values in draws.items():
        boot = values[1:][np.isfinite(values[1:])]
        low, high = np.percentile(boot, [tail, 100 - tail]) if len(boot) else (np.nan, np.nan)
        rows.append({**head, "param": name, "estimate": float(values[0]), "ci_low": low, "ci_high": high})
    return rows


def _quality(observed: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    residual = observed - predicted
    total = np.sum((observed - observed.mean()) ** 2)
    r2 = 1.0 - np.sum(residual**2) / total if total > 0 else np.nan
    return {"r2": float(r2), "rmse": float(np.sqrt(np.mean(residual**2)))}


def _bootstrap_targets(
    fitted: np.ndarray, residual: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """n_boot x n synthetic targets: fitted values plus residuals drawn with replacement (centered)."""
    centered = residual - residual.mean()
    picks = rng.integers(0, len(residual), size=(n_boot, len(residual)))
    return fitted[None, :] + centered[picks]


def _fit_shared_slope(group: pd.DataFrame, n_boot: int, rng: np.random.Generator) -> FitDraws:
    bits = sorted(group["bits"].unique())
    design = np.column_stack([(group["bits"] == k).to_numpy(float) for k in bits] + [group["log2_bits"]])
    y = group["value"].to_numpy(float)
    pinv = np.linalg.pinv(design)
    coef = pinv @ y
    fitted = design @ coef
    targets = _bootstrap_targets(fitted, y - fitted, n_boot, rng)
    all_coef = np.column_stack([coef, pinv @ targets.T])  # (n_params, 1 + n_boot)
    names = [f"a_{int(k)}" for k in bits] + ["b"]
    return dict(zip(names, all_coef, strict=True)), fitted


def _fit_effective_params(group: pd.DataFrame, n_boot: int, rng: np.random.Generator) -> FitDraws:
    n = group["n_params"].to_numpy(float)
    k = group["bits"].to_numpy(float)
    y = group["value"].to_numpy(float)
    n_ref = float(np.exp(np.mean(np.log(n))))
    n_scaled = n / n_ref
    best = _best_start(n_scaled, k, y)
    fitted = _effective_model(best, n_scaled, k)
    targets = _bootstrap_targets(fitted, y - fitted, n_boot, rng)
    replicates = _refit_effective(n_scaled, k, targets, best)
    raw = np.vstack([best, replicates])  # (1 + n_boot, 4): log A', alpha, log gamma, E
    draws = {
        "A": np.exp(raw[:, 0]) * n_ref ** raw[:, 1],  # A' (N / n_ref)^-alpha = A' n_ref^alpha N^-alpha
        "alpha": raw[:, 1],
        "gamma": np.exp(raw[:, 2]),
        "E": raw[:, 3],
    }
    return draws, fitted


def _refit_effective(
    n_scaled: np.ndarray, k: np.ndarray, targets: np.ndarray, best: np.ndarray
) -> np.ndarray:
    """Each target row refit from `best` and from `best` with other gammas; the lowest cost wins.

    gamma is weakly identified (flat once k / gamma is large), so a single local solve can stall on
    a plateau that another start (or `least_squares`' trust region) leaves for a lower minimum.
    """
    starts = [best] + [np.array([*best[:2], np.log(gamma), best[3]]) for gamma in (0.5, 2.0, 8.0)]
    rows = len(targets)
    stacked = np.vstack([np.broadcast_to(start, (rows, 4)) for start in starts])
    solved, cost = _solve_effective_batch(n_scaled, k, np.tile(targets, (len(starts), 1)), stacked)
    pick = np.argmin(cost.reshape(len(starts), rows), axis=0)
    return solved.reshape(len(starts), rows, 4)[pick, np.arange(rows)]


def _best_start(n_scaled: np.ndarray, k: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The point estimate: all `_starts` solved at once, the best one polished by `least_squares`."""
    starts = np.array(_starts(y))
    solved, cost = _solve_effective_batch(n_scaled, k, np.broadcast_to(y, (len(starts), len(y))), starts)
    candidate = solved[int(np.argmin(cost))]
    polished = _solve_effective(n_scaled, k, y, candidate)
    return polished.x if polished.cost <= float(np.min(cost)) else candidate


def _effective_model(x: np.ndarray, n_scaled: np.ndarray, k: np.ndarray) -> np.ndarray:
    log_a, alpha, log_gamma, e = x
    n_eff = n_scaled * (1.0 - np.exp(-k / np.exp(log_gamma)))
    return np.exp(log_a) * n_eff ** (-alpha) + e


def _starts(y: np.ndarray) -> list[np.ndarray]:
    e0 = 0.5 * float(np.min(y))
    log_a0 = float(np.log(max(float(np.mean(y)) - e0, 1e-6)))
    return [np.array([log_a0, alpha, np.log(gamma), e0]) for alpha in (0.1, 0.5) for gamma in (0.5, 2.0, 8.0)]


_FTOL = 1e-10  # a batched solve stops once a step lowers the cost by less than this, relatively
_LOWER = np.array([-30.0, 1e-4, np.log(0.05), 0.0])  # log A', alpha, log gamma, E
_UPPER = np.array([30.0, 4.0, np.log(256.0), np.inf])  # E <= min(y), set per fit


def _bounds(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Box bounds for targets y (..., n): lower (4,), upper (..., 4) with E capped at min(y)."""
    upper = np.broadcast_to(_UPPER, (*y.shape[:-1], 4)).copy()
    upper[..., 3] = np.maximum(np.min(y, axis=-1), 1e-9)
    return _LOWER, upper


def _solve_effective(n_scaled: np.ndarray, k: np.ndarray, y: np.ndarray, start: np.ndarray) -> OptimizeResult:
    lower, upper = _bounds(y)
    x0 = np.clip(start, lower + 1e-9, upper - 1e-9)
    return least_squares(
        lambda x: _effective_model(x, n_scaled, k) - y,
        x0,
        jac=lambda x: _effective_jacobian(x, n_scaled, k),
        bounds=(lower, upper),
        x_scale="jac",
        max_nfev=2000,
    )


def _solve_effective_batch(
    n_scaled: np.ndarray, k: np.ndarray, targets: np.ndarray, starts: np.ndarray, max_iter: int = 400
) -> tuple[np.ndarray, np.ndarray]:
    """`_solve_effective` for many targets (R, n) from starts (R, 4) at once: (x (R, 4), cost (R,)).

    A bounded Levenberg-Marquardt run on all rows together (numpy batched 4x4 solves): Marquardt
    damping (scale-free like x_scale="jac"), variables at a bound that the gradient pushes outward
    held there, steps clipped into the box; a row stops once an accepted step lowers its cost by
    less than `_FTOL` relatively, or no step lowers it any more.
    """
    lower, upper = _bounds(targets)
    x = np.clip(starts, lower + 1e-9, upper - 1e-9)
    residual, jac = _effective_batch_eval(x, n_scaled, k, targets)
    cost = 0.5 * np.sum(residual**2, axis=1)
    damping = np.full(len(x), 1e-3)
    live = np.flatnonzero(np.isfinite(cost))
    eye = np.eye(4)
    for _ in range(max_iter):
        if not len(live):
            break
        r, j, xl, hi, lam = residual[live], jac[live], x[live], upper[live], damping[live]
        jt = j.transpose(0, 2, 1)
        grad = (jt @ r[:, :, None])[:, :, 0]
        normal = jt @ j
        diag = np.diagonal(normal, axis1=1, axis2=2)
        scale = np.maximum(diag, 1e-12 * diag.max(axis=1, keepdims=True) + 1e-300)
        free = ~(((xl <= lower) & (grad > 0)) | ((xl >= hi) & (grad < 0)))
        mask = free[:, :, None] & free[:, None, :]
        system = np.where(mask, normal + lam[:, None, None] * scale[:, :, None] * eye, eye)
        step = -np.linalg.solve(system, np.where(free, grad, 0.0)[:, :, None])[:, :, 0]
        trial = np.clip(xl + step, lower, hi)
        trial_residual, trial_jac = _effective_batch_eval(trial, n_scaled, k, targets[live])
        trial_cost = 0.5 * np.sum(trial_residual**2, axis=1)
        better = np.isfinite(trial_cost) & (trial_cost < cost[live])
        converged = better & (cost[live] - trial_cost <= _FTOL * cost[live])
        take = live[better]
        x[take], residual[take], jac[take] = trial[better], trial_residual[better], trial_jac[better]
        cost[take] = trial_cost[better]
        damping[live] = np.where(better, lam / 3.0, lam * 2.0)
        live = live[~converged & (damping[live] <= 1e10)]
    return x, cost


def _effective_batch_eval(
    x: np.ndarray, n_scaled: np.ndarray, k: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Residuals (R, n) and Jacobians (R, n, 4) of `_effective_model` for parameter rows x (R, 4)."""
    log_a, alpha, log_gamma = (x[:, i : i + 1] for i in range(3))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        gamma = np.exp(log_gamma)
        decay = np.exp(-k / gamma)
        share = 1.0 - decay
        base = n_scaled * share
        power = np.exp(log_a) * base ** (-alpha)
        residual = power + x[:, 3:4] - targets
        jac = np.stack(
            [power, -power * np.log(base), alpha * power * decay * k / (gamma * share), np.ones_like(power)],
            axis=-1,
        )
    return residual, jac


def _effective_jacobian(x: np.ndarray, n_scaled: np.ndarray, k: np.ndarray) -> np.ndarray:
    """d model / d (log A', alpha, log gamma, E), analytic (the bootstrap refits hundreds of times)."""
    log_a, alpha, log_gamma, _ = x
    gamma = np.exp(log_gamma)
    decay = np.exp(-k / gamma)
    share = 1.0 - decay
    power = np.exp(log_a) * (n_scaled * share) ** (-alpha)
    d_log_gamma = alpha * power * decay * k / (gamma * share)
    return np.column_stack([power, -power * np.log(n_scaled * share), d_log_gamma, np.ones_like(power)])


LAWS: dict[str, tuple[Fitter, int]] = {
    "shared_slope": (_fit_shared_slope, 1),
    "effective_params": (_fit_effective_params, 2),
}


def interpolation_loo(points: pd.DataFrame) -> FitResult:
    """Goodness of fit of the paper's piecewise-linear interpolation, by leave-one-out.

    Each interior point of a curve (not its smallest or largest model) is predicted by
    interpolating its two neighbours in log2 bits; the residuals show whether curves are straight
    enough in log bits for interpolation between measured sizes to be trusted.
    """
    preds = []
    for _, curve in points.groupby(["model_family", "curve"], sort=True):
        x, y = curve["log2_bits"].to_numpy(), curve["value"].to_numpy()
        if len(curve) < 3:
            continue
        frac = (x[1:-1] - x[:-2]) / (x[2:] - x[:-2])
        predicted = y[:-2] + frac * (y[2:] - y[:-2])
        inner = curve.iloc[1:-1]
        preds.append(
            inner.assign(law="interpolation", predicted=predicted, residual=inner["value"] - predicted)
        )
    if not preds:
        reason = "leave-one-out needs curves with >= 3 model sizes"
        pairs = points[["model_family", "setting"]].drop_duplicates()
        skipped = pairs.assign(law="interpolation", reason=reason)
        return FitResult(
            pd.DataFrame(columns=PARAM_COLUMNS),
            pd.DataFrame(),
            pd.DataFrame(columns=QUALITY_COLUMNS),
            skipped,
        )
    predictions = pd.concat(preds, ignore_index=True)
    quality = [
        {"model_family": f, "setting": s, "law": "interpolation", "n_points": len(g), "n_fit_params": 0,
         **_quality(g["value"].to_numpy(), g["predicted"].to_numpy())}
        for (f, s), g in predictions.groupby(["model_family", "setting"])
    ]  # fmt: skip
    return FitResult(
        params=pd.DataFrame(columns=PARAM_COLUMNS),
        predictions=predictions,
        quality=pd.DataFrame(quality, columns=QUALITY_COLUMNS),
        skipped=pd.DataFrame(columns=["model_family", "setting", "law", "reason"]),
    )
