"""Mixed and recovered curves are precisions of their own ('mixed 3.25', '3 +lora') in the curves, the
bit-optimality table, its figure and the Answer, never the cheapest candidate's bit width; uniform
studies keep their integer bit widths."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis.curves import curve_points
from analysis.optimality import best_per_bits, bit_optimality
from analysis.plots_curves import (
    MIXED_LINESTYLE,
    RECOVERED_LINESTYLE,
    plot_bit_optimality,
    plot_scaling_curves,
    precision_style,
)
from analysis.summary import describe_curve, headline, overall_line
from analysis.tidy import PAPER_TASKS, Precision, precision_keys, precision_label, precision_order, tidy_jobs
from analysis.units import job_draws
from tests.analysis.conftest import SIZES
from tests.analysis.synthetic import Config, Law, Units, grid, study_frame

METRIC = "ce_wikitext2"
CANDIDATES = ["nf2-b64", "nf3-b64", "nf4-b64"]
MIXED = "mixed knapsack3.25[nf2-b64+nf3-b64+nf4-b64]"  # its curve label (no bit width: a target)
LAW = Law(intercepts={2: -0.7, 3: -0.63, 4: -0.6, 16: -0.8})


def allocation(target: float) -> str:
    layers = {"layers.0.attn": "nf4-b64", "layers.0.mlp": "nf2-b64", "layers.1.attn": "nf3-b64"}
    fields = {"allocator": "knapsack", "target_bits": target, "candidates": CANDIDATES, "layers": layers}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def configs(n: int) -> list[Config]:
    """Uniform nf at 2, 3, 4 bits, 16-bit, a mixed 3.25-bit allocation (its `bits`: 2, the cheapest
    candidate's; 3.5 bits a parameter with block constants) and a recovered 3-bit job."""
    return [
        Config(n, 2, "nf"), Config(n, 3, "nf"), Config(n, 4, "nf"), Config(n, 16),
        Config(n, 2, "nf", allocation=allocation(3.25), extra_bits=1.25),
        Config(n, 3, "nf", recover="lora", adapter_bits=n // 8),
    ]  # fmt: skip


def offset(cfg: Config) -> float:
    """The mixed allocation far better than any uniform curve at its bits (loss 0.3 nats lower)."""
    return 0.3 if cfg.allocation else 0.0


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    configs_ = [c for n in SIZES for c in configs(n)]
    return study_frame(configs_, law=LAW, seed=4, offset=offset, units=Units(n_units=60, job_sd=0.002))


@pytest.fixture(scope="module")
def tidy(raw: pd.DataFrame) -> pd.DataFrame:
    return tidy_jobs(raw)


@pytest.fixture(scope="module")
def points(tidy: pd.DataFrame) -> pd.DataFrame:
    return curve_points(tidy, METRIC)


@pytest.fixture(scope="module")
def table(raw: pd.DataFrame, points: pd.DataFrame) -> pd.DataFrame:
    draws = job_draws(raw, METRIC, PAPER_TASKS, n_boot=200)
    assert draws is not None
    return bit_optimality(points, False, n_budgets=10, draws=draws.for_groups(points["job_keys"].tolist()))


def test_keys_name_the_target_and_the_recovery_not_the_cheapest_bits(tidy: pd.DataFrame) -> None:
    keys = dict(zip(tidy["curve"], precision_keys(tidy), strict=False))
    assert keys == {"2-bit nf B64": 2, "3-bit nf B64": 3, "4-bit nf B64": 4, "16-bit": 16,
                    MIXED: "mixed 3.25", "3-bit nf B64 +lora": "3 +lora"}  # fmt: skip
    assert (tidy.loc[tidy["curve"] == MIXED, "bits"] == 2).all()  # what used to make it a '2-bit' curve


def test_uniform_keys_are_the_integer_bit_widths() -> None:
    uniform = tidy_jobs(study_frame(grid(sizes=SIZES[:2], bits=(3, 4))))
    keys = precision_keys(uniform)
    assert keys.dtype == np.int64 and keys.tolist() == uniform["bits"].tolist()
    old = uniform.drop(columns=["allocation", "recover", "recover_params", "adapter_bits"], errors="ignore")
    assert precision_keys(old).tolist() == keys.tolist()  # results written before those columns existed


def test_labels_and_order_of_keys() -> None:
    assert [precision_label(k) for k in (4, "mixed 3.25", "3 +lora", "mixed 4 +lora")] == [
        "4-bit", "mixed 3.25-bit", "3-bit +lora", "mixed 4-bit +lora"
    ]  # fmt: skip
    keys: list[Precision] = [16, "mixed 3.25", 4, "3 +lora", 3, 2, "mixed 3"]
    assert sorted(keys, key=precision_order) == [2, 3, "3 +lora", "mixed 3", "mixed 3.25", 4, 16]


def test_the_mixed_curve_wins_as_mixed_not_as_two_bit(table: pd.DataFrame) -> None:
    won = table[table["winner"] == MIXED]
    assert len(won) >= 3, table[["budget_bits", "winner"]]
    assert (won["winner_bits"] == "mixed 3.25").all() and (won["tied_bits"] == ("mixed 3.25",)).all()
    # the 2-bit uniform curve is the best rival of another precision (were the mixed curve '2-bit', it
    # could not be), and decisively worse
    assert (won["other_bits"] == "2-bit nf B64").all() and won["other_bits_decisive"].all()


def test_the_two_bit_uniform_curve_stays_its_own_precision(points: pd.DataFrame) -> None:
    best = best_per_bits(points, higher_is_better=False, n_budgets=20)
    curves = best.groupby("bits", sort=False)["curve"].agg(set).to_dict()
    assert curves[2] == {"2-bit nf B64"} and curves["mixed 3.25"] == {MIXED}
    assert curves["3 +lora"] == {"3-bit nf B64 +lora"} and curves[3] == {"3-bit nf B64"}
    keys = list(dict.fromkeys(best["bits"]))
    assert keys == sorted(keys, key=precision_order)


def test_the_answer_names_the_mixed_target_and_its_allocator(table: pd.DataFrame, tidy: pd.DataFrame) -> None:
    [sentence] = headline(table, tidy, "cross-entropy", "nats")
    assert "mixed 3.25-bit (knapsack) alone (decisive) at" in sentence, sentence
    assert "2-bit alone" not in sentence
    [only] = headline(table[table["winner"] == MIXED], tidy, "cross-entropy", "nats")
    assert "mixed 3.25-bit (knapsack) is bit-optimal at every budget, decisively" in only, only
    assert "best setting: mixed 3.25-bit (knapsack allocation over nf2-b64, nf3-b64, nf4-b64)" in only
    wins = int((table["winner_bits"] == "mixed 3.25").sum())
    assert f"mixed 3.25-bit {wins}" in overall_line(table)


def test_a_recovered_curve_is_described_with_its_adapters(tidy: pd.DataFrame) -> None:
    described = describe_curve("3-bit nf B64 +lora", tidy)
    assert described == "3-bit with dtype nf, block 64, lora recovery adapters"
    assert describe_curve("3-bit nf B64", tidy) == "3-bit with dtype nf, block 64"


def test_the_figure_draws_mixed_and_recovered_curves_apart(points: pd.DataFrame, table: pd.DataFrame) -> None:
    best = best_per_bits(points, higher_is_better=False, n_budgets=20)
    fig = plot_bit_optimality(best, table, "cross-entropy", "toy")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert lines["best mixed 3.25-bit"].get_linestyle() == MIXED_LINESTYLE
    assert lines["best 3-bit +lora"].get_linestyle() == RECOVERED_LINESTYLE
    assert lines["best 2-bit"].get_linestyle() == "-" and lines["best 4-bit"].get_linestyle() == "-"
    assert precision_style("mixed 3.25")[0] not in {precision_style(3)[0], precision_style(4)[0]}


def test_a_tie_names_the_allocator_of_the_mixed_rival(tidy: pd.DataFrame) -> None:
    row = {"model_family": "toy", "budget_bits": 1e7, "paired_ci": True, "winner": "3-bit nf B64",
           "winner_bits": 3, "runner_up": MIXED, "other_bits": MIXED, "other_bits_margin": 0.001,
           "decisive": False, "tied_bits": (3, "mixed 3.25"), "tie_within": 0.001,
           "baseline_dominated": None}  # fmt: skip
    [sentence] = headline(pd.DataFrame([row]), tidy, "cross-entropy", "nats")
    assert "3-bit and mixed 3.25-bit (knapsack) tie within 0.001 nats at 1 budget" in sentence, sentence


def test_the_scaling_curves_keep_the_mixed_curve_apart_from_two_bit(points: pd.DataFrame) -> None:
    fig = plot_scaling_curves(points, "cross-entropy", "toy", higher_is_better=False)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["2-bit nf B64", "3-bit nf B64", "3-bit nf B64 +lora", "mixed 3.25-bit knapsack",
                      "4-bit nf B64", "16-bit"]  # fmt: skip


def test_precision_bits_and_names_for_fits() -> None:
    """Fits read a mixed curve's bit width as its target and name its intercept by its own key."""
    from analysis.tidy import precision_bits, precision_name

    assert [precision_bits(k) for k in (4, "mixed 3.25", "4 +lora")] == [4.0, 3.25, 4.0]
    assert [precision_name(k) for k in (4, "mixed 3.25", "4 +lora")] == ["4", "mixed3.25", "4+lora"]


def test_effective_law_takes_a_mixed_curves_target_as_k() -> None:
    from analysis.effective import LawInputs

    group = pd.DataFrame({"n_params": [1e6, 2e6], "n_quantized_params": [8e5, 1.6e6], "bits": [2, 2],
                          "precision": ["mixed 3.25", "mixed 3.25"]})  # fmt: skip
    assert LawInputs.from_points(group).k.tolist() == [3.25, 3.25]
    assert LawInputs.from_points(group.drop(columns="precision")).k.tolist() == [2.0, 2.0]
