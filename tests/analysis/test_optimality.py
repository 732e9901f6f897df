from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.curves import curve_points
from analysis.optimality import best_per_bits, bit_optimality, budget_grid
from analysis.summary import describe_curve, format_bits, headline
from analysis.tidy import tidy_jobs
from pipeline.results import load_results
from tests.analysis.synthetic import Law, grid, write_study


def test_four_bit_wins_every_budget_when_it_has_the_best_intercept(law_tidy: pd.DataFrame) -> None:
    points = curve_points(law_tidy, "mean_acc")
    table = bit_optimality(points, higher_is_better=True, n_budgets=10, n_boot=300)
    four = points.loc[points["bits"] == 4, "total_model_bits"]
    inside = table[table["budget_bits"].between(four.min(), four.max())]
    assert len(inside) >= 5
    assert (inside["winner_bits"] == 4).all()
    # true margin of 4-bit over 5-bit is 0.02 while each point's se is 0.002: always decisive
    assert inside["decisive"].all() and (inside["p_win"] > 0.95).all()
    assert (inside["margin"] > 0).all() and (inside["margin_ci_low"] > 0).all()
    assert (inside["other_bits"].str.startswith("5-bit")).all()


def test_margin_within_noise_is_not_decisive(tmp_path: Path) -> None:
    law = Law(intercepts={4: -1.0, 5: -1.0005, 16: -1.2})  # 4- and 5-bit tie within noise
    write_study(tmp_path, grid(bits=(4, 5)), law=law, noise=0.01, seed=3)
    points = curve_points(tidy_jobs(load_results(tmp_path)), "mean_acc")
    table = bit_optimality(points, higher_is_better=True, n_budgets=8, n_boot=300)
    contested = table[table["n_candidates"] >= 2]
    assert not contested.empty
    assert not contested["decisive"].all()
    assert (contested["margin_ci_low"] < 0).any()


def test_lower_is_better_metric_picks_the_lowest_loss(law_tidy: pd.DataFrame) -> None:
    points = curve_points(law_tidy, "ce_wikitext2")
    table = bit_optimality(points, higher_is_better=False, n_budgets=6, n_boot=50)
    for row in table.itertuples():
        assert row.winner_value <= row.runner_up_value
        assert row.margin == pytest.approx(row.runner_up_value - row.winner_value)


def test_missing_stderr_falls_back_to_fit_residuals(law_tidy: pd.DataFrame) -> None:
    points = curve_points(law_tidy, "ce_wikitext2")  # the synthetic loss has no stderr
    assert points["se"].isna().all()
    table = bit_optimality(points, higher_is_better=False, n_budgets=6, n_boot=100)
    assert (table["margin_ci_high"] > table["margin_ci_low"]).all()


def test_budget_grid_spans_each_family(law_tidy: pd.DataFrame) -> None:
    points = curve_points(law_tidy, "mean_acc")
    budgets = budget_grid(points, 5)["toy"]
    assert budgets[0] == pytest.approx(points["total_model_bits"].min())
    assert budgets[-1] == pytest.approx(points["total_model_bits"].max())
    assert np.allclose(np.diff(np.log(budgets)), np.log(budgets[1] / budgets[0]))


def test_best_per_bits_is_the_upper_envelope(law_tidy: pd.DataFrame) -> None:
    points = curve_points(law_tidy, "mean_acc")
    best = best_per_bits(points, higher_is_better=True, n_budgets=20)
    assert set(best["bits"]) == {3, 4, 5, 6, 8, 16}
    assert not best.duplicated(["model_family", "bits", "budget_bits"]).any()
    assert (best["ci_low"] <= best["value"]).all() and (best["value"] <= best["ci_high"]).all()
    assert (best["ci_high"] - best["ci_low"]).between(0.0, 0.02).all()  # se 0.002 per point


def test_headline_states_the_answer(law_tidy: pd.DataFrame) -> None:
    points = curve_points(law_tidy, "mean_acc")
    table = bit_optimality(points, higher_is_better=True, n_budgets=10, n_boot=200)
    [sentence] = headline(table, law_tidy, "mean zero-shot accuracy")
    assert sentence.startswith("toy: at budgets from ")
    assert "4-bit with dtype fp (2 exponent bits), block 64 is bit-optimal" in sentence
    assert f"of {len(table)} budgets" in sentence
    assert "bootstrap 95% CI" in sentence


def test_formatting_helpers(law_tidy: pd.DataFrame) -> None:
    assert format_bits(8e6) == "8e+06 bits (1 MB)"
    assert describe_curve("16-bit", law_tidy) == "the 16-bit baseline"
    assert describe_curve("no such curve", law_tidy) == "no such curve"


def test_residual_se_estimates_the_noise_level(law_tidy: pd.DataFrame) -> None:
    from analysis.optimality import residual_se

    se = residual_se(curve_points(law_tidy, "ce_wikitext2"))  # the synthetic loss has noise sd 0.002
    assert 0.001 < se["toy"] < 0.006  # conservative: curvature beyond quadratic counts as noise
    exact = curve_points(law_tidy, "mean_acc")
    exact = exact.assign(value=0.05 * exact["log2_bits"] - 0.01 * exact["bits"])
    assert residual_se(exact)["toy"] == pytest.approx(0.0, abs=1e-9)


def test_two_families_get_one_sentence_each_and_an_overall_line(tmp_path: Path) -> None:
    from analysis.summary import overall_line

    configs = grid(sizes=(1_000_000, 4_000_000), bits=(3, 4)) + grid(
        sizes=(2_000_000, 8_000_000), bits=(4, 8), family="big"
    )
    write_study(tmp_path, configs, noise=0.001)
    tidy = tidy_jobs(load_results(tmp_path))
    table = bit_optimality(curve_points(tidy, "mean_acc"), higher_is_better=True, n_budgets=6, n_boot=50)
    assert set(table["model_family"]) == {"toy", "big"}
    sentences = headline(table, tidy, "mean zero-shot accuracy")
    assert [s.split(":")[0] for s in sentences] == ["big", "toy"]
    line = overall_line(table)
    assert line.startswith(f"Across 2 model families and {len(table)} budgets") and "4-bit" in line


def test_without_bootstrap_the_answer_says_there_is_no_ci(law_tidy: pd.DataFrame) -> None:
    table = bit_optimality(curve_points(law_tidy, "mean_acc"), higher_is_better=True, n_budgets=4, n_boot=0)
    assert table["margin_ci_low"].isna().all() and not table["decisive"].any()
    assert "Margins have no CI" in headline(table, law_tidy, "accuracy")[0]
