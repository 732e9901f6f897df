"""Accuracies not distinguishable from chance are flagged and kept out of the Answer."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.chance import at_chance_families, chance_rate, chance_test
from analysis.render import render_markdown
from analysis.report import build_sections, study_from_results
from analysis.tidy import PAPER_TASKS, tidy_jobs
from tests.analysis.conftest import SIZES
from tests.analysis.synthetic import Law, Units, grid, study_frame

AT_CHANCE = Law(intercepts={k: 0.3125 for k in (3, 4, 5, 6, 8, 16)}, slope=0.0)  # mean accuracy = chance


@pytest.fixture(scope="module")
def chance_raw() -> pd.DataFrame:
    """Mean accuracy at chance with standard errors of 0.02 a task; LAMBADA (chance 0) well above."""
    return study_frame(grid(sizes=SIZES), law=AT_CHANCE, noise=0.01, seed=4, units=Units(job_sd=0.002))


def test_chance_rates() -> None:
    assert chance_rate("mean_acc", PAPER_TASKS) == pytest.approx(0.3125)
    assert chance_rate("acc_piqa", PAPER_TASKS) == 0.5
    assert chance_rate("acc_hellaswag@fast-limit500", PAPER_TASKS) == 0.25
    assert chance_rate("ce_wikitext2", PAPER_TASKS) is None
    assert chance_rate("mean_acc", ("piqa", "mmlu")) is None  # a task of unknown chance rate


def test_accuracy_at_chance_is_flagged_and_one_above_is_not(chance_raw: pd.DataFrame) -> None:
    tidy = tidy_jobs(chance_raw)
    mean = chance_test(tidy, "mean_acc", PAPER_TASKS).iloc[0]
    assert mean["tested"] and mean["at_chance"] and mean["best_z"] < mean["z_critical"]
    assert mean["z_critical"] == pytest.approx(2.865, abs=0.001)  # one-sided 5%, Bonferroni over 24 jobs
    assert at_chance_families(tidy, "mean_acc", PAPER_TASKS) == {"toy"}
    assert at_chance_families(tidy, "acc_lambada_openai", PAPER_TASKS) == set()  # 0.36 against 0
    assert chance_test(tidy, "ce_wikitext2", PAPER_TASKS).empty


def test_without_standard_errors_there_is_no_test() -> None:
    tidy = tidy_jobs(study_frame(grid(sizes=SIZES[:2]), law=AT_CHANCE))  # noise 0: no stderr
    row = chance_test(tidy, "mean_acc", PAPER_TASKS).iloc[0]
    assert not row["tested"] and not row["at_chance"]


def test_the_answer_keeps_an_accuracy_at_chance_out(chance_raw: pd.DataFrame) -> None:
    study = study_from_results(chance_raw, "chance", n_boot=50, n_budgets=6)
    assert study.metric == "ce_wikitext2" and "not distinguishable from chance" in study.metric_note
    text = render_markdown("chance", build_sections(study))
    answer = text.split("## Gaps")[0]
    assert "Flagged: mean zero-shot accuracy is not distinguishable from chance in toy" in answer
    assert "Flagged: accuracy (lambada_openai)" not in answer
    assert "toy, cross-entropy (nats/token) (wikitext2)" in answer and "paired test" in answer


def test_an_explicit_metric_at_chance_is_answered_from_the_loss(chance_raw: pd.DataFrame) -> None:
    study = study_from_results(chance_raw, "chance", metric="mean_acc", n_boot=50, n_budgets=6)
    answer = render_markdown("chance", build_sections(study)).split("## Gaps")[0]
    assert "(Answered from the loss, as mean zero-shot accuracy is at chance.) toy, cross-entropy" in answer
    assert "toy, mean zero-shot accuracy" not in answer
