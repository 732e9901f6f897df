"""`kernels.bcq`'s fast refinement (float64 copy once a fit, int32 codes, the carried error, the rank by
comparisons, blocks leaving the batch at a fixed point) against the unoptimized loop, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kernels.bcq import (
    BCQSettings,
    ScaleFormat,
    block_values,
    fit_blocks,
    greedy_fit,
    nearest,
    refine_blocks,
    solve_normal_equations,
    sorted_levels,
)


def reference_least_squares(x: Tensor, codes: Tensor, q: int) -> Tensor:
    """The unoptimized α: float64 counts and sums per pattern, made afresh every round."""
    x64 = x.to(torch.float64)
    counts = torch.zeros(x.shape[0], 2**q, dtype=torch.float64).scatter_add_(1, codes, torch.ones_like(x64))
    sums = torch.zeros_like(counts).scatter_add_(1, codes, x64)
    p = torch.tensor([[1.0 if (c >> i) & 1 else -1.0 for i in range(q)] for c in range(2**q)]).double()
    gram = (counts @ (p[:, :, None] * p[:, None, :]).reshape(2**q, q * q)).view(-1, q, q)
    return solve_normal_equations(gram, sums @ p)


def reference_errors(x: Tensor, alpha: Tensor, codes: Tensor) -> Tensor:
    return ((x - torch.gather(block_values(alpha), 1, codes)) ** 2).sum(dim=1, dtype=torch.float64)


def reference_fit(x: Tensor, q: int, settings: BCQSettings) -> tuple[Tensor, Tensor]:
    """The loop as first written: every round on every block, both errors recomputed, int64 codes,
    the nearest sum by searchsorted over the sorted midpoints."""
    alpha, codes = greedy_fit(x, q, settings.scales)
    codes = codes.long()
    for _ in range(settings.iters if q > 1 else 0):
        candidate = settings.scales.round(reference_least_squares(x, codes, q))
        better = reference_errors(x, candidate, codes) <= reference_errors(x, alpha, codes)
        alpha = torch.where(better[:, None], candidate, alpha)
        alpha = torch.sort(alpha.abs(), dim=1, descending=True).values
        _, order, mids = sorted_levels(alpha)
        codes = torch.gather(order, 1, torch.searchsorted(mids, x.contiguous()))
    return alpha, codes


def blocks(n: int, size: int, seed: int, bf16: bool = False) -> Tensor:
    x = torch.randn(n, size, generator=torch.Generator().manual_seed(seed)) * 0.02
    x = x * torch.linspace(0.3, 3.0, n)[:, None]  # blocks of unequal spread
    return x.to(torch.bfloat16).float() if bf16 else x  # bf16 values: exact float64 sums, dyadic α


@pytest.mark.parametrize(
    ("q", "size", "scales", "iters", "bf16"),
    [
        (2, 128, ScaleFormat(), 15, False),
        (3, 128, ScaleFormat(), 15, True),
        (4, 128, ScaleFormat(), 15, False),
        (3, 64, ScaleFormat("pow2", 2), 15, False),
        (4, 32, ScaleFormat("pow2", 3), 9, True),
        (2, 1024, ScaleFormat(), 15, True),
        (3, 7, ScaleFormat(), 4, False),
    ],
)
def test_fit_equals_the_unoptimized_loop(
    q: int, size: int, scales: ScaleFormat, iters: int, bf16: bool
) -> None:
    x = blocks(4096 // size * 16, size, seed=q + size, bf16=bf16)
    settings = BCQSettings(iters=iters, scales=scales)
    alpha, codes = fit_blocks(x, q, settings)
    want_alpha, want_codes = reference_fit(x, q, settings)
    assert codes.dtype == torch.int64
    assert torch.equal(alpha, want_alpha) and torch.equal(codes, want_codes)


def test_blocks_stop_at_a_fixed_point_and_every_round_count_gives_the_reference() -> None:
    x = blocks(512, 64, seed=11)
    rounds_run = []
    for iters in (0, 1, 2, 5, 15, 40):
        settings = BCQSettings(iters=iters)
        alpha, codes, rounds = refine_blocks(x, *greedy_fit(x, 3, settings.scales), settings)
        want_alpha, want_codes = reference_fit(x, 3, settings)
        assert torch.equal(alpha, want_alpha) and torch.equal(codes, want_codes), iters
        assert int(rounds.max()) <= iters and (iters == 0 or int(rounds.min()) >= 1)
        rounds_run.append(rounds)
    many = rounds_run[-1]
    assert int(many.min()) < int(many.max()) < 40  # blocks stop at different rounds, all before 40
    assert torch.equal(torch.minimum(many, torch.tensor(15)), rounds_run[-2])  # a cap only cuts


def test_one_bit_and_zero_rounds_run_nothing() -> None:
    x = blocks(8, 16, seed=2)
    for q, iters in ((1, 15), (3, 0)):
        alpha, codes = greedy_fit(x, q, ScaleFormat())
        got = refine_blocks(x, alpha, codes, BCQSettings(iters=iters))
        assert torch.equal(got[0], alpha) and torch.equal(got[1], codes.long()) and int(got[2].sum()) == 0


@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_rank_by_comparisons_is_searchsorted(q: int) -> None:
    x = blocks(300, 40, seed=q)
    alpha = torch.rand(300, q, generator=torch.Generator().manual_seed(q)) * 0.03
    alpha[:20, -1] = 0.0  # repeated sums (equal midpoints)
    values, order, mids = sorted_levels(alpha)
    x[:50, :5] = mids[:50, :5] if q > 2 else mids[:50, :1]  # values exactly on a midpoint
    codes, decoded = nearest(x, alpha)
    rank = torch.searchsorted(mids, x)
    assert torch.equal(codes.long(), torch.gather(order, 1, rank))
    assert torch.equal(decoded, torch.gather(values, 1, rank))
