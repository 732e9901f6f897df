from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.curves import curve_points
from analysis.optimality import best_per_bits, bit_optimality, budget_grid
from analysis.summary import describe_curve, format_bits, headline, overall_line
from analysis.tidy import PAPER_TASKS, tidy_jobs
from analysis.units import job_draws
from pipeline.results import load_results
from tests.analysis.conftest import SIZES
from tests.analysis.synthetic import Law, Units, grid, study_frame, write_study


def paired_table(
    raw: pd.DataFrame, metric: str, higher: bool, n_budgets: int = 10, n_boot: int = 300
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(tidy, bit-optimality table with paired replicates from the rows' units)."""
    tidy = tidy_jobs(raw)
    points = curve_points(tidy, metric)
    draws = job_draws(raw, metric, PAPER_TASKS, n_boot=n_boot)
    assert draws is not None
    return tidy, bit_optimality(points, higher, n_budgets, draws.for_groups(points["job_keys"].tolist()))


@pytest.fixture(scope="module")
def unit_raw() -> pd.DataFrame:
    """The law study with per-unit data: chunk difficulty shared by all jobs, a little noise per job."""
    return study_frame(grid(sizes=SIZES), units=Units(shared_sd=0.5, job_sd=0.002), seed=1)


def test_four_bit_wins_decisively_with_paired_units(unit_raw: pd.DataFrame) -> None:
    tidy, table = paired_table(unit_raw, "mean_acc", higher=True)
    four = tidy.loc[tidy["bits"] == 4, "total_model_bits"]
    inside = table[table["budget_bits"].between(four.min(), four.max())]
    assert len(inside) >= 5 and (inside["winner_bits"] == 4).all()
    # 4-bit leads 5-bit by 0.02 at equal bits; the shared chunk difficulty (sd 0.5) cancels in pairs
    assert (
        inside["paired_ci"].all() and inside["other_bits_decisive"].all() and (inside["p_win"] > 0.95).all()
    )
    assert (inside["tied_bits"] == (4,)).all()
    assert inside["baseline_dominated"].dropna().all()


def test_a_margin_within_paired_noise_is_a_tie(tmp_path: Path) -> None:
    law = Law(intercepts={4: -0.6, 5: -0.6005, 16: -0.8})  # 4- and 5-bit tie within noise
    raw = study_frame(grid(bits=(4, 5)), law=law, units=Units(job_sd=0.05), seed=3)
    _, table = paired_table(raw, "mean_acc", higher=True, n_budgets=8)
    contested = table[table["tied_bits"].map(len) > 1]
    assert not contested.empty
    assert contested["tied_bits"].map(lambda t: {4, 5} <= set(t)).all()
    assert not contested["other_bits_decisive"].any() and (contested["other_bits_margin_ci_low"] < 0).all()
    assert (contested["tie_within"] < 0.01).all()
    [sentence] = headline(table, tidy_jobs(raw), "mean zero-shot accuracy")
    assert (
        "no single bit width is decisively bit-optimal" in sentence and "4 and 5 bits tie within" in sentence
    )


def test_without_units_there_is_no_ci_and_no_winner(law_tidy: pd.DataFrame) -> None:
    points = curve_points(law_tidy, "mean_acc")
    table = bit_optimality(points, higher_is_better=True, n_budgets=6)
    assert not table["paired_ci"].any() and table["margin_ci_low"].isna().all()
    assert table["decisive"].isna().all() and table["tied_bits"].isna().all()
    [sentence] = headline(table, law_tidy, "mean zero-shot accuracy")
    assert "no paired CI is available" in sentence and "no bit width is named bit-optimal" in sentence
    assert "Point estimates only: the best curve is 4-bit at" in sentence


def test_a_decisive_single_winner_is_named(tmp_path: Path) -> None:
    raw = study_frame(grid(sizes=SIZES, bits=(4, 8)), units=Units(job_sd=0.002), seed=2)
    tidy, table = paired_table(raw, "mean_acc", higher=True, n_budgets=8)
    [mixed] = headline(table, tidy, "mean zero-shot accuracy")  # the largest budget: 8- and 16-bit only
    assert "4-bit alone (decisive) at 5 budgets; 8-bit alone (decisive) at 1 budget" in mixed
    table = table[table["winner_bits"] == 4]
    assert (table["tied_bits"] == (4,)).all()
    [sentence] = headline(table, tidy, "mean zero-shot accuracy")
    assert "4-bit is bit-optimal at every budget, decisively by the paired test" in sentence
    assert "best setting: 4-bit with dtype fp (2 exponent bits), block 64" in sentence
    assert "16-bit dominated at every budget where it is measured" in sentence


def test_lower_is_better_metric_picks_the_lowest_loss(unit_raw: pd.DataFrame) -> None:
    _, table = paired_table(unit_raw, "ce_wikitext2", higher=False, n_budgets=6, n_boot=50)
    for row in table.itertuples():
        assert row.winner_value <= row.runner_up_value
        assert row.margin == pytest.approx(row.runner_up_value - row.winner_value)
        assert row.margin_ci_low <= row.margin <= row.margin_ci_high


def test_budget_grid_spans_each_family(law_tidy: pd.DataFrame) -> None:
    points = curve_points(law_tidy, "mean_acc")
    budgets = budget_grid(points, 5)["toy"]
    assert budgets[0] == pytest.approx(points["total_model_bits"].min())
    assert budgets[-1] == pytest.approx(points["total_model_bits"].max())
    assert np.allclose(np.diff(np.log(budgets)), np.log(budgets[1] / budgets[0]))


def test_best_per_bits_is_the_upper_envelope_with_a_paired_band(unit_raw: pd.DataFrame) -> None:
    tidy = tidy_jobs(unit_raw)
    points = curve_points(tidy, "mean_acc")
    draws = job_draws(unit_raw, "mean_acc", PAPER_TASKS, n_boot=100)
    assert draws is not None
    best = best_per_bits(
        points, higher_is_better=True, n_budgets=20, draws=draws.for_groups(points["job_keys"])
    )
    assert set(best["bits"]) == {3, 4, 5, 6, 8, 16}
    assert not best.duplicated(["model_family", "bits", "budget_bits"]).any()
    assert (best["ci_low"] <= best["value"] + 1e-12).all() and (
        best["value"] <= best["ci_high"] + 1e-12
    ).all()
    bare = best_per_bits(points, higher_is_better=True, n_budgets=20)
    assert bare["ci_low"].isna().all()
    np.testing.assert_allclose(bare["value"], best["value"])


def test_formatting_helpers(law_tidy: pd.DataFrame) -> None:
    assert format_bits(8e6) == "8e+06 bits (1 MB)"
    assert describe_curve("16-bit", law_tidy) == "the 16-bit baseline"
    assert describe_curve("no such curve", law_tidy) == "no such curve"


def test_two_families_get_one_sentence_each_and_an_overall_line(tmp_path: Path) -> None:
    configs = grid(sizes=(1_000_000, 4_000_000), bits=(3, 4)) + grid(
        sizes=(2_000_000, 8_000_000), bits=(4, 8), family="big"
    )
    write_study(tmp_path, configs, noise=0.001)
    tidy = tidy_jobs(load_results(tmp_path))
    table = bit_optimality(curve_points(tidy, "mean_acc"), higher_is_better=True, n_budgets=6)
    assert set(table["model_family"]) == {"toy", "big"}
    sentences = headline(table, tidy, "mean zero-shot accuracy")
    assert [s.split(",")[0] for s in sentences] == ["big", "toy"]
    line = overall_line(table)
    assert line.startswith(f"Across 2 model families and {len(table)} budgets") and "(not a test)" in line
