from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.errors import AnalysisError
from analysis.pareto import pareto_front, pareto_mask


def brute_force_front(x: np.ndarray, y: np.ndarray, higher_is_better: bool) -> np.ndarray:
    score = y if higher_is_better else -y
    n = len(x)
    return np.array([
        not any(
            x[j] <= x[i] and score[j] >= score[i] and (x[j] < x[i] or score[j] > score[i]) for j in range(n)
        )
        for i in range(n)
    ])  # fmt: skip


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("higher_is_better", [True, False])
def test_front_equals_brute_force_on_random_points(seed: int, higher_is_better: bool) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    # rounded values give ties in x, in y and exact duplicates
    x = np.round(rng.lognormal(20, 1, n), -8) if seed % 2 else rng.lognormal(20, 1, n)
    y = np.round(rng.random(n), 1) if seed % 3 == 0 else rng.random(n)
    expected = brute_force_front(x, y, higher_is_better)
    np.testing.assert_array_equal(pareto_mask(x, y, higher_is_better), expected)


def test_nan_points_are_never_on_the_front() -> None:
    mask = pareto_mask(np.array([1.0, np.nan, 3.0]), np.array([0.5, 1.0, np.nan]))
    assert mask.tolist() == [True, False, False]


def test_front_per_family_sorted_by_memory() -> None:
    table = pd.DataFrame({
        "model_family": ["a", "a", "a", "b", "b"],
        "total_model_bits": [4.0, 1.0, 2.0, 1.0, 2.0],
        "acc": [0.9, 0.5, 0.4, 0.1, 0.2],
    })  # fmt: skip
    front = pareto_front(table, "acc")
    got = front[["model_family", "total_model_bits"]].values.tolist()
    assert got == [["a", 1.0], ["a", 4.0], ["b", 1.0], ["b", 2.0]]
    assert len(pareto_front(table, "acc", by=())) == 2
    with pytest.raises(AnalysisError, match=r"columns \['ppl'\] not in the table"):
        pareto_front(table, "ppl")
