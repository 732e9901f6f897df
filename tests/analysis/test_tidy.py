from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.errors import AnalysisError
from analysis.eval_variants import EVAL_COLUMNS
from analysis.metrics import default_loss, default_metric, higher_is_better, metric_label
from analysis.tidy import METHOD_COLUMNS, VARIANT_COLUMNS, failed_jobs, study_grid, tidy_jobs
from pipeline.results import load_results
from tests.analysis.synthetic import (
    TASK_OFFSETS,
    Config,
    Law,
    job_rows,
    law_metrics,
    write_failed,
    write_study,
)


def test_one_row_per_job_with_mean_accuracy_and_perplexity(tmp_path: Path) -> None:
    law = Law()
    configs = write_study(tmp_path, [Config(2_000_000, 4), Config(2_000_000, 16)], law=law)
    tidy = tidy_jobs(load_results(tmp_path))
    assert len(tidy) == 2
    row = tidy[tidy["bits"] == 4].iloc[0]
    assert row["mean_acc"] == pytest.approx(law.accuracy(4, configs[0].n_params * configs[0].bits_per_param))
    assert row["ce_wikitext2"] == pytest.approx(law.loss(2_000_000, 4))
    assert row["ppl_wikitext2"] == pytest.approx(np.exp(row["ce_wikitext2"]))
    assert row["total_model_bits"] == pytest.approx(2_000_000 * 4.25)
    assert row["curve"] == "4-bit fp e2 B64"
    assert tidy[tidy["bits"] == 16].iloc[0]["curve"] == "16-bit"
    assert "ppl_lambada_openai" not in tidy.columns  # lambada's perplexity is not a text set


def test_mean_accuracy_uses_only_the_chosen_tasks(tmp_path: Path) -> None:
    write_study(tmp_path, [Config(2_000_000, 4)])
    raw = load_results(tmp_path)
    both = tidy_jobs(raw, tasks=("piqa", "hellaswag"))
    all_four = tidy_jobs(raw)
    assert both["mean_acc"].iloc[0] == pytest.approx(all_four["mean_acc"].iloc[0])  # offsets cancel
    piqa = tidy_jobs(raw, tasks=("piqa",))
    assert piqa["mean_acc"].iloc[0] == pytest.approx(all_four["mean_acc"].iloc[0] + TASK_OFFSETS["piqa"])


def test_job_missing_a_task_gets_no_mean_accuracy(tmp_path: Path) -> None:
    from pipeline.results import write_job_rows

    full, partial = Config(2_000_000, 4), Config(2_000_000, 5)
    rng = np.random.default_rng(0)
    write_job_rows(tmp_path, full.key, job_rows(full, law_metrics(full, Law(), 0.0, rng)))
    some = [m for m in law_metrics(partial, Law(), 0.0, rng) if m[0] != "piqa"]
    write_job_rows(tmp_path, partial.key, job_rows(partial, some))
    tidy = tidy_jobs(load_results(tmp_path)).set_index("bits")
    assert not np.isnan(tidy.loc[4, "mean_acc"])
    assert np.isnan(tidy.loc[5, "mean_acc"])


def test_failed_jobs_are_listed_not_dropped_silently(tmp_path: Path) -> None:
    write_study(tmp_path, [Config(2_000_000, 4)])
    write_failed(tmp_path, Config(2_000_000, 3), error="boom: out of memory")
    raw = load_results(tmp_path)
    failed = failed_jobs(raw)
    assert failed["error"].tolist() == ["boom: out of memory"]
    assert failed["method"].tolist() == ["rtn"]
    assert len(tidy_jobs(raw)) == 1
    grid = study_grid(raw).set_index("axis")["values"]
    assert grid["jobs finished"] == "1" and grid["jobs failed"] == "1"
    # a study of the paper's kind (rtn, linear layers only) shows no method or scope axis
    assert not {"method", "quantize_embeddings", "quantize_lm_head"} & set(grid.index)


def test_all_jobs_failed_is_a_clear_error(tmp_path: Path) -> None:
    write_failed(tmp_path, Config(2_000_000, 3))
    with pytest.raises(AnalysisError, match="all 1 jobs failed"):
        tidy_jobs(load_results(tmp_path))


def test_missing_columns_are_named() -> None:
    with pytest.raises(AnalysisError, match=r"lack columns \['job_key'"):
        tidy_jobs(pd.DataFrame({"value": [1.0]}))


def test_metric_registry() -> None:
    assert higher_is_better("mean_acc") and higher_is_better("acc_piqa")
    assert not higher_is_better("ppl_wikitext2") and not higher_is_better("ce_x")
    assert metric_label("ce_wikitext2") == "cross-entropy (nats/token) (wikitext2)"
    with pytest.raises(AnalysisError, match="unknown metric 'foo'"):
        higher_is_better("foo")


def test_default_metrics(law_tidy: pd.DataFrame) -> None:
    assert default_metric(law_tidy) == "mean_acc"
    assert default_loss(law_tidy) == "ce_wikitext2"
    assert default_metric(law_tidy.drop(columns=["mean_acc"])) == "ce_wikitext2"


def test_constant_accuracy_is_not_the_headline(law_tidy: pd.DataFrame) -> None:
    assert default_metric(law_tidy.assign(mean_acc=0.0)) == "ce_wikitext2"  # tiny models: acc 0 everywhere


# The tidy table of a study with the paper's tasks before method, scope and evaluation columns existed.
COLUMNS_BEFORE = [
    "job_key", "study", "model", "model_family", "n_params", "n_quantized_params", "n_kept_params",
    "dtype", "bits", "block_size", "exponent_bits", "outlier_fraction", "centering", "bits_per_param",
    "total_model_bits", "acc_hellaswag", "acc_lambada_openai", "acc_piqa", "acc_winogrande",
    "bpb_wikitext2", "ce_wikitext2", "ppl_wikitext2", "acc_hellaswag_se", "acc_lambada_openai_se",
    "acc_piqa_se", "acc_winogrande_se", "bpb_wikitext2_se", "ce_wikitext2_se", "ppl_wikitext2_se",
    "mean_acc", "mean_acc_se", "setting", "curve",
]  # fmt: skip


def test_results_without_method_or_eval_columns_tidy_as_before(law_study: Path) -> None:
    raw = load_results(law_study).drop(columns=[*METHOD_COLUMNS, *EVAL_COLUMNS], errors="ignore")
    tidy = tidy_jobs(raw)
    assert [c for c in tidy.columns if c not in (*METHOD_COLUMNS, *VARIANT_COLUMNS)] == COLUMNS_BEFORE
    assert set(tidy["setting"]) == {"fp e2 B64", "16-bit"}
    assert set(tidy["curve"]) == {"3-bit fp e2 B64", "4-bit fp e2 B64", "5-bit fp e2 B64", "6-bit fp e2 B64",
                                  "8-bit fp e2 B64", "16-bit"}  # fmt: skip
    text = (raw["task"] == "wikitext2").tolist()
    explicit = raw.assign(
        method=["none" if b >= 16 else "rtn" for b in raw["bits"]],
        method_params="{}",
        quantize_embeddings=False,
        quantize_lm_head=False,
        scorer=[None if t else "hflm" for t in text],
        eval_limit=None,
        context_length=[512 if t else None for t in text],
        stride=[256 if t else None for t in text],
        max_tokens=None,
    )
    pd.testing.assert_frame_equal(tidy_jobs(explicit), tidy)
    assert (tidy["method"] == np.where(tidy["bits"] >= 16, "none", "rtn")).all()
    assert (tidy["method_params"] == "{}").all()
    assert not tidy["quantize_embeddings"].any() and not tidy["quantize_lm_head"].any()
