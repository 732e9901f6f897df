"""The BCQ fit as one Triton kernel (CUDA; TRITON_INTERPRET=1 on CPU): greedy start and every refinement
round of a group of blocks in registers, one read of the weights and one write of the result.

`kernels.bcq.fit_blocks` is the reference: the same estimator, round for round. A program holds ROWS
blocks (padded to BLOCK_P2 lanes) and runs, per block,

- the greedy fit: r = x; for i < q: b_i = sign(r) (+1 where r > 0), α_i = fp16(Σ|r| / n), r −= α_i·b_i;
- up to ITERS rounds, each: the normal equations BᵀB α = Bᵀx from the code bits (BᵀB's off-diagonal
  entries n − 2·#(b_i ≠ b_j), integers; Bᵀx_i = 2·Σ_{b_i=+1} x − Σ x in float64, exact like the
  reference's per-pattern sums), solved by an unrolled LDLᵀ in float64, rounded to fp16 and kept only
  where it does not raise the block's squared error; |α| sorted descending; every value to the nearest
  of the block's 2^q sums (stable-sorted sums, a value above a midpoint takes the upper sum: the
  reference's `#(mids < x)` rule); the error of the chosen codes carried to the next round;
- the loop leaves a program once all its blocks are at a fixed point (a round changed neither α nor a
  code: every later round would return the same), so the result is the one all ITERS rounds give.

Where it may differ from the reference, block by block (the same estimator both ways):
- the greedy mean is a float32 sum in another order, so its fp16 rounding can differ at a tie;
- a singular BᵀB (sign vectors that repeat or mirror): the reference takes the minimum-norm solution
  (pinv), this kernel a basic one (a zero pivot's α set to 0); both are least-squares solutions, and
  the error gate keeps either from raising the error.
`tests/kernels/test_bcq_triton.py` measures both against the reference on CPU under the interpreter.

Only fp16 scales and q = 2..4 take this path (`supports`); pow2 scales and q = 1 stay in torch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCK = 4096  # widest block one program holds (padded to a power of two)
TILE = 2048  # values per program: ROWS = TILE // BLOCK_P2 blocks
FP16_MAX = tl.constexpr(65504.0)


def supports(q: int, scales_kind: str, block: int, device: torch.device) -> bool:
    """Whether `fit_blocks_triton` fits this configuration (else the torch reference does)."""
    on_device = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and 2 <= q <= 4 and scales_kind == "fp16" and 1 <= block <= MAX_BLOCK


@triton.jit
def _fp16(a):
    # float32 value of the float16 nearest `a` (float32 or float64), clamped to ±65504 first
    return tl.minimum(tl.maximum(a, -FP16_MAX), FP16_MAX).to(tl.float16).to(tl.float32)


@triton.jit
def _signed(bit, a):
    # a where the bit is set, −a elsewhere (a: [ROWS], bit: [ROWS, BLOCK_P2])
    return tl.where(bit != 0, a[:, None], -a[:, None])


@triton.jit
def _decode(code, a0, a1, a2, a3, Q: tl.constexpr):
    # Σ_i ±α_i of each value's code, summed in plane order (as the reference's block values)
    v = _signed(code & 1, a0)
    v += _signed((code >> 1) & 1, a1)
    if Q >= 3:
        v += _signed((code >> 2) & 1, a2)
    if Q >= 4:
        v += _signed((code >> 3) & 1, a3)
    return v


@triton.jit
def _sq_error(v, x, mask):
    # float64 Σ (v − x)² per block: float32 squares, float64 sum (the reference's)
    d = v - x
    return tl.sum(tl.where(mask, d * d, 0.0).to(tl.float64), axis=1)


@triton.jit
def _desc(a, b):
    return tl.maximum(a, b), tl.minimum(a, b)


@triton.jit
def _sort_abs(a0, a1, a2, a3, Q: tl.constexpr):
    # |α| sorted descending (a sorting network; planes past Q stay 0)
    a0, a1 = _desc(tl.abs(a0), tl.abs(a1))
    if Q == 3:
        a1, a2 = _desc(a1, tl.abs(a2))
        a0, a1 = _desc(a0, a1)
    if Q == 4:
        a2, a3 = _desc(tl.abs(a2), tl.abs(a3))
        a0, a2 = _desc(a0, a2)
        a1, a3 = _desc(a1, a3)
        a1, a2 = _desc(a1, a2)
    return a0, a1, a2, a3


@triton.jit
def _plane_sum(code, i: tl.constexpr, x64, mask):
    # Σ of the values whose code has bit i set, float64
    return tl.sum(tl.where(mask & (((code >> i) & 1) != 0), x64, 0.0), axis=1)


@triton.jit
def _gram(code, i: tl.constexpr, j: tl.constexpr, n, mask):
    # (BᵀB)_ij = n − 2·#(b_i ≠ b_j), exact in float64
    differ = tl.where(mask & ((((code >> i) ^ (code >> j)) & 1) != 0), 1.0, 0.0)
    return n - 2.0 * tl.sum(differ.to(tl.float64), axis=1)


@triton.jit
def _pivot(d, tol):
    # 1/d, or 0 for a (numerically) zero pivot: that component of the solution is set to 0
    return tl.where(d > tol, 1.0 / tl.where(d > tol, d, 1.0), 0.0)


@triton.jit
def _least_squares(code, x64, total, n, mask, Q: tl.constexpr):
    # α (float64) solving BᵀB α = Bᵀx for the code bits: unrolled LDLᵀ, zero pivots skipped
    tol = n * 1e-12
    zero = tl.zeros_like(n)
    r0 = 2.0 * _plane_sum(code, 0, x64, mask) - total
    r1 = 2.0 * _plane_sum(code, 1, x64, mask) - total
    g01 = _gram(code, 0, 1, n, mask)
    r2, r3, g02, g12, g03, g13, g23 = zero, zero, zero, zero, zero, zero, zero
    g22, g33 = n, n
    if Q >= 3:
        r2 = 2.0 * _plane_sum(code, 2, x64, mask) - total
        g02, g12 = _gram(code, 0, 2, n, mask), _gram(code, 1, 2, n, mask)
    if Q >= 4:
        r3 = 2.0 * _plane_sum(code, 3, x64, mask) - total
        g03, g13, g23 = _gram(code, 0, 3, n, mask), _gram(code, 1, 3, n, mask), _gram(code, 2, 3, n, mask)
    # G = L D Lᵀ (unit lower L); a zero pivot's column of L is 0
    d0 = n
    i0 = _pivot(d0, tol)
    l10, l20, l30 = g01 * i0, g02 * i0, g03 * i0
    d1 = n - l10 * l10 * d0
    i1 = _pivot(d1, tol)
    l21 = (g12 - l20 * l10 * d0) * i1
    l31 = (g13 - l30 * l10 * d0) * i1
    d2 = g22 - l20 * l20 * d0 - l21 * l21 * d1
    i2 = _pivot(d2, tol)
    l32 = (g23 - l30 * l20 * d0 - l31 * l21 * d1) * i2
    d3 = g33 - l30 * l30 * d0 - l31 * l31 * d1 - l32 * l32 * d2
    i3 = _pivot(d3, tol)
    y0 = r0
    y1 = r1 - l10 * y0
    y2 = r2 - l20 * y0 - l21 * y1
    y3 = r3 - l30 * y0 - l31 * y1 - l32 * y2
    a3 = y3 * i3
    a2 = y2 * i2 - l32 * a3
    a1 = y1 * i1 - l21 * a2 - l31 * a3
    a0 = y0 * i0 - l10 * a1 - l20 * a2 - l30 * a3
    return a0, a1, a2, a3


@triton.jit
def _nearest(x, a0, a1, a2, a3, Q: tl.constexpr, P2: tl.constexpr):
    # (codes, values): each value's nearest of its block's 2^Q sums, the sums stable-sorted by value
    # and a value above the midpoint of two neighbours taking the upper one (the reference's rule)
    p = tl.arange(0, P2)
    sums = _decode(p[None, :], a0, a1, a2, a3, Q)  # [ROWS, P2]: the sum of every pattern
    rank = tl.zeros(sums.shape, tl.int32)  # stable rank of each pattern among its block's sums
    for k in tl.static_range(P2):
        s_k = tl.sum(tl.where(p[None, :] == k, sums, 0.0), axis=1)[:, None]
        rank += ((s_k < sums) | ((s_k == sums) & (k < p[None, :]))).to(tl.int32)
    low = tl.sum(tl.where(rank == 0, sums, 0.0), axis=1)
    value = tl.zeros(x.shape, tl.float32) + low[:, None]
    code = tl.zeros(x.shape, tl.int32) + tl.sum(tl.where(rank == 0, p[None, :], 0), axis=1)[:, None]
    for r in tl.static_range(1, P2):
        high = tl.sum(tl.where(rank == r, sums, 0.0), axis=1)
        above = x > ((low + high) * 0.5)[:, None]
        value = tl.where(above, high[:, None], value)
        code = tl.where(above, tl.sum(tl.where(rank == r, p[None, :], 0), axis=1)[:, None], code)
        low = high
    return code, value


@triton.jit
def _bcq_kernel(
    x_ptr, alpha_ptr, codes_ptr, out_ptr, rounds_ptr, n_blocks, block, iters,
    Q: tl.constexpr, P2: tl.constexpr, ROWS: tl.constexpr, BLOCK_P2: tl.constexpr,
    STORE_CODES: tl.constexpr, STORE_OUT: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_P2)
    live = rows < n_blocks
    mask = live[:, None] & (cols[None, :] < block)
    offs = rows[:, None] * block + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x64 = x.to(tl.float64)
    n = tl.sum(mask.to(tl.float64), axis=1)
    n32 = tl.where(live, n, 1.0).to(tl.float32)  # dead rows: no division by 0
    total = tl.sum(x64, axis=1)

    # greedy start: plane by plane, b_i = +1 where the residual is > 0, α_i = fp16(mean |residual|)
    r = x
    a0 = _fp16(tl.div_rn(tl.sum(tl.abs(r), axis=1), n32))
    code = tl.where(r > 0, 1, 0)
    r = tl.where(mask, r - _signed(r > 0, a0), 0.0)
    a1 = _fp16(tl.div_rn(tl.sum(tl.abs(r), axis=1), n32))
    code |= tl.where(r > 0, 2, 0)
    r = tl.where(mask, r - _signed(r > 0, a1), 0.0)
    a2 = tl.zeros_like(a0)
    a3 = tl.zeros_like(a0)
    if Q >= 3:
        a2 = _fp16(tl.div_rn(tl.sum(tl.abs(r), axis=1), n32))
        code |= tl.where(r > 0, 4, 0)
        r = tl.where(mask, r - _signed(r > 0, a2), 0.0)
    if Q >= 4:
        a3 = _fp16(tl.div_rn(tl.sum(tl.abs(r), axis=1), n32))
        code |= tl.where(r > 0, 8, 0)
    value = _decode(code, a0, a1, a2, a3, Q)
    error = _sq_error(value, x, mask)

    # refinement rounds until every block of the program is at a fixed point
    active = live
    rounds = tl.zeros(rows.shape, tl.int32)
    it = 0
    while (it < iters) & (tl.max(active.to(tl.int32), axis=0) > 0):
        c0, c1, c2, c3 = _least_squares(code, x64, total, n, mask, Q)
        c0, c1, c2, c3 = _fp16(c0), _fp16(c1), _fp16(c2), _fp16(c3)
        better = _sq_error(_decode(code, c0, c1, c2, c3, Q), x, mask) <= error
        b0 = tl.where(better, c0, a0)
        b1 = tl.where(better, c1, a1)
        b2 = tl.where(better, c2, a2)
        b3 = tl.where(better, c3, a3)
        b0, b1, b2, b3 = _sort_abs(b0, b1, b2, b3, Q)
        new_code, value = _nearest(x, b0, b1, b2, b3, Q, P2)
        error = _sq_error(value, x, mask)
        moved = tl.max(tl.where(mask & (new_code != code), 1, 0), axis=1) > 0
        moved = moved | (b0 != a0) | (b1 != a1) | (b2 != a2) | (b3 != a3)
        it += 1
        rounds = tl.where(active, it, rounds)
        active = active & moved
        a0, a1, a2, a3, code = b0, b1, b2, b3, new_code

    tl.store(alpha_ptr + rows * Q, a0, mask=live)
    tl.store(alpha_ptr + rows * Q + 1, a1, mask=live)
    if Q >= 3:
        tl.store(alpha_ptr + rows * Q + 2, a2, mask=live)
    if Q >= 4:
        tl.store(alpha_ptr + rows * Q + 3, a3, mask=live)
    tl.store(rounds_ptr + rows, rounds, mask=live)
    if STORE_CODES:
        tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
    if STORE_OUT:
        tl.store(out_ptr + offs, value, mask=mask)


def fit_blocks_triton(
    x: Tensor, q: int, iters: int, store_codes: bool = True, store_out: bool = False
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """(α float32 [n, q], uint8 codes [n, B] or None, decoded float32 [n, B] or None, rounds int32 [n])
    of float32 blocks x [n, B]: greedy, then up to `iters` rounds (see the module docstring)."""
    x = x.contiguous()
    n_rows, block = x.shape
    block_p2 = triton.next_power_of_2(block)
    rows = max(1, min(TILE // block_p2, triton.next_power_of_2(n_rows)))
    alpha = torch.empty(n_rows, q, dtype=torch.float32, device=x.device)
    rounds = torch.empty(n_rows, dtype=torch.int32, device=x.device)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device) if store_codes else None
    out = torch.empty_like(x) if store_out else None
    grid = (triton.cdiv(n_rows, rows),)
    _bcq_kernel[grid](
        x, alpha, codes if codes is not None else alpha, out if out is not None else alpha, rounds,
        n_rows, block, iters, Q=q, P2=2**q, ROWS=rows, BLOCK_P2=block_p2,
        STORE_CODES=store_codes, STORE_OUT=store_out, num_warps=4 if rows * block_p2 <= 1024 else 8,
    )  # fmt: skip
    return alpha, codes, out, rounds
