"""`kernels.knapsack.solve_knapsack` against brute force over every assignment."""

from __future__ import annotations

import itertools
import random

import pytest

from kernels.knapsack import cost_unit, solve_knapsack


def brute_force(costs: list[list[int]], scores: list[list[float]], budget: int) -> float:
    """The least summed score of any assignment within the budget (inf: none fits)."""
    best = float("inf")
    for choice in itertools.product(*(range(len(row)) for row in costs)):
        if sum(costs[i][k] for i, k in enumerate(choice)) <= budget:
            best = min(best, sum(scores[i][k] for i, k in enumerate(choice)))
    return best


def random_problem(
    rng: random.Random, n_items: int, n_options: int
) -> tuple[list[list[int]], list[list[float]]]:
    costs = [[rng.randrange(1, 40) * 64 for _ in range(n_options)] for _ in range(n_items)]
    scores = [[rng.random() for _ in range(n_options)] for _ in range(n_items)]
    return costs, scores


@pytest.mark.parametrize("seed", range(12))
def test_exact_program_equals_brute_force_and_never_exceeds_the_budget(seed: int) -> None:
    rng = random.Random(seed)
    n_items = rng.randrange(1, 9)  # up to 8 layers
    costs, scores = random_problem(rng, n_items, rng.randrange(1, 4))
    cheapest, dearest = sum(min(r) for r in costs), sum(max(r) for r in costs)
    budget = rng.randrange(cheapest, dearest + 64)
    found = solve_knapsack(costs, scores, budget)
    assert found.exact and found.unit % 64 == 0
    assert found.cost == sum(costs[i][k] for i, k in enumerate(found.choice)) <= budget
    assert found.score == pytest.approx(brute_force(costs, scores, budget), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_coarse_program_fits_and_is_within_its_stated_gap(seed: int) -> None:
    rng = random.Random(100 + seed)
    costs = [[rng.randrange(1000, 5000) for _ in range(3)] for _ in range(6)]
    scores = [[rng.random() for _ in range(3)] for _ in range(6)]
    budget = sum(min(r) for r in costs) + rng.randrange(0, 8000)
    found = solve_knapsack(costs, scores, budget, max_cells=64)
    assert not found.exact and found.gap_bits == 6 * found.unit
    assert found.cost <= budget
    assert found.score >= brute_force(costs, scores, budget) - 1e-12
    assert found.score <= brute_force(costs, scores, budget - found.gap_bits) + 1e-12


def test_unit_is_the_gcd_when_the_budget_fits() -> None:
    assert cost_unit([[13312, 17408], [3328]], 40000) == (256, True)
    unit, exact = cost_unit([[13312, 17408], [3328]], 10**9, max_cells=1000)
    assert not exact and unit % 256 == 0 and 10**9 // unit <= 1000


def test_bad_problems_are_named() -> None:
    with pytest.raises(ValueError, match="below the cheapest assignment's cost 30"):
        solve_knapsack([[10, 20], [20]], [[0.0, 1.0], [0.0]], 29)
    with pytest.raises(ValueError, match="item 0: 2 costs and 1 scores"):
        solve_knapsack([[10, 20]], [[0.0]], 100)
    with pytest.raises(ValueError, match="at least one item"):
        solve_knapsack([], [], 100)
