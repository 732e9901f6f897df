"""`kernels.gptq` against an unoptimized reference written here, and the properties GPTQ exists for."""

from __future__ import annotations

import pytest
import torch

from kernels import QuantSpec
from kernels.blockwise import levels_for, reference_fake_quantize
from kernels.gptq import GPTQSettings, block_starts, gptq_quantize, inverse_factor

ROWS, COLS = 12, 48
LAYOUTS = [  # (dtype, bits, block_size, centering): in-row groups, wrapping blocks, whole rows, per tensor
    ("int", 4, 16, False),
    ("nf", 3, 20, False),
    ("fp", 4, 96, False),
    ("dynamic", 4, None, False),
    ("int", 3, 12, True),
    ("quantile", 3, 24, False),
]


def hessian(cols: int = COLS, n: int = 400, seed: int = 0) -> torch.Tensor:
    """2XXᵀ/n of correlated inputs with a non-zero mean, like a real layer's."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(cols, cols, generator=gen) * 0.4 @ torch.randn(cols, n, generator=gen)
    x = x + torch.randn(cols, 1, generator=gen)
    return 2 * x @ x.T / n


def reference_gptq(
    w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float, act_order: bool
) -> torch.Tensor:
    """GPTQ written out plainly in float64: one column at a time, the whole remainder updated each time;
    a block's absmax (and mean) taken from the current weights when its first column comes up (with
    act_order: from the original weights, columns by descending diag H)."""
    levels = levels_for(w, spec)
    values, mids = levels.values.double(), levels.mids.double()
    rows, cols = w.shape
    size = rows * cols if spec.block_size is None else spec.block_size
    w = w.double().clone()
    h = h.double().clone()
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(cols)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h = h[order][:, order] + damp * torch.diag(h).mean() * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    flat_block = (torch.arange(rows)[:, None] * cols + torch.arange(cols)[None, :]) // size  # [rows, cols]
    scale: dict[int, tuple[float, float]] = {}

    def fit(block: int, current: torch.Tensor) -> None:
        vals = current[flat_block == block]
        mean = float(vals.mean()) if spec.centering else 0.0
        scale[block] = (float((vals - mean).abs().max()), mean)

    if act_order:
        for block in flat_block.unique().tolist():
            fit(block, w)
    wp = w[:, order].clone()
    q = torch.zeros_like(wp)
    for p in range(cols):
        col = int(order[p])
        current = torch.zeros_like(w)
        current[:, order] = wp
        for r in range(rows):
            block = int(flat_block[r, col])
            if block not in scale:
                fit(block, current)
            absmax, mean = scale[block]
            x = (float(wp[r, p]) - mean) / (absmax if absmax > 0 else 1.0)
            code = int(torch.bucketize(torch.tensor(x, dtype=torch.float64), mids))
            q[r, p] = values[code] * absmax + mean
        err = (wp[:, p] - q[:, p]) / u[p, p]
        wp[:, p:] -= err[:, None] * u[p, p:][None, :]
    out = torch.empty_like(q)
    out[:, order] = q
    return out.float()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x[0]}{x[1]}-b{x[2]}{'-c' if x[3] else ''}")
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_the_unoptimized_reference(layout, act_order):
    dtype, bits, block, centering = layout
    torch.manual_seed(1)
    w = torch.randn(ROWS, COLS)
    h = hessian()
    spec = QuantSpec(dtype, bits, block, centering=centering)
    settings = GPTQSettings(damp=0.01, lazy_block=8, act_order=act_order)
    got = gptq_quantize(w[None], h[None], levels_for(w, spec), block, centering, settings)[0]
    want = reference_gptq(w, h, spec, 0.01, act_order)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x[0]}{x[1]}-b{x[2]}")
@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_hessian_is_round_to_nearest_bit_for_bit(layout, act_order):
    """Nothing propagates when inputs are uncorrelated: GPTQ (and act-order's un-permutation) is RTN."""
    dtype, bits, block, centering = layout
    torch.manual_seed(2)
    w = torch.randn(ROWS, COLS)
    spec = QuantSpec(dtype, bits, block, centering=centering)
    levels = levels_for(w, spec)
    h = torch.diag(torch.rand(COLS) + 0.5)
    got = gptq_quantize(w[None], h[None], levels, block, centering, GPTQSettings(act_order=act_order))[0]
    assert torch.equal(got, reference_fake_quantize(w, spec, levels))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x[0]}{x[1]}-b{x[2]}")
def test_output_error_is_at_most_round_to_nearest(layout):
    dtype, bits, block, centering = layout
    torch.manual_seed(3)
    w = torch.randn(ROWS, COLS)
    h = hessian(seed=3)
    spec = QuantSpec(dtype, bits, block, centering=centering)
    levels = levels_for(w, spec)
    for act_order in (False, True):
        q = gptq_quantize(w[None], h[None], levels, block, centering, GPTQSettings(act_order=act_order))[0]
        rtn = reference_fake_quantize(w, spec, levels)
        error = lambda v: float(torch.trace((w - v) @ h @ (w - v).T))  # noqa: E731  (∝ ||WX − ŴX||²)
        assert error(q) <= error(rtn)


def test_a_representable_matrix_comes_back_unchanged():
    levels = levels_for(torch.ones(1), QuantSpec("int", 4, 16))
    torch.manual_seed(4)
    codes = torch.randint(0, len(levels.values), (ROWS, COLS))
    w = levels.values[codes] * 0.5
    w[:, ::16] = 0.5  # every in-row block of 16 holds its absmax exactly
    got = gptq_quantize(w[None], hessian()[None], levels, 16, False, GPTQSettings())[0]
    assert torch.equal(got, w)


def test_batched_solve_equals_one_matrix_at_a_time():
    torch.manual_seed(5)
    w = torch.randn(3, ROWS, COLS)
    h = torch.stack([hessian(seed=s) for s in range(3)])
    spec = QuantSpec("nf", 4, 16)
    levels = levels_for(w[0], spec)
    for act_order in (False, True):
        settings = GPTQSettings(act_order=act_order)
        batched = gptq_quantize(w, h, levels, 16, False, settings)
        single = torch.cat(
            [gptq_quantize(w[i : i + 1], h[i : i + 1], levels, 16, False, settings) for i in range(3)]
        )
        assert torch.equal(batched, single)


def test_dead_columns_are_zero_and_a_singular_hessian_is_named():
    h = hessian()
    h[5, :] = h[:, 5] = 0.0  # an input that is always zero
    w = torch.randn(ROWS, COLS)
    levels = levels_for(w, QuantSpec("int", 4, 16))
    assert (gptq_quantize(w[None], h[None], levels, 16, False, GPTQSettings())[0][:, 5] == 0).all()
    _, dead = inverse_factor(h[None], 0.01)
    assert dead[0].nonzero().flatten().tolist() == [5]
    with pytest.raises(ValueError, match="not positive definite after damping"):
        inverse_factor(-hessian()[None], 0.01)


def test_block_starts():
    assert block_starts(2, 8, 4).tolist() == [0, 4, 0, 4]  # in-row groups
    assert block_starts(2, 6, 4).tolist() == [0, 0, 2]  # a block that wraps into the next row starts at 0
    assert block_starts(4, 4, 8).tolist() == [0, 0]  # whole rows
    assert block_starts(3, 5, None).tolist() == [0]  # the whole tensor


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"damp": 0.0}, "damp=0.0"), ({"damp": 1.5}, "damp=1.5"), ({"lazy_block": 0}, "lazy_block=0"),
     ({"act_order": "yes"}, "act_order='yes'")],
)  # fmt: skip
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTQSettings(**kwargs)


def test_one_codebook_per_matrix_equals_solving_each_matrix_alone():
    """Quantile batches carry a codebook per matrix (searchsorted per row): same as one solve each."""
    from kernels.gptq import Codebooks

    torch.manual_seed(6)
    w = torch.randn(3, ROWS, COLS) * torch.tensor([1.0, 0.3, 2.0])[:, None, None]
    h = torch.stack([hessian(seed=s) for s in range(3)])
    spec = QuantSpec("quantile", 3, 16)
    levels = [levels_for(w[i], spec) for i in range(3)]
    for act_order in (False, True):
        settings = GPTQSettings(act_order=act_order)
        batched = gptq_quantize(w, h, Codebooks.stack(levels), 16, False, settings)
        for i in range(3):
            assert torch.equal(
                batched[i], gptq_quantize(w[i : i + 1], h[i : i + 1], levels[i], 16, False, settings)[0]
            )
