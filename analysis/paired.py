"""Paired bootstrap over shared evaluation units: is configuration A better than B, and how sure?

All configurations of one model (and all models of a family that share a tokenizer) are scored on the
same chunks of text and the same documents, so most of their noise is shared: which text happened to
be scored moves every configuration together. A comparison therefore resamples the *same* unit indices
for both sides. Every metric here is a ratio of sums (summed NLL over scored tokens, correct answers
over documents), so a replicate recomputes sum(sums[i*]) / sum(counts[i*]) over the drawn indices i*
(the ratio-of-sums estimator), never a mean of per-unit ratios.

`paired_difference` and `unpaired_difference` compare two configurations; `ratio_draws` gives the
replicates of many configurations at once under one set of drawn indices, which is what makes any
difference of them (or of interpolations of them) paired.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.errors import AnalysisError

CI_LEVEL = 0.95
N_BOOT = 1000


@dataclass(frozen=True)
class UnitScores:
    """One configuration's scores per evaluation unit (text chunk or document).

    sums[i]: the summed score of unit i (NLL in nats, or correct answers); counts[i]: its tokens or
    documents. The metric is sum(sums) / sum(counts).
    """

    sums: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        if self.sums.ndim != 1 or self.sums.shape != self.counts.shape or len(self.sums) == 0:
            raise AnalysisError(
                f"unit sums and counts must be 1-D of one length >= 1; got {self.sums.shape} and "
                f"{self.counts.shape}"
            )
        if not float(np.sum(self.counts)) > 0:
            raise AnalysisError(f"unit counts must sum to > 0; got {float(np.sum(self.counts))}")

    @property
    def value(self) -> float:
        return float(np.sum(self.sums) / np.sum(self.counts))


@dataclass(frozen=True)
class Difference:
    """A difference (A − B) with its bootstrap CI; `decisive`: the CI excludes 0."""

    estimate: float
    ci_low: float
    ci_high: float

    @property
    def decisive(self) -> bool:
        return bool(self.ci_low > 0 or self.ci_high < 0)  # False when the CI is NaN


def resample_weights(n_units: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_units): how often each unit is drawn in each replicate (n_units draws with replacement)."""
    if n_units < 1 or n_boot < 0:
        raise AnalysisError(f"need n_units >= 1 and n_boot >= 0; got {n_units} and {n_boot}")
    return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot).astype(float)


def ratio_draws(sums: np.ndarray, counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n_rows, 1 + n_boot): column 0 each row's ratio of sums, then one replicate per row of `weights`.

    sums, counts: (n_rows, n_units), one configuration a row, unit i the same unit in every row;
    weights: (n_boot, n_units) from `resample_weights`, shared by all rows (so the replicates are paired).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        full = sums.sum(axis=1) / counts.sum(axis=1)
        boot = (sums @ weights.T) / (counts @ weights.T)
    return np.column_stack([full, boot])


def interval(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI (`CI_LEVEL`) over the replicates draws[..., 1:] (NaN replicates ignored); NaN where
    there are none."""
    boot = draws[..., 1:]
    if boot.shape[-1] == 0:
        return np.full(draws.shape[:-1], np.nan), np.full(draws.shape[:-1], np.nan)
    tail = (1 - CI_LEVEL) / 2 * 100
    rows = boot.reshape(-1, boot.shape[-1])
    whole = ~np.isnan(rows).any(axis=1)  # rows without NaN take numpy's vectorised percentile: the same
    low, high = np.full(len(rows), np.nan), np.full(len(rows), np.nan)  # numbers, no Python loop per row
    if whole.any():
        low[whole], high[whole] = np.percentile(rows[whole], [tail, 100 - tail], axis=-1)
    some = ~whole & ~np.isnan(rows).all(axis=1)  # all-NaN rows: no CI there
    if some.any():
        low[some], high[some] = np.nanpercentile(rows[some], [tail, 100 - tail], axis=-1)
    return low.reshape(boot.shape[:-1]), high.reshape(boot.shape[:-1])


def summarize(draws: np.ndarray) -> Difference:
    """A difference from its draws (1 + n_boot,): draws[0] the estimate, the rest its replicates."""
    low, high = interval(draws)
    return Difference(float(draws[0]), float(low), float(high))


def paired_difference(a: UnitScores, b: UnitScores, n_boot: int = N_BOOT, seed: int = 0) -> Difference:
    """metric(A) − metric(B), resampling the same units for both sides.

    Raises:
        AnalysisError: A and B have different numbers of units (they were not scored on one partition).
    """
    if len(a.sums) != len(b.sums):
        raise AnalysisError(f"paired units must match: {len(a.sums)} units against {len(b.sums)}")
    weights = resample_weights(len(a.sums), n_boot, np.random.default_rng(seed))
    draws = ratio_draws(np.vstack([a.sums, b.sums]), np.vstack([a.counts, b.counts]), weights)
    return summarize(draws[0] - draws[1])


def unpaired_difference(a: UnitScores, b: UnitScores, n_boot: int = N_BOOT, seed: int = 0) -> Difference:
    """metric(A) − metric(B), resampling each side's units independently (as if scored on other text)."""
    rng = np.random.default_rng(seed)
    draw_a = ratio_draws(a.sums[None], a.counts[None], resample_weights(len(a.sums), n_boot, rng))[0]
    draw_b = ratio_draws(b.sums[None], b.counts[None], resample_weights(len(b.sums), n_boot, rng))[0]
    return summarize(draw_a - draw_b)
