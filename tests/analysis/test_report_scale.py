"""Report at scale (issue 17): the bootstrap refit solves each distinct replicate once, bit for bit
what solving every replicate gives; the solver keeps only its running rows and evaluates Jacobians only
at taken steps, and solves many groups' rows in shared batches, each bit for bit the solver before; the
curve points are computed once per study and shared by its sections."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest

from analysis import effective, fits, paired, tidy
from analysis.curves import curve_points, group_tuples, with_baseline
from analysis.report import study_from_results
from analysis.sections import Study
from analysis.sections_fits import effective_fit, fit_replicates
from tests.analysis.synthetic import grid, study_frame

SIZES = (1_000_000, 4_000_000, 16_000_000)


def _group(law_tidy: pd.DataFrame) -> pd.DataFrame:
    points = curve_points(law_tidy, "ce_wikitext2")
    family, setting = fits._groups(points)[0]
    return with_baseline(points, family, setting).reset_index(drop=True)


def _refit_every_row(
    inputs: effective.LawInputs, targets: np.ndarray, best: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """The unoptimized reference: every replicate row solved, from every start, duplicates too."""
    tries = [best] + [np.array([*best[:2], np.log(g), best[3]]) for g in effective.GAMMA_STARTS]
    rows = len(targets)
    stacked = np.vstack([np.broadcast_to(start, (rows, 4)) for start in tries])
    solved, cost = effective.solve_batch(
        inputs, np.tile(targets, (len(tries), 1)), stacked, np.tile(weights, (len(tries), 1))
    )
    pick = np.argmin(cost.reshape(len(tries), rows), axis=0)
    return solved.reshape(len(tries), rows, 4)[pick, np.arange(rows)]


def test_refit_of_repeated_bootstrap_draws_is_bit_identical(law_tidy: pd.DataFrame) -> None:
    group = _group(law_tidy)
    inputs = effective.LawInputs.from_points(group)
    y = group["value"].to_numpy(float)
    best = effective.best_fit(inputs, y)
    weights = fits.cluster_weights(group, 200, np.random.default_rng(0))
    targets = np.broadcast_to(y, weights.shape).copy()
    distinct = len(np.unique(weights, axis=0))
    assert distinct < len(weights)  # few sizes: the draws repeat, which is what the dedup exploits
    fast = effective.refit(inputs, targets, best, weights)
    np.testing.assert_array_equal(fast, _refit_every_row(inputs, targets, best, weights))


def test_refit_keeps_rows_that_differ_only_in_targets_apart(law_tidy: pd.DataFrame) -> None:
    group = _group(law_tidy)
    inputs = effective.LawInputs.from_points(group)
    y = group["value"].to_numpy(float)
    best = effective.best_fit(inputs, y)
    weights = np.ones((4, len(y)))
    targets = np.vstack([y, y * 1.01, y, y * 1.01])
    fast = effective.refit(inputs, targets, best, weights)
    np.testing.assert_array_equal(fast[0], fast[2])
    np.testing.assert_array_equal(fast[1], fast[3])
    assert not np.array_equal(fast[0], fast[1])
    np.testing.assert_array_equal(fast, _refit_every_row(inputs, targets, best, weights))


def _reference_solve_batch(
    inputs: effective.LawInputs, targets: np.ndarray, starts: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The solver before the fourth pass (docs/benchmarks.md), kept as the reference: every running row
    gathered from the full batch, residuals and Jacobians evaluated at every trial step (its damping
    the gain-ratio update the solver has had since the thirteenth session)."""
    root_w = np.sqrt(weights)
    lower, upper = effective._bounds(targets, weights)
    x = np.clip(starts, lower + 1e-9, upper - 1e-9)
    residual, jac = effective._batch_eval(x, inputs, targets, root_w)
    cost = 0.5 * np.sum(residual**2, axis=1)
    damping, growth = np.full(len(x), 1e-3), np.full(len(x), 2.0)
    live = np.flatnonzero(np.isfinite(cost))
    for _ in range(400):
        if not len(live):
            break
        r, j, xl, hi, lam = residual[live], jac[live], x[live], upper[live], damping[live]
        jt = j.transpose(0, 2, 1)
        grad = (jt @ r[:, :, None])[:, :, 0]
        normal = jt @ j
        diag = np.diagonal(normal, axis1=1, axis2=2)
        scale = np.maximum(diag, 1e-12 * diag.max(axis=1, keepdims=True) + 1e-300)
        free = ~(((xl <= lower) & (grad > 0)) | ((xl >= hi) & (grad < 0)))
        mask = free[:, :, None] & free[:, None, :]
        system = np.where(mask, normal + lam[:, None, None] * scale[:, :, None] * np.eye(4), np.eye(4))
        step = -np.linalg.solve(system, np.where(free, grad, 0.0)[:, :, None])[:, :, 0]
        trial = np.clip(xl + step, lower, hi)
        trial_residual, trial_jac = effective._batch_eval(trial, inputs, targets[live], root_w[live])
        trial_cost = 0.5 * np.sum(trial_residual**2, axis=1)
        better = np.isfinite(trial_cost) & (trial_cost < cost[live])
        converged = better & (cost[live] - trial_cost <= effective.FTOL * cost[live])
        with np.errstate(over="ignore", invalid="ignore"):
            decrease = effective._predicted_decrease(grad, normal, trial - xl)
            gain = (cost[live] - trial_cost) / np.maximum(decrease, 1e-300)
        damping[live], growth[live] = effective._damping(lam, growth[live], better, gain)
        take = live[better]
        x[take], residual[take], jac[take] = trial[better], trial_residual[better], trial_jac[better]
        cost[take] = trial_cost[better]
        live = live[~converged & (damping[live] <= 1e10)]
    return x, cost


def _problems(law_tidy: pd.DataFrame) -> list[effective.Problem]:
    """Bootstrap refits of every group of the law study (groups of 2 point counts), from 4 starts."""
    points = curve_points(law_tidy, "ce_wikitext2")
    rng = np.random.default_rng(5)
    problems: list[effective.Problem] = []
    for family, setting in fits._groups(points):
        group = with_baseline(points, family, setting).reset_index(drop=True)
        inputs = effective.LawInputs.from_points(group)
        weights = fits.cluster_weights(group, 40, rng)
        targets = fits.seed_targets(group, len(weights), rng) * (
            1 + 0.01 * rng.standard_normal(weights.shape)
        )
        best = effective.best_fit(inputs, group["value"].to_numpy(float))
        starts = np.vstack([best + d for d in ([0, 0, 0, 0], [0, 0, -2, 0], [0, 0.3, 1.5, 0])])
        starts = np.repeat(starts, len(weights), axis=0)
        problems.append((inputs, np.tile(targets, (3, 1)), starts, np.tile(weights, (3, 1))))
    return problems


def test_the_solver_is_bit_identical_to_the_reference(law_tidy: pd.DataFrame) -> None:
    """Running rows kept compact and Jacobians evaluated only at taken steps: the same numbers."""
    stopped = []
    for inputs, targets, starts, weights in _problems(law_tidy)[:3]:
        assert weights is not None
        x, cost = effective.solve_batch(inputs, targets, starts, weights)
        ref_x, ref_cost = _reference_solve_batch(inputs, targets, starts, weights)
        np.testing.assert_array_equal(x, ref_x)
        np.testing.assert_array_equal(cost, ref_cost)
        stopped.append(len(np.unique(np.round(cost, 12))))
    assert min(stopped) > 3  # rows stop at different costs (and iterations): the compaction is exercised


def test_problems_solved_together_are_bit_identical_to_one_at_a_time(law_tidy: pd.DataFrame) -> None:
    """`solve_many` (rows of several groups, with their own inputs, in shared batches of a few rows)
    gives what `solve_batch` gives for each group alone."""
    problems = _problems(law_tidy)
    inputs, targets, starts, weights = problems[0]
    assert weights is not None
    fewer = effective.LawInputs(inputs.n_unquantized[:-3], inputs.n_quantized[:-3], inputs.k[:-3], 1.0)
    problems.insert(1, (fewer, targets[:, :-3], starts, weights[:, :-3]))  # a group of fewer points
    alone = [effective.solve_batch(*problem) for problem in problems]
    steps = []
    iterate = effective._iterate

    def counted(run: effective._Run, *args: object) -> effective._Run:
        steps.append(len(run.rows))
        return iterate(run, *args)  # type: ignore[arg-type]

    for tail_rows in (0, 10, 1000):  # no shared tail, batches joined with 10 rows left, joined at once
        steps.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(effective, "_iterate", counted)
            together = effective.solve_many(problems, batch_rows=50, tail_rows=tail_rows)
        for (x, cost), (alone_x, alone_cost) in zip(together, alone, strict=True):
            np.testing.assert_array_equal(x, alone_x)
            np.testing.assert_array_equal(cost, alone_cost)
        if tail_rows == 10:  # some steps ran a batch alone, some the joined tails (more than one batch's)
            assert min(steps) <= 10 and max(steps) > 10 and steps[-1] > 0


def _families_study(n_boot: int = 20) -> Study:
    configs = [c for family in ("a", "b", "c") for c in grid(sizes=SIZES, bits=(3, 4), family=family)]
    return study_from_results(study_frame(configs, noise=0.002, seed=2), "three", n_boot=n_boot)


def test_curve_points_are_computed_once_and_shared() -> None:
    """The study carries the headline metric's and the loss's curve points (what every section reads),
    equal to computing them; a study holding another tidy table (a subset) computes its own."""
    study = _families_study()
    assert study.tidy is not None and study.metric is not None and study.loss is not None
    assert set(study.points.by_metric) == {study.metric, study.loss}
    for metric in (study.metric, study.loss):
        assert study.curve_points(metric) is study.points.by_metric[metric]
        pd.testing.assert_frame_equal(study.curve_points(metric), curve_points(study.tidy, metric))
    subset = dataclasses.replace(study, tidy=study.tidy[study.tidy["model_family"] != "b"])
    assert subset.tidy is not None
    pd.testing.assert_frame_equal(subset.curve_points(study.metric), curve_points(subset.tidy, study.metric))
    assert set(subset.curve_points(study.metric)["model_family"]) == {"a", "c"}


def test_effective_fit_of_some_families_reads_the_shared_points() -> None:
    """A run of families fit from the shared points is the fit of those families' own points."""
    study = _families_study()
    assert study.tidy is not None and study.loss is not None
    shared = effective_fit(study, ["a", "c"])
    own_points = curve_points(study.tidy[study.tidy["model_family"].isin(["a", "c"])], study.loss)
    own = fits.fit_families(own_points, "effective_params", ["a", "c"], fit_replicates(study), study.seed)
    assert shared is not None and not shared.params.empty
    pd.testing.assert_frame_equal(shared.params, own.params)
    pd.testing.assert_frame_equal(shared.predictions, own.predictions)


def test_group_tuples_is_groupby_agg_tuple() -> None:
    frame = pd.DataFrame({"g": ["b", "a", "b", "c", "a", "b"], "v": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    grouped = frame.groupby("g", sort=True)
    expected = grouped["v"].agg(tuple).tolist()
    assert group_tuples(grouped.ngroup().to_numpy(), frame["v"].tolist(), 3) == expected
    assert expected == [(2.0, 5.0), (1.0, 3.0, 6.0), (4.0,)]


def test_interval_is_nanpercentile_row_by_row() -> None:
    """The percentile CI takes numpy's vectorised percentile where a row has no NaN: the same numbers as
    `np.nanpercentile` (what it used on every row), NaN replicates ignored, NaN where all are."""
    rng = np.random.default_rng(0)
    draws = rng.standard_normal((6, 9, 201)) * 10 ** rng.uniform(-5, 5, (6, 9, 201))
    draws[0, 0] = np.nan
    draws[1, 2, 5:40] = np.nan
    draws[2, 3, 7] = np.inf
    low, high = paired.interval(draws)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tail = (1 - paired.CI_LEVEL) / 2 * 100
        expected = np.nanpercentile(draws[..., 1:], [tail, 100 - tail], axis=-1)
    np.testing.assert_array_equal(low, expected[0])
    np.testing.assert_array_equal(high, expected[1])
    assert np.isnan(low[0, 0]) and np.isfinite(low[1, 2]) and low.shape == (6, 9)


def test_setting_labels_are_worded_once_per_setting() -> None:
    """Labels worded once per distinct setting and spread to its rows: the per-row labels."""
    configs = grid(
        sizes=SIZES,
        bits=(3, 4, 16),
        dtypes=("fp", "int"),
        block_sizes=(64, None),
        outlier_fractions=(0.0, 0.02),
    )
    jobs = study_frame(configs, noise=0.002, seed=3).sample(frac=1.0, random_state=0)
    labels = tidy.setting_labels(jobs)
    expected = tidy.with_method(jobs).apply(tidy._setting_label, axis=1).astype(str)
    pd.testing.assert_series_equal(labels, expected)
    assert labels.nunique() >= 8 and (labels == tidy.BASELINE_SETTING).any()
