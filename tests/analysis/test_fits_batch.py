"""The batched effective-parameter solver against the per-replicate `least_squares` loop it replaced."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import fits
from analysis.curves import curve_points, with_baseline


def _group(law_tidy: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points = curve_points(law_tidy, "ce_wikitext2")
    family, setting = fits._groups(points)[0]
    group = with_baseline(points, family, setting)
    n = group["n_params"].to_numpy(float)
    return n / np.exp(np.mean(np.log(n))), group["bits"].to_numpy(float), group["value"].to_numpy(float)


def _cost(x: np.ndarray, n_scaled: np.ndarray, k: np.ndarray, y: np.ndarray) -> float:
    return 0.5 * float(np.sum((fits._effective_model(x, n_scaled, k) - y) ** 2))


def test_batched_bootstrap_equals_the_least_squares_loop(law_tidy: pd.DataFrame) -> None:
    n_scaled, k, y = _group(law_tidy)
    # the previous code: every start solved by least_squares, the best kept, then one solve per replicate
    loop_best = min((fits._solve_effective(n_scaled, k, y, s) for s in fits._starts(y)), key=lambda r: r.cost)
    best = fits._best_start(n_scaled, k, y)
    np.testing.assert_allclose(best, loop_best.x, rtol=1e-4, atol=1e-6)
    assert _cost(best, n_scaled, k, y) <= loop_best.cost * (1 + 1e-8)

    fitted = fits._effective_model(best, n_scaled, k)
    targets = fits._bootstrap_targets(fitted, y - fitted, 30, np.random.default_rng(3))
    loop = np.array([fits._solve_effective(n_scaled, k, t, best).x for t in targets])
    batched = fits._refit_effective(n_scaled, k, targets, best)
    assert batched.shape == loop.shape == (30, 4)
    np.testing.assert_allclose(batched, loop, rtol=1e-3, atol=1e-4)
    for b, old, t in zip(batched, loop, targets, strict=True):  # never a worse least-squares fit
        assert _cost(b, n_scaled, k, t) <= _cost(old, n_scaled, k, t) * (1 + 1e-6)


def test_batched_solver_respects_bounds_and_leaves_plateaus() -> None:
    n_scaled = np.array([0.5, 1.0, 2.0] * 3)
    k = np.repeat([5.0, 6.0, 16.0], 3)
    theta = np.array([0.5, 0.4, np.log(1.2), 2.0])
    rng = np.random.default_rng(0)
    targets = fits._effective_model(theta, n_scaled, k) + 1e-4 * rng.standard_normal((20, 9))
    plateau = np.array([0.5, 0.4, np.log(0.05), 2.0])  # gamma so small that k / gamma flattens the loss
    x = fits._refit_effective(n_scaled, k, targets, plateau)
    lower, upper = fits._bounds(targets)
    assert np.all(x >= lower) and np.all(x <= upper)
    for row, t in zip(x, targets, strict=True):
        loop = fits._solve_effective(n_scaled, k, t, plateau)
        assert _cost(row, n_scaled, k, t) <= loop.cost * (1 + 1e-6)
    assert np.median(np.exp(x[:, 2])) == pytest.approx(1.2, rel=0.3)


def test_effective_params_without_replicates_has_no_ci(law_tidy: pd.DataFrame) -> None:
    fit = fits.fit_law(curve_points(law_tidy, "ce_wikitext2"), "effective_params", n_boot=0)
    assert fit.params["estimate"].notna().all() and fit.params["ci_low"].isna().all()
