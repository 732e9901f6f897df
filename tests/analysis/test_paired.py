"""The paired bootstrap: the same units resampled for both sides, ratio-of-sums replicates, job draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.errors import AnalysisError
from analysis.metrics import higher_is_better, metric_label
from analysis.paired import UnitScores, paired_difference, ratio_draws, resample_weights, unpaired_difference
from analysis.tidy import PAPER_TASKS, tidy_jobs
from analysis.units import job_draws, unit_rows
from pipeline.results import COLUMNS, load_results
from tests.analysis.synthetic import Config, Units, study_frame, write_study


def shared_tokens(shift: float, n_chunks: int = 100, seed: int = 0) -> tuple[UnitScores, UnitScores]:
    """Two configurations scored on the same noisy chunks: B's NLL is A's plus `shift` nats a token,
    plus a little noise of its own."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(200, 400, n_chunks).astype(float)
    per_token = 3.2 + rng.normal(0.0, 0.6, n_chunks)  # chunk difficulty: large, shared by both
    own = rng.normal(0.0, 0.002, n_chunks)  # B's noise of its own: small
    a = UnitScores(counts * per_token, counts)
    b = UnitScores(counts * (per_token + shift + own), counts)
    return a, b


def test_a_small_shift_on_shared_tokens_is_decisive_paired_and_not_unpaired() -> None:
    a, b = shared_tokens(shift=0.01)
    paired = paired_difference(b, a, n_boot=2000, seed=1)
    unpaired = unpaired_difference(b, a, n_boot=2000, seed=1)
    assert paired.estimate == pytest.approx(unpaired.estimate) == pytest.approx(0.01, abs=1e-3)
    assert paired.decisive and paired.ci_low > 0.009 and paired.ci_high < 0.011
    assert not unpaired.decisive and unpaired.ci_low < 0 < unpaired.ci_high
    assert (unpaired.ci_high - unpaired.ci_low) > 50 * (paired.ci_high - paired.ci_low)


def test_no_shift_is_not_decisive_either_way() -> None:
    a, b = shared_tokens(shift=0.0)
    assert not paired_difference(b, a, n_boot=1000).decisive
    assert not unpaired_difference(b, a, n_boot=1000).decisive


def test_replicates_are_ratios_of_sums_not_means_of_ratios() -> None:
    sums, counts = np.array([[10.0, 1.0]]), np.array([[10.0, 1.0]]) * np.array([[1.0, 0.5]])
    # per-unit ratios 1 and 2: their mean is 1.5, the ratio of sums 11 / 10.5
    weights = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    draws = ratio_draws(sums, counts, weights)
    np.testing.assert_allclose(draws[0], [11 / 10.5, 11 / 10.5, 1.0, 2.0])
    assert UnitScores(sums[0], counts[0]).value == pytest.approx(11 / 10.5)


def test_resample_weights_draw_every_unit_count_times() -> None:
    weights = resample_weights(7, 50, np.random.default_rng(0))
    assert weights.shape == (50, 7) and (weights.sum(axis=1) == 7).all()


def test_unmatched_units_cannot_be_paired() -> None:
    a = UnitScores(np.ones(3), np.ones(3))
    with pytest.raises(AnalysisError, match="paired units must match: 3 units against 4"):
        paired_difference(a, UnitScores(np.ones(4), np.ones(4)))
    with pytest.raises(AnalysisError, match="1-D of one length"):
        UnitScores(np.ones(3), np.ones(2))


def test_job_draws_share_unit_indices_across_jobs() -> None:
    configs = [Config(1_000_000, 4), Config(1_000_000, 5), Config(1_000_000, 16)]
    raw = study_frame(configs, units=Units(n_units=50, shared_sd=0.5, job_sd=0.0))
    draws = job_draws(raw, "ce_wikitext2", PAPER_TASKS, n_boot=200, seed=0)
    assert draws is not None and draws.values.shape == (3, 201)
    nats = raw[raw["metric"] == "nats_per_token"].set_index("job_key")["value"]
    first, second = (draws.index[c.key] for c in configs[:2])
    np.testing.assert_allclose(draws.values[:, 0], nats.loc[list(draws.index)].to_numpy())
    # no noise of their own: the two jobs differ by a constant per token, so every replicate agrees
    diff = draws.values[first] - draws.values[second]
    np.testing.assert_allclose(diff, diff[0], atol=1e-12)
    again = job_draws(raw, "ce_wikitext2", PAPER_TASKS, n_boot=200, seed=0)
    assert again is not None and np.array_equal(again.values, draws.values)  # seeded by column


def test_mean_accuracy_draws_average_the_tasks() -> None:
    raw = study_frame([Config(1_000_000, 4), Config(1_000_000, 8)], units=Units(job_sd=0.01))
    mean = job_draws(raw, "mean_acc", PAPER_TASKS, n_boot=50)
    parts = [job_draws(raw, f"acc_{t}", PAPER_TASKS, n_boot=50) for t in PAPER_TASKS]
    assert mean is not None and all(p is not None for p in parts)
    stacked = np.mean([p.values for p in parts if p is not None], axis=0)
    np.testing.assert_allclose(mean.values, stacked)
    ppl = job_draws(raw, "ppl_wikitext2", PAPER_TASKS, n_boot=5)
    nats = job_draws(raw, "ce_wikitext2", PAPER_TASKS, n_boot=5)
    assert ppl is not None and nats is not None
    np.testing.assert_allclose(ppl.values, np.exp(nats.values))


def test_rows_without_units_have_no_draws() -> None:
    raw = study_frame([Config(1_000_000, 4), Config(1_000_000, 16)])
    assert unit_rows(raw).empty and job_draws(raw, "ce_wikitext2", PAPER_TASKS, 10) is None
    old = raw.drop(columns=["unit_sums", "unit_counts"])  # results written before the columns existed
    assert job_draws(old, "mean_acc", PAPER_TASKS, 10) is None


def test_units_that_do_not_reproduce_the_value_are_not_used(caplog: pytest.LogCaptureFixture) -> None:
    raw = study_frame([Config(1_000_000, 4), Config(1_000_000, 16)], units=Units())
    nats = raw["metric"] == "nats_per_token"
    raw.loc[nats, "value"] = raw.loc[nats, "value"] + 0.1
    rows = unit_rows(raw)
    assert not (rows["column"] == "ce_wikitext2").any() and (rows["column"] == "acc_piqa").sum() == 2
    assert "do not reproduce their value" in caplog.text


def test_jobs_on_different_partitions_are_not_paired() -> None:
    raw = study_frame([Config(1_000_000, 4)], units=Units(n_units=20))
    other = study_frame([Config(1_000_000, 5)], units=Units(n_units=30))
    assert job_draws(pd.concat([raw, other], ignore_index=True), "ce_wikitext2", PAPER_TASKS, 10) is None


@pytest.mark.skipif("unit_sums" not in COLUMNS, reason="the results schema has no unit columns yet")
def test_units_survive_parquet(tmp_path: Path) -> None:
    configs = [Config(1_000_000, 4), Config(1_000_000, 16)]
    write_study(tmp_path, configs, units=Units(n_units=10))
    draws = job_draws(load_results(tmp_path), "ce_wikitext2", PAPER_TASKS, n_boot=10)
    assert draws is not None and set(draws.index) == {c.key for c in configs}


def test_kl_rows_are_a_lower_is_better_column_with_paired_draws(caplog: pytest.LogCaptureFixture) -> None:
    raw = study_frame([Config(1_000_000, 4), Config(1_000_000, 16)], units=Units(n_units=20))
    nats = raw[raw["metric"] == "nats_per_token"]
    kl = nats.assign(metric="kl_to_16bit", value=nats["value"] - nats["value"].min())
    kl["unit_sums"] = [list(np.asarray(c) * v) for c, v in zip(kl["unit_counts"], kl["value"], strict=True)]
    bpb = raw[raw["metric"] == "bits_per_byte"].assign(  # the pipeline puts the text's NLL units here too
        unit_sums=nats["unit_sums"].to_numpy(), unit_counts=nats["unit_counts"].to_numpy()
    )
    raw = pd.concat([raw[raw["metric"] != "bits_per_byte"], bpb, kl], ignore_index=True)
    tidy = tidy_jobs(raw)
    assert tidy.set_index("bits").loc[16, "kl_wikitext2"] == 0.0
    assert not higher_is_better("kl_wikitext2")
    assert metric_label("kl_wikitext2").startswith("KL to the 16-bit")
    draws = job_draws(raw, "kl_wikitext2", PAPER_TASKS, n_boot=20)
    assert draws is not None and draws.values.shape == (2, 21)
    assert "bpb_wikitext2" not in set(unit_rows(raw)["column"]) and "do not reproduce" not in caplog.text
