"""Report at scale (issue 17): the bootstrap refit solves each distinct replicate once, bit for bit
what solving every replicate gives."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import effective, fits
from analysis.curves import curve_points, with_baseline


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
