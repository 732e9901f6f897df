from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.curves import check_sizes, curve_points, interpolate_curves, interpolation_weights
from analysis.errors import AnalysisError
from analysis.fits import fit_law, interpolation_loo
from tests.analysis.synthetic import Law


def test_interpolation_weights_are_linear_and_never_extrapolate() -> None:
    x = np.array([0.0, 1.0, 3.0])
    y = np.array([1.0, 3.0, 2.0])
    at = np.array([-0.5, 0.0, 0.5, 2.0, 3.0, 3.5])
    values = interpolation_weights(x, at) @ y
    assert np.isnan(values[0]) and np.isnan(values[-1])
    np.testing.assert_allclose(values[1:-1], [1.0, 2.0, 2.5, 2.0])
    with pytest.raises(AnalysisError, match="strictly increasing"):
        interpolation_weights(np.array([1.0, 1.0]), at)


def test_interpolation_is_linear_in_log_bits(law_tidy: pd.DataFrame, law: Law) -> None:
    points = curve_points(law_tidy, "mean_acc")
    four = points[points["bits"] == 4]
    budget = float(np.sqrt(four["total_model_bits"].iloc[0] * four["total_model_bits"].iloc[1]))
    values = interpolate_curves(four, [budget, 1.0])
    assert len(values) == 1  # 1 bit is outside the curve
    expected = four["value"].iloc[:2].mean()  # geometric midpoint = arithmetic mean in log bits
    assert values["value"].iloc[0] == pytest.approx(expected)


def test_curves_need_two_sizes(law_tidy: pd.DataFrame) -> None:
    one = curve_points(law_tidy[law_tidy["n_params"] == law_tidy["n_params"].min()], "mean_acc")
    with pytest.raises(AnalysisError, match=r"need >= 2 model sizes per family; got 'toy': 1"):
        check_sizes(one)


def test_unknown_metric_names_the_allowed_ones(law_tidy: pd.DataFrame) -> None:
    with pytest.raises(AnalysisError, match=r"metric .acc_mmlu. has no values.*mean_acc"):
        curve_points(law_tidy, "acc_mmlu")


def test_shared_slope_recovers_the_law(law_tidy: pd.DataFrame, law: Law) -> None:
    fit = fit_law(curve_points(law_tidy, "mean_acc"), "shared_slope", n_boot=200, seed=0)
    params = fit.params.set_index("param")
    assert params.loc["b", "estimate"] == pytest.approx(law.slope, abs=1e-3)
    for bits, intercept in law.intercepts.items():
        assert params.loc[f"a_{bits}", "estimate"] == pytest.approx(intercept, abs=0.01)
    assert (params["ci_low"] <= params["estimate"]).all() and (params["estimate"] <= params["ci_high"]).all()
    assert (params["ci_high"] - params["ci_low"]).max() < 0.03
    assert fit.quality["r2"].iloc[0] > 0.99


def test_effective_params_recovers_the_law(law_tidy: pd.DataFrame, law: Law) -> None:
    fit = fit_law(curve_points(law_tidy, "ce_wikitext2"), "effective_params", n_boot=60, seed=0)
    params = fit.params.set_index("param")["estimate"]
    assert params["alpha"] == pytest.approx(law.alpha, rel=0.05)
    assert params["gamma"] == pytest.approx(law.gamma, rel=0.1)
    assert params["E"] == pytest.approx(law.E, abs=0.02)
    assert params["A"] == pytest.approx(law.A, rel=0.2)
    ci = fit.params.set_index("param")
    assert ci.loc["gamma", "ci_low"] < law.gamma * 1.1 and ci.loc["gamma", "ci_high"] > law.gamma * 0.9


def test_fits_skip_groups_that_cannot_be_identified(law_tidy: pd.DataFrame) -> None:
    only_16 = law_tidy[law_tidy["bits"] == 16]
    fit = fit_law(curve_points(only_16, "ce_wikitext2"), "effective_params", n_boot=5)
    assert fit.params.empty
    assert "needs >= 2 bit widths" in fit.skipped["reason"].iloc[0]
    with pytest.raises(AnalysisError, match="unknown law 'power'"):
        fit_law(curve_points(law_tidy, "mean_acc"), "power")


def test_interpolation_leave_one_out_is_exact_on_straight_curves(law_tidy: pd.DataFrame) -> None:
    points = curve_points(law_tidy, "mean_acc")
    exact = points.assign(value=0.1 * points["log2_bits"] + points["bits"] * 0.01)
    loo = interpolation_loo(exact)
    assert len(loo.predictions) == 2 * points["curve"].nunique()  # 4 sizes -> 2 interior points each
    np.testing.assert_allclose(loo.predictions["residual"], 0.0, atol=1e-12)
