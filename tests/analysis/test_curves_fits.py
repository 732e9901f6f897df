from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.curves import check_sizes, curve_points, interpolate_curves, interpolation_weights
from analysis.errors import AnalysisError
from analysis.fits import cluster_weights, fit_law, identification_note, interpolation_loo, seed_targets
from analysis.tidy import tidy_jobs
from pipeline.results import load_results
from tests.analysis.synthetic import Law, grid, study_frame, write_study


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


def test_model_level_weights_keep_each_size_together() -> None:
    group = pd.DataFrame({"n_params": [1, 1, 2, 2, 2, 3, 4, 4]})  # e.g. two seeds of size 1
    weights = cluster_weights(group, 200, np.random.default_rng(0))
    assert weights.shape[1] == len(group) and 0 < len(weights) <= 200
    for size in (1, 2, 4):
        rows = weights[:, (group["n_params"] == size).to_numpy()]
        assert (rows == rows[:, :1]).all()  # every point of a size weighs the same in a replicate
    assert ((weights > 0).reshape(len(weights), -1).sum(axis=1) >= 2).all()
    per_size = weights[:, [0, 2, 5, 6]]
    np.testing.assert_array_equal(per_size.sum(axis=1), 4)  # 4 sizes drawn with replacement
    assert cluster_weights(group[group["n_params"] <= 2], 200, np.random.default_rng(0)).shape == (0, 5)


def test_fewer_than_three_sizes_get_no_interval(law_tidy: pd.DataFrame) -> None:
    two = law_tidy[law_tidy["n_params"].isin(sorted(law_tidy["n_params"].unique())[:2])]
    fit = fit_law(curve_points(two, "mean_acc"), "shared_slope", n_boot=100)
    assert fit.params["estimate"].notna().all() and fit.params["ci_low"].isna().all()
    assert (fit.params["replicates"] == 0).all() and (fit.quality["n_sizes"] == 2).all()


def test_model_level_interval_widens_with_what_each_model_adds(tmp_path: Path) -> None:
    sizes = (1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000, 32_000_000)
    own = dict(zip(sizes, np.random.default_rng(0).normal(0.0, 0.02, len(sizes)), strict=True))
    widths = []
    for name, offset in (("points", None), ("models", lambda c: own[c.n_params])):
        # "points": independent noise per point; "models": also a shift shared by all points of a size
        write_study(tmp_path / name, grid(sizes=sizes, bits=(3, 4, 8)), noise=0.002, seed=1, offset=offset)
        fit = fit_law(curve_points(tidy_jobs(load_results(tmp_path / name)), "mean_acc"), "shared_slope", 400)
        b = fit.params.set_index("param").loc["b"]
        assert b["ci_low"] < b["estimate"] < b["ci_high"] and b["identified"]
        widths.append(b["ci_high"] - b["ci_low"])
    assert widths[1] > 5 * widths[0]  # a shift shared by a model's points moves the fit; the CI carries it


def test_identification_notes() -> None:
    assert identification_note(1.0, 0.5, 1.5, (0.05, 256.0)) == ""
    assert identification_note(256.0, 30.0, 256.0, (0.05, 256.0)) == "estimate at bound 256"
    assert identification_note(2.0, 2.5, 3.0, None) == "estimate outside its CI"
    assert identification_note(9.0, 3.0, 256.0, (0.05, 256.0)) == "CI reaches bound 256"
    assert identification_note(1.0, np.nan, np.nan, (0.05, 256.0)) == ""


def test_gamma_beyond_its_bound_is_marked_not_identified(tmp_path: Path) -> None:
    write_study(tmp_path, grid(sizes=(1_000_000, 4_000_000, 16_000_000, 64_000_000)), law=Law(gamma=5000.0))
    fit = fit_law(
        curve_points(tidy_jobs(load_results(tmp_path)), "ce_wikitext2"), "effective_params", n_boot=40
    )
    gamma = fit.params.set_index("param").loc["gamma"]
    assert gamma["estimate"] == pytest.approx(256.0) and not gamma["identified"]
    assert "estimate at bound 256" in gamma["note"]


def test_effective_params_shrinks_only_the_quantized_parameters(tmp_path: Path, law: Law) -> None:
    # a quarter to most of each model stays in 16 bits, as the ladder's embeddings and head do
    sizes = (1_000_000, 4_000_000, 16_000_000, 64_000_000)
    unquantized = {n: int(n * share) for n, share in zip(sizes, (0.7, 0.5, 0.35, 0.2), strict=True)}
    configs = [replace(c, unquantized=unquantized[c.n_params]) for c in grid(sizes=sizes)]
    write_study(tmp_path, configs, law=law)
    points = curve_points(tidy_jobs(load_results(tmp_path)), "ce_wikitext2")
    assert (
        points.loc[points["bits"] < 16, "n_quantized_params"] < points.loc[points["bits"] < 16, "n_params"]
    ).all()
    params = fit_law(points, "effective_params", n_boot=20).params.set_index("param")["estimate"]
    assert params["gamma"] == pytest.approx(law.gamma, rel=1e-3)
    assert params["alpha"] == pytest.approx(law.alpha, rel=1e-3)
    assert params["E"] == pytest.approx(law.E, abs=1e-3)


def test_seed_targets_redraw_a_sizes_seeds_together() -> None:
    group = pd.DataFrame({
        "n_params": [1, 1, 2],
        "value": [1.0, 2.0, 5.0],
        "seed_values": [(0.0, 1.0, 2.0), (1.0, 2.0, 3.0), (5.0,)],
    })  # fmt: skip
    targets = seed_targets(group, 500, np.random.default_rng(0))
    assert targets.shape == (500, 3)
    assert np.allclose(targets[:, 1] - targets[:, 0], 1.0)  # one draw of size 1's seeds for both points
    assert np.all(targets[:, 2] == 5.0)  # one model: its value in every replicate
    assert targets[:, 0].std() > 0.3 and set(np.round(targets[:, 0] * 3)) <= set(range(7))


def test_seed_to_seed_variance_widens_the_fit_intervals(tmp_path: Path) -> None:
    sizes = (1_000_000, 2_000_000, 4_000_000, 8_000_000)
    base = study_frame(grid(sizes=sizes, bits=(3, 4, 8)), noise=0.002, seed=1)
    rng = np.random.default_rng(3)
    widths = []
    for spread in (0.0, 0.03):
        copies = []
        for s in range(3):  # three seeds per size: a shift per (seed, size) shared by its points
            shift = {n: rng.normal(0.0, spread) for n in sizes} if s else dict.fromkeys(sizes, 0.0)
            copies.append(base.assign(
                job_key=base["job_key"] + f"-s{s}", model=base["model"] + f"+s{s}",
                value=base["value"] + base["n_params"].map(shift),
            ))  # fmt: skip
        points = curve_points(tidy_jobs(pd.concat(copies, ignore_index=True)), "mean_acc")
        assert points["seed_values"].map(len).eq(3).all()
        b = fit_law(points, "shared_slope", 400).params.set_index("param").loc["b"]
        widths.append(b["ci_high"] - b["ci_low"])
    assert widths[1] > 2 * widths[0]
