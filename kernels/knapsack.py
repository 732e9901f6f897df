"""Multiple-choice knapsack: one option per item, summed cost within a budget, summed score minimal.

`solve_knapsack(costs, scores, budget)` is the solver behind `quant.allocation=knapsack` (items: the
linear layers; options: the candidate recipes; cost: a layer's exact storage bits under a candidate;
score: its sensitivity). An exact dynamic program over the budget in units of `unit` bits:

- `unit` is first the greatest common divisor of every cost. Then a cost is a whole number of units,
  and "sum of costs <= budget" is "sum of units <= floor(budget / unit)": the program is exact.
- Where that leaves more than `max_cells` budget cells, `unit` grows (a multiple of the gcd) until the
  budget fits, and each cost is rounded *up* to whole units. The answer still never exceeds the budget
  in exact bits, and its score is at most the optimum under the budget minus `len(costs) * unit` bits
  (every assignment that cheap fits after rounding up, as each item rounds up by less than one unit):
  `Allocation.gap_bits` records that slack (0 when exact).

Pure numpy (no torch): O(items x options x cells) additions, vectorized over the cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_CELLS = 1 << 18  # budget cells of the program: 2^18 cells x 200 layers of int8 choices = 50 MiB


@dataclass(frozen=True)
class Allocation:
    """A solution: `choice[i]` is the option of item i.

    Attributes:
        choice: one option index per item.
        cost: the exact summed cost (never above the budget).
        score: the summed score.
        unit: the cost unit of the program (the gcd of the costs where exact).
        gap_bits: 0 when exact; else the score is at most the optimum under `budget - gap_bits`.
    """

    choice: tuple[int, ...]
    cost: int
    score: float
    unit: int
    gap_bits: int

    @property
    def exact(self) -> bool:
        return self.gap_bits == 0


def cost_unit(costs: Sequence[Sequence[int]], budget: int, max_cells: int = MAX_CELLS) -> tuple[int, bool]:
    """(unit, exact): the gcd of every cost where the budget then spans at most `max_cells` units, else
    the smallest multiple of it that does (exact=False)."""
    g = 0
    for row in costs:
        for c in row:
            g = math.gcd(g, int(c))
    g = max(g, 1)
    if budget // g <= max_cells:
        return g, True
    return g * math.ceil(budget / (g * max_cells)), False


def check_problem(costs: Sequence[Sequence[int]], scores: Sequence[Sequence[float]], budget: int) -> None:
    """Raise ValueError on ragged or empty inputs, negative costs or a budget below the cheapest choice."""
    if not costs or len(costs) != len(scores):
        raise ValueError(
            f"knapsack needs at least one item and a score row per cost row ({len(costs)}, {len(scores)})"
        )
    for i, (c, s) in enumerate(zip(costs, scores, strict=True)):
        if not c or len(c) != len(s):
            raise ValueError(f"item {i}: {len(c)} costs and {len(s)} scores; need as many, at least one")
        if min(c) < 0:
            raise ValueError(f"item {i}: negative cost {min(c)}")
    cheapest = sum(min(c) for c in costs)
    if cheapest > budget:
        raise ValueError(f"budget {budget} is below the cheapest assignment's cost {cheapest}")


def solve_knapsack(
    costs: Sequence[Sequence[int]],
    scores: Sequence[Sequence[float]],
    budget: int,
    max_cells: int = MAX_CELLS,
) -> Allocation:
    """The assignment of one option per item with summed cost <= `budget` and summed score minimal.

    Ties go to the cheaper assignment, then to lower option indices of earlier items.

    Raises:
        ValueError: bad shapes, or no assignment fits the budget.
    """
    check_problem(costs, scores, budget)
    unit, exact = cost_unit(costs, budget, max_cells)
    cells = budget // unit
    units = [[-(-int(c) // unit) for c in row] for row in costs]  # ceil: never under the exact cost
    best = np.full(cells + 1, np.inf)
    best[0] = 0.0  # best[b]: the least score with exactly b units spent
    choices = np.zeros((len(costs), cells + 1), dtype=np.int16)
    for item, (row, score_row) in enumerate(zip(units, scores, strict=True)):
        new = np.full(cells + 1, np.inf)
        pick = choices[item]
        for option, (u, s) in enumerate(zip(row, score_row, strict=True)):
            if u > cells:
                continue
            shifted = np.full(cells + 1, np.inf)
            shifted[u:] = best[: cells + 1 - u] + float(s)
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = option
        best = new
    spent = int(np.argmin(best))  # the first minimum: the cheapest among equal scores
    if not np.isfinite(best[spent]):
        raise ValueError(
            f"no assignment fits the budget {budget} after rounding costs up to {unit}-bit units"
        )
    choice = []
    for item in reversed(range(len(costs))):
        option = int(choices[item, spent])
        choice.append(option)
        spent -= units[item][option]
    choice.reverse()
    cost = sum(int(costs[i][k]) for i, k in enumerate(choice))
    score = float(sum(float(scores[i][k]) for i, k in enumerate(choice)))
    assert cost <= budget, (cost, budget)
    return Allocation(tuple(choice), cost, score, unit, 0 if exact else len(costs) * unit)
