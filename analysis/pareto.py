"""The Pareto front of a metric against memory: configurations no other one beats on both."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError


def pareto_mask(x: np.ndarray, y: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """True for points not dominated: no other point has x' <= x and a y at least as good, one strictly.

    Smaller x (memory) is better; y is better when larger if `higher_is_better`. Exact duplicates of
    a front point are on the front too (neither dominates the other). NaN points are never on it.
    """
    x, score = np.asarray(x, float), np.asarray(y, float) * (1.0 if higher_is_better else -1.0)
    mask = np.zeros(len(x), dtype=bool)
    valid = np.flatnonzero(~(np.isnan(x) | np.isnan(score)))
    order = valid[np.lexsort((-score[valid], x[valid]))]  # x ascending, then best score first
    best, last = -np.inf, None
    for i in order:
        if score[i] > best:
            mask[i], best, last = True, score[i], i
        elif last is not None and x[i] == x[last] and score[i] == score[last]:
            mask[i] = True
    return mask


def pareto_front(
    table: pd.DataFrame,
    y: str,
    higher_is_better: bool = True,
    x: str = "total_model_bits",
    by: Sequence[str] = ("model_family",),
) -> pd.DataFrame:
    """The rows of `table` on the Pareto front of `y` against `x`, per group of `by`, sorted by x.

    Raises:
        AnalysisError: `x`, `y` or a `by` column is missing.
    """
    missing = [c for c in (x, y, *by) if c not in table.columns]
    if missing:
        raise AnalysisError(f"pareto_front: columns {missing} not in the table; have {list(table.columns)}")
    groups = table.groupby(list(by), sort=True) if by else [((), table)]
    fronts = [
        part[pareto_mask(part[x].to_numpy(float), part[y].to_numpy(float), higher_is_better)]
        for _, part in groups
    ]
    front = pd.concat(fronts) if fronts else table.iloc[:0]
    return front.sort_values([*by, x]).reset_index(drop=True)
