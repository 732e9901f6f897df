"""The methods section: every non-rtn job paired with the rtn job of the same model and recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.errors import AnalysisError
from analysis.methods import method_pairs, method_summary
from analysis.report import load_study
from analysis.sections import has_methods

ROOT = Path(__file__).resolve().parents[2] / "results"


@pytest.fixture(scope="module")
def gptq_study():
    return load_study(ROOT / "gptq-h100-ladder", n_boot=10)


def test_pairs_match_model_and_recipe_and_sign_the_gain(gptq_study):
    tidy, metric = gptq_study.tidy, gptq_study.metric
    pairs = method_pairs(tidy, metric)
    quantized = tidy[(tidy["method"] == "gptq") & tidy["bits"].isin([3, 4])]
    assert (
        len(pairs) == len(quantized) == 112
    )  # 96 shared-Hessian jobs + 16 sequential ones, each matched once
    assert (pairs["gain"] == pairs["rtn"] - pairs["method_value"]).all()  # a loss: lower is better
    one = pairs[(pairs["method"] == "gptq") & (pairs["dtype"] == "nf") & (pairs["bits"] == 3)]
    for _, row in one.iterrows():
        block = tidy["block_size"].astype(object).fillna("none") == row["block_size"]
        same = (tidy["model"] == row["model"]) & (tidy["dtype"] == "nf") & (tidy["bits"] == 3) & block
        rtn = tidy[(tidy["method"] == "rtn") & same]
        assert len(rtn) == 1 and rtn[metric].iloc[0] == row["rtn"]


def test_summary_counts_wins_per_setting(gptq_study):
    summary = method_summary(method_pairs(gptq_study.tidy, gptq_study.metric))
    assert set(summary["method"]) == {"gptq", "gptq(hessians=sequential)"}
    assert len(summary[summary["method"] == "gptq"]) == 2 * 4 * 3  # bits x data types x block sizes
    assert summary["wins"].str.endswith("of 4").all()


def test_a_study_of_rtn_alone_has_no_methods_section():
    study = load_study(ROOT / "h100-ladder-heldout", n_boot=10)
    assert not has_methods(study)
    assert study.tidy is not None and study.metric is not None
    with pytest.raises(AnalysisError, match="no other method"):
        method_pairs(study.tidy, study.metric)
