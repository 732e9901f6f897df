"""Jobs scored under different evaluation settings are never averaged into one value."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from analysis.curves import curve_points
from analysis.errors import AnalysisError
from analysis.eval_variants import variant_name
from analysis.metrics import check_metric, default_loss, default_metric, metric_label, variants
from analysis.render import render_markdown
from analysis.report import build_sections, study_from_results
from analysis.tidy import tidy_jobs
from pipeline.results import load_results
from tests.analysis.synthetic import Config, Evals, grid, write_study

SIZES = (1_000_000, 4_000_000, 16_000_000)
CTX128, CTX256 = Evals(context_length=128, stride=128), Evals(context_length=256, stride=256)
HFLM, FAST = Evals(scorer="hflm"), Evals(scorer="fast", eval_limit=500)


def paired_study(study: Path, first: Evals, second: Evals) -> pd.DataFrame:
    """Every job of a small grid twice, identical but for its evaluation settings (noisy values)."""
    configs = [replace(c, evals=e) for c in grid(sizes=SIZES, bits=(3, 4)) for e in (first, second)]
    write_study(study, configs, noise=0.01, seed=5)
    return load_results(study)


def raw_value(raw: pd.DataFrame, task: str, metric: str) -> pd.Series:
    """job_key -> value of one (task, metric) in the raw results."""
    rows = raw[(raw["task"] == task) & (raw["metric"] == metric)]
    return rows.set_index("job_key")["value"]


def test_variant_names() -> None:
    assert variant_name((None, None, 128, 128, None)) == "ctx128s128"
    assert variant_name((None, None, 512, 256, 100_000)) == "ctx512s256-max100000"
    assert variant_name(("fast", 500, None, None, None)) == "fast-limit500"
    assert variant_name(("hflm", None, None, None, None)) == "hflm"
    assert variant_name((None, None, None, None, None)) == "default"


def test_perplexity_context_pair_is_never_averaged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = paired_study(tmp_path, CTX128, CTX256)
    with caplog.at_level(logging.INFO, logger="analysis"):
        tidy = tidy_jobs(raw)
    assert "wikitext2: measured under 2 evaluation variants (ctx128s128, ctx256s256)" in caplog.text
    assert len(tidy) == raw["job_key"].nunique()
    for metric in ("ppl", "ce", "bpb"):
        assert f"{metric}_wikitext2" not in tidy
    assert {"acc_piqa", "mean_acc"} <= set(tidy.columns)  # tasks scored alike keep their names
    nats = raw_value(raw, "wikitext2", "nats_per_token")
    jobs = tidy.set_index("job_key")
    for variant, ctx in (("ctx128s128", 128), ("ctx256s256", 256)):
        column = f"ce_wikitext2@{variant}"
        mine = raw[(raw["context_length"] == ctx)]["job_key"].unique()
        assert jobs.loc[mine, column].to_numpy() == pytest.approx(nats[mine].to_numpy())
        assert jobs.drop(index=mine)[column].isna().all()
        points = curve_points(tidy, column)
        assert len(points) == len(mine)  # one job per (curve, size): nothing averaged
        assert sorted(points["value"]) == pytest.approx(sorted(nats[mine]))
    assert metric_label("ppl_wikitext2@ctx128s128") == "perplexity (wikitext2@ctx128s128)"
    assert default_loss(tidy) == "ce_wikitext2@ctx128s128"  # equal job counts: first by name


def test_scorer_and_limit_pair_on_accuracy_tasks_is_never_averaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = paired_study(tmp_path, HFLM, FAST)
    tidy = tidy_jobs(raw)
    assert {"ce_wikitext2", "acc_piqa@hflm", "acc_piqa@fast-limit500"} <= set(tidy.columns)
    assert "acc_piqa" not in tidy and "mean_acc" not in tidy
    piqa, jobs = raw_value(raw, "piqa", "acc"), tidy.set_index("job_key")
    for variant, scorer in (("hflm", "hflm"), ("fast-limit500", "fast")):
        mine = raw.loc[raw["scorer"] == scorer, "job_key"].unique()
        assert jobs.loc[mine, f"acc_piqa@{variant}"].to_numpy() == pytest.approx(piqa[mine].to_numpy())
        assert jobs.loc[mine, f"mean_acc@{variant}"].notna().all()
        assert jobs.drop(index=mine)[f"mean_acc@{variant}"].isna().all()
        assert len(curve_points(tidy, f"mean_acc@{variant}")) == len(mine)
    assert variants(tidy, "mean_acc") == ["mean_acc@fast-limit500", "mean_acc@hflm"]
    with caplog.at_level(logging.INFO, logger="analysis"):
        assert default_metric(tidy) == "mean_acc@fast-limit500"
    assert "headline metric: mean_acc@fast-limit500, the evaluation variant with most jobs" in caplog.text
    with pytest.raises(AnalysisError, match="several evaluation variants; choose one of"):
        check_metric(tidy, "mean_acc")


def test_report_says_which_variant_it_uses(tmp_path: Path) -> None:
    study = study_from_results(paired_study(tmp_path, HFLM, FAST), "variants", n_boot=0, n_budgets=4)
    assert study.metric == "mean_acc@fast-limit500"
    text = render_markdown("variants", build_sections(study))
    assert "Evaluation variants: acc_hellaswag, acc_lambada_openai" in text
    assert "This report uses headline mean_acc@fast-limit500, loss ce_wikitext2" in text
    assert "Headline metric: mean zero-shot accuracy (fast-limit500)." in text


def test_one_job_under_two_perplexity_variants_keeps_both(tmp_path: Path) -> None:
    cfg = Config(1_000_000, 4, evals=CTX128)
    write_study(tmp_path, [cfg])
    raw = load_results(tmp_path)
    second = raw[raw["task"] == "wikitext2"].assign(context_length=256, stride=256)
    second["value"] = second["value"] * 2
    tidy = tidy_jobs(pd.concat([raw, second], ignore_index=True))
    assert len(tidy) == 1
    row = tidy.iloc[0]
    assert row["ce_wikitext2@ctx256s256"] == pytest.approx(2 * row["ce_wikitext2@ctx128s128"])
