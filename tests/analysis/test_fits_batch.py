"""The batched effective-parameter solver against scipy's `least_squares`, one fit at a time."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import effective, fits
from analysis.curves import curve_points, with_baseline


def _inputs(law_tidy: pd.DataFrame) -> tuple[effective.LawInputs, np.ndarray]:
    points = curve_points(law_tidy, "ce_wikitext2")
    family, setting = fits._groups(points)[0]
    group = with_baseline(points, family, setting)
    return effective.LawInputs.from_points(group), group["value"].to_numpy(float)


def _cost(x: np.ndarray, inputs: effective.LawInputs, y: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones_like(y) if w is None else w
    return 0.5 * float(np.sum(w * (effective.model(x, inputs) - y) ** 2))


def test_batched_fit_equals_the_least_squares_loop(law_tidy: pd.DataFrame) -> None:
    inputs, y = _inputs(law_tidy)
    loop_best = min((effective.solve(inputs, y, s) for s in effective.starts(y)), key=lambda r: r.cost)
    best = effective.best_fit(inputs, y)
    np.testing.assert_allclose(best, loop_best.x, rtol=1e-4, atol=1e-6)
    assert _cost(best, inputs, y) <= loop_best.cost * (1 + 1e-8)

    fitted = effective.model(best, inputs)
    rng = np.random.default_rng(3)
    targets = fitted + rng.choice(y - fitted, size=(30, len(y)))
    loop = np.array([effective.solve(inputs, t, best).x for t in targets])
    batched = effective.refit(inputs, targets, best)
    assert batched.shape == loop.shape == (30, 4)
    np.testing.assert_allclose(batched, loop, rtol=1e-3, atol=1e-4)
    for b, old, t in zip(batched, loop, targets, strict=True):  # never a worse least-squares fit
        assert _cost(b, inputs, t) <= _cost(old, inputs, t) * (1 + 1e-6)


def test_a_weight_of_two_is_the_point_counted_twice(law_tidy: pd.DataFrame) -> None:
    inputs, y = _inputs(law_tidy)
    best = effective.best_fit(inputs, y)
    weights = np.ones((1, len(y)))
    weights[0, :5] = 2.0
    weights[0, -3:] = 0.0
    weighted = effective.refit(inputs, y[None], best, weights)[0]
    keep = np.repeat(np.arange(len(y)), weights[0].astype(int))
    twice = effective.LawInputs(
        inputs.n_unquantized[keep], inputs.n_quantized[keep], inputs.k[keep], inputs.n_ref
    )
    repeated = effective.refit(twice, y[keep][None], best)[0]
    np.testing.assert_allclose(weighted, repeated, rtol=1e-5, atol=1e-7)


def test_batched_solver_respects_bounds_and_leaves_plateaus() -> None:
    n = np.array([0.5, 1.0, 2.0] * 3)
    inputs = effective.LawInputs(0.2 * n, 0.8 * n, np.repeat([5.0, 6.0, 16.0], 3), 1.0)
    theta = np.array([0.5, 0.4, np.log(1.2), 2.0])
    rng = np.random.default_rng(0)
    targets = effective.model(theta, inputs) + 1e-4 * rng.standard_normal((20, 9))
    plateau = np.array([0.5, 0.4, np.log(0.05), 2.0])  # gamma so small that k / gamma flattens the loss
    x = effective.refit(inputs, targets, plateau)
    assert np.all(x >= effective.LOWER) and np.all(x[:, 2] <= effective.UPPER[2])
    assert np.all(x[:, 3] <= targets.min(axis=1) + 1e-12)
    for row, t in zip(x, targets, strict=True):
        loop = effective.solve(inputs, t, plateau)
        assert _cost(row, inputs, t) <= loop.cost * (1 + 1e-6)
    assert np.median(np.exp(x[:, 2])) == pytest.approx(1.2, rel=0.3)


def test_the_jacobian_is_the_model_derivative() -> None:
    inputs = effective.LawInputs(
        np.array([0.3, 1.0, 0.0]), np.array([0.7, 2.0, 1.5]), np.array([3.0, 4.0, 8.0]), 1.0
    )
    x = np.array([0.2, 0.5, np.log(1.7), 1.1])
    step = 1e-6
    numeric = np.column_stack([
        (effective.model(x + step * e, inputs) - effective.model(x - step * e, inputs)) / (2 * step)
        for e in np.eye(4)
    ])  # fmt: skip
    np.testing.assert_allclose(effective.jacobian(x, inputs), numeric, rtol=1e-6, atol=1e-9)


def test_effective_params_without_replicates_has_no_ci(law_tidy: pd.DataFrame) -> None:
    fit = fits.fit_law(curve_points(law_tidy, "ce_wikitext2"), "effective_params", n_boot=0)
    assert fit.params["estimate"].notna().all() and fit.params["ci_low"].isna().all()
    assert (fit.params["replicates"] == 0).all()
