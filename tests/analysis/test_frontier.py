"""The uniform frontier at equal total bits (`analysis.frontier`): interpolation, gains, paired CIs."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from analysis.errors import AnalysisError
from analysis.frontier import INSIDE, OUTSIDE, envelope, frontier_at, frontier_gains, frontier_summary
from analysis.units import JobDraws

METRIC = "ce_wikitext2"  # a loss: lower is better


def jobs(rows: list[tuple[str, str, float, float, bool]]) -> pd.DataFrame:
    """(job_key, model, total_model_bits, loss, is_variant) rows as a tidy-like table."""
    table = pd.DataFrame(rows, columns=["job_key", "model", "total_model_bits", METRIC, "variant"])
    return table.assign(model_family="toy", n_params=1_000, setting=np.where(table["variant"], "v", "base"))


def baseline_of(table: pd.DataFrame) -> Callable[[pd.Series], pd.Series]:
    """Every non-variant job of `table` makes the frontier."""
    return lambda row: ~table["variant"]


BASE = [("a", "m", 100.0, 3.0, False), ("b", "m", 200.0, 2.5, False), ("c", "m", 400.0, 2.2, False),
        ("d", "m", 300.0, 2.6, False)]  # fmt: skip  # d is dominated by b: not on the envelope


def test_envelope_drops_dominated_jobs_and_sorts_by_bits() -> None:
    front = envelope(jobs(BASE), METRIC, higher=False)
    assert front.job_keys == ("a", "b", "c")
    np.testing.assert_allclose(front.log2_bits, np.log2([100, 200, 400]))


def test_the_frontier_is_flat_after_its_last_front_job_up_to_the_costliest_baseline_job() -> None:
    table = jobs([*BASE, ("e", "m", 800.0, 2.3, False), ("v", "m", 565.0, 2.1, True)])
    front = envelope(table[~table["variant"]], METRIC, higher=False)
    assert front.job_keys == ("a", "b", "c", "c")
    np.testing.assert_allclose(front.values, [3.0, 2.5, 2.2, 2.2])
    gains = frontier_gains(table, METRIC, table["variant"], baseline_of(table))
    assert gains.table.loc[0, "gain"] == pytest.approx(0.1)  # c (2.2) is the best at or below 565 bits
    assert gains.table.loc[0, "frontier_max_bits"] == pytest.approx(800.0)


def test_interpolation_is_linear_in_log2_bits_and_never_extrapolates() -> None:
    front = envelope(jobs(BASE), METRIC, higher=False)
    values, weights = frontier_at(front, [150.0, 300.0, 50.0, 500.0, 200.0])
    f150 = math.log2(150 / 100) / math.log2(200 / 100)  # hand computation: share of the way from a to b
    f300 = math.log2(300 / 200) / math.log2(400 / 200)
    assert values[0] == pytest.approx(3.0 + f150 * (2.5 - 3.0))
    assert values[1] == pytest.approx(2.5 + f300 * (2.2 - 2.5))  # the dominated d plays no part
    assert np.isnan(values[2]) and np.isnan(values[3])
    assert values[4] == pytest.approx(2.5)
    np.testing.assert_allclose(weights[0], [1 - f150, f150, 0.0])


def test_gain_is_frontier_minus_variant_and_outside_has_none() -> None:
    table = jobs([*BASE, ("v1", "m", 150.0, 2.6, True), ("v2", "m", 800.0, 2.0, True)])
    gains = frontier_gains(table, METRIC, table["variant"], lambda row: ~table["variant"])
    f150 = math.log2(1.5)
    on = gains.table.set_index("job_key")
    assert on.loc["v1", "gain"] == pytest.approx(3.0 - 0.5 * f150 - 2.6)  # positive: the variant is better
    assert on.loc["v1", "position"] == INSIDE
    assert on.loc["v2", "position"] == OUTSIDE and np.isnan(on.loc["v2", "gain"])
    assert gains.replicates is None and on["decisive"].isna().all()  # no per-unit data: no CI made up


def test_a_variant_on_the_frontier_has_gain_zero_even_per_replicate() -> None:
    table = jobs([*BASE, ("v", "m", 200.0, 2.5, True)])
    draws = _draws({"a": 3.0, "b": 2.5, "c": 2.2, "d": 2.6, "v": 2.5}, shared_sd=0.2)
    draws.values[draws.index["v"]] = draws.values[draws.index["b"]]  # the very same unit scores as b
    gains = frontier_gains(table, METRIC, table["variant"], lambda row: ~table["variant"], draws)
    assert gains.table.loc[0, "gain"] == pytest.approx(0.0)
    assert gains.replicates is not None
    np.testing.assert_allclose(gains.replicates, 0.0, atol=1e-12)
    assert not bool(gains.table.loc[0, "decisive"])


def _draws(values: dict[str, float], shared_sd: float, job_sd: float = 0.0, n_boot: int = 400) -> JobDraws:
    """Replicates whose text noise (shared_sd) is common to every job, as paired draws are."""
    rng = np.random.default_rng(0)
    shared = rng.normal(0.0, shared_sd, n_boot)
    rows = [np.concatenate([[v], v + shared + rng.normal(0.0, job_sd, n_boot)]) for v in values.values()]
    return JobDraws({k: i for i, k in enumerate(values)}, np.vstack(rows))


def test_frontier_replicates_are_the_bracketing_jobs_interpolated_with_the_same_weights() -> None:
    table = jobs([*BASE, ("v", "m", 150.0, 2.7, True)])
    draws = _draws({"a": 3.0, "b": 2.5, "c": 2.2, "d": 2.6, "v": 2.7}, shared_sd=0.3, job_sd=0.01)
    gains = frontier_gains(table, METRIC, table["variant"], lambda row: ~table["variant"], draws)
    f = math.log2(1.5)
    by_hand = (1 - f) * draws.values[0] + f * draws.values[1] - draws.values[4]  # frontier − variant
    assert gains.replicates is not None
    np.testing.assert_allclose(gains.replicates[0], by_hand)
    # the shared text noise (sd 0.3) cancels: only the jobs' own noise (sd 0.01) widens the paired CI
    row = gains.table.loc[0]
    assert row["gain"] == pytest.approx(3.0 - 0.5 * f - 2.7)
    assert row["gain_ci_high"] - row["gain_ci_low"] < 0.1  # far narrower than the text noise (sd 0.3)


def test_paired_ci_is_decisive_only_when_the_shift_is_clear() -> None:
    base = [("a", "m", 100.0, 3.0, False), ("c", "m", 400.0, 2.0, False)]
    clear = jobs([*base, ("v", "m", 200.0, 2.3, True)])  # frontier 2.5: gain 0.2
    tied = jobs([*base, ("v", "m", 200.0, 2.499, True)])
    for table, expected in ((clear, True), (tied, False)):
        value = float(table.loc[2, METRIC])
        draws = _draws({"a": 3.0, "c": 2.0, "v": value}, shared_sd=0.5, job_sd=0.02)
        gains = frontier_gains(table, METRIC, table["variant"], baseline_of(table), draws)
        assert bool(gains.table.loc[0, "decisive"]) is expected


def test_summary_counts_each_model_once() -> None:
    rows = [*BASE, ("v1", "m", 150.0, 2.6, True), ("v2", "m", 150.0, 2.4, True)]
    rows += [(k + "2", "n", b, y + 1.0, v) for k, _, b, y, v in rows]  # a second model, everything +1
    rows += [("v3", "n", 150.0, 3.7, True)]
    table = jobs(rows)
    gains = frontier_gains(table, METRIC, table["variant"], lambda row: ~table["variant"])
    summary = frontier_summary(gains, ["setting"])
    frontier = 3.0 - 0.5 * math.log2(1.5)
    per_model = [frontier - 2.5, (frontier + 1) - (3.6 + 3.4 + 3.7) / 3]  # m: mean of v1, v2; n: of 3
    assert summary.loc[0, "gain"] == pytest.approx(np.mean(per_model))
    assert summary.loc[0, "models"] == 2 and summary.loc[0, "decisive"] == "no CI"


def test_summary_ci_of_each_group_averages_that_groups_models_replicates() -> None:
    rows = [*BASE, ("v1", "m", 150.0, 2.6, True), ("v2", "m", 300.0, 2.3, True)]
    rows += [(k + "2", "n", b, y + 1.0, v) for k, _, b, y, v in rows]
    table = jobs(rows).assign(setting=lambda t: t["job_key"].str[:2])  # groups: v1 (both models), v2
    keys = table["job_key"].tolist()
    draws = _draws(dict(zip(keys, table[METRIC], strict=True)), shared_sd=0.3, job_sd=0.05)
    gains = frontier_gains(table, METRIC, table["variant"], baseline_of(table), draws)
    assert gains.replicates is not None
    summary = frontier_summary(gains, ["setting"]).set_index("setting")
    for group in ("v1", "v2"):
        rows_of = gains.table.index[gains.table["job_key"].str.startswith(group)].to_numpy()
        mean = gains.replicates[rows_of].mean(axis=0)  # one variant per model: the models' mean
        low, high = np.nanpercentile(mean[1:], [2.5, 97.5])
        assert summary.loc[group, "gain_ci_low"] == pytest.approx(low)
        assert summary.loc[group, "gain_ci_high"] == pytest.approx(high)


def test_every_variant_outside_is_an_error() -> None:
    table = jobs([*BASE, ("v", "m", 1000.0, 2.0, True)])
    gains = frontier_gains(table, METRIC, table["variant"], lambda row: ~table["variant"])
    with pytest.raises(AnalysisError, match="outside"):
        frontier_summary(gains, ["setting"])
