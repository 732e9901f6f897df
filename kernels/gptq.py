"""GPTQ (Frantar et al., 2022) over this package's blockwise codebooks, batched over same-shaped matrices.

Given weights W [out, in] and the Hessian H = 2XXᵀ/n of their inputs, GPTQ quantizes one input column
at a time and spreads each column's rounding error over the columns not yet quantized, weighted by
the upper Cholesky factor U of H⁻¹ (which minimizes ||WX − ŴX||² greedily):

    q_i   = Q(w_i)                      (nearest code of the column, the block's absmax and mean)
    err_i = (w_i − q_i) / U_ii
    w_j  −= err_i · U_ij   for j > i    (lazily: inside a batch of columns at once, then one GEMM)

Blocks are this package's: B consecutive values of the row-major flattening, each with its absmax
(and mean with centering). A block's scale is taken from the weights as updated when its first
column is reached, which for blocks inside one row (B divides the width) is GPTQ's group rule, and
for blocks of whole rows or the whole tensor means the original weights. Lazy batches are cut at
every column where a block starts, so the scale always sees every update made before it (exact, where
GPTQ's reference reads stale values for groups that start inside a batch). With `act_order`, columns
run in order of descending diag(H) and every scale comes from the original weights up front (GPTQ's
static groups), so storage is exactly that of round-to-nearest.

The arithmetic of one column is the torch reference's (`kernels.blockwise`) operation for operation:
with a diagonal H nothing propagates and GPTQ returns RTN's values bit for bit (a test checks).
Everything is float32 on the weights' device; the G matrices of a batch are solved together, so the
Python loop runs over columns only (no loop over matrices, rows or blocks).

The quantizer is a parameter (`gptq_solve(w, h, quantizer, ...)`, any `ColumnQuantizer`): the loop asks
it to fix a block's constants when the block's first column comes up (`start`), to gather one column's
constants (`pick`) and to round a column (`quantize`). `gptq_quantize` is GPTQ over the blockwise
codebooks (`BlockwiseColumns`); `kernels.bcq.BCQColumns` is ShiftAddLLM's binary codes in the same loop.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from kernels.codebooks import Levels
from kernels.scaling import TINY_ABSMAX, TINY_SCALE

LAZY_BLOCK = 128  # columns per lazy batch (GPTQ's default)


@dataclass(frozen=True)
class GPTQSettings:
    """The solve's own settings (the codes come from the spec and levels)."""

    damp: float = 0.01  # added to diag(H): damp × mean(diag(H))
    lazy_block: int = LAZY_BLOCK
    act_order: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.damp < 1.0:
            raise ValueError(f"gptq damp={self.damp} is not allowed; use 0 < damp < 1")
        if isinstance(self.lazy_block, bool) or not isinstance(self.lazy_block, int) or self.lazy_block < 1:
            raise ValueError(f"gptq lazy_block={self.lazy_block!r} is not allowed; use an int >= 1")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"gptq act_order={self.act_order!r} is not allowed; use true or false")


def inverse_factor(h: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(U, dead): the upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹ per matrix, and dead columns.

    `h` is float32 [G, in, in] (not modified). Dead columns (H_ii = 0: the input is always 0) get
    H_ii = 1, as GPTQ does; their weights are zeroed by the caller.

    Raises:
        ValueError: H + damping is not positive definite (name the remedy: more damping, more data).
    """
    h = h.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * diag.mean(dim=-1, keepdim=True)
    factor, info = torch.linalg.cholesky_ex(h)
    if bool((info != 0).any()):
        raise ValueError(
            f"the Hessian is not positive definite after damping {damp}: raise gptq damp or use more "
            "calibration samples"
        )
    inverse = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inverse, upper=True), dead


def block_starts(rows: int, cols: int, block_size: int | None) -> Tensor:
    """The column at which each block of the row-major flattening is first reached (int64 [n_blocks]).

    A block inside one row starts at its first column; a block that covers the start of a row (whole
    rows, the whole tensor, or a block that wraps from one row into the next) starts at column 0.
    """
    n = rows * cols
    size = n if block_size is None else min(block_size, n)
    first = torch.arange(0, n, size, dtype=torch.int64)
    last = torch.clamp(first + size - 1, max=n - 1)
    one_row = first // cols == last // cols
    return torch.where(one_row, first % cols, torch.zeros_like(first))


def block_scales(w: Tensor, blocks: Tensor, block_size: int, centering: bool) -> tuple[Tensor, Tensor | None]:
    """(absmax, mean or None) [G, len(blocks)] of the given blocks of each matrix's flattening, float32."""
    g = w.shape[0]
    flat = w.reshape(g, -1)
    n = flat.shape[1]
    idx = blocks[:, None] * block_size + torch.arange(block_size, device=w.device)[None, :]
    valid = idx < n
    values = flat[:, idx.clamp(max=n - 1)]  # [G, k, B]
    zero = torch.zeros((), device=w.device)
    mean = None
    if centering:
        count = valid.sum(dim=1).to(torch.float32)
        mean = torch.where(valid, values, zero).sum(dim=2) / count
        values = values - mean[..., None]
    return torch.where(valid, values, zero).abs().amax(dim=2), mean


@dataclass
class _Scales:
    """Per-block scale of a batch: absmax, the exact power-of-two prescale, its reciprocal, the mean."""

    absmax: Tensor  # [G, n_blocks]
    scale: Tensor
    inv: Tensor
    mean: Tensor | None

    def set(self, blocks: Tensor, absmax: Tensor, mean: Tensor | None) -> None:
        scale = torch.where(absmax < TINY_ABSMAX, TINY_SCALE, 1.0)
        self.absmax[:, blocks] = absmax
        self.scale[:, blocks] = scale
        self.inv[:, blocks] = torch.reciprocal(
            torch.where(absmax > 0, absmax, torch.ones_like(absmax)) * scale
        )
        if self.mean is not None and mean is not None:
            self.mean[:, blocks] = mean


@dataclass(frozen=True)
class Codebooks:
    """One codebook per matrix of a batch (quantile): values [G, n] and mids [G, m], float32."""

    values: Tensor
    mids: Tensor

    @classmethod
    def stack(cls, levels: Sequence[Levels]) -> Codebooks:
        return cls(torch.stack([lv.values for lv in levels]), torch.stack([lv.mids for lv in levels]))


@dataclass(frozen=True)
class _Picked:
    """The scales of one column's blocks, gathered: [G, rows] each."""

    scale: Tensor
    inv: Tensor
    absmax: Tensor
    mean: Tensor | None


def _pick(scales: _Scales, ids: Tensor) -> _Picked:
    pick = (lambda t: t[:, ids]) if ids.dim() == 1 else (lambda t: torch.gather(t, 1, ids))
    mean = None if scales.mean is None else pick(scales.mean)
    return _Picked(pick(scales.scale), pick(scales.inv), pick(scales.absmax), mean)


def _quantize_picked(x: Tensor, picked: _Picked, levels: Levels | Codebooks) -> Tensor:
    centered = x if picked.mean is None else x - picked.mean
    normalized = (centered * picked.scale) * picked.inv
    if isinstance(levels, Codebooks):  # per matrix: searchsorted counts mids < x, as bucketize does
        codes = torch.searchsorted(levels.mids, normalized.contiguous())
        q = torch.gather(levels.values, 1, codes) * picked.absmax
    else:
        q = levels.values[torch.bucketize(normalized, levels.mids, out_int32=True)] * picked.absmax
    return q if picked.mean is None else q + picked.mean


def quantize_column(x: Tensor, ids: Tensor, scales: _Scales, levels: Levels | Codebooks) -> Tensor:
    """The nearest codes of column values x [G, rows] in blocks `ids` ([rows] or [G, rows]), decoded."""
    return _quantize_picked(x, _pick(scales, ids), levels)


class ColumnQuantizer(Protocol):
    """What the column loop asks of a quantizer. Blocks are ids into each matrix's row-major flattening."""

    def start(self, w: Tensor, blocks: Tensor) -> None:
        """Fix the constants of `blocks` from w [G, rows, cols] as updated now (their first column is
        next)."""

    def pick(self, ids: Tensor) -> Any:
        """The constants of one column's blocks `ids` ([rows], or [G, rows] with act_order), gathered."""

    def quantize(self, x: Tensor, picked: Any) -> Tensor:
        """Column values x [G, rows] -> the values of their nearest codes (float32)."""


class BlockwiseColumns:
    """GPTQ's own quantizer: a block's absmax (and mean) and a codebook (shared, or one per matrix)."""

    def __init__(self, w: Tensor, levels: Levels | Codebooks, size: int, centering: bool) -> None:
        g, rows, cols = w.shape
        empty = torch.zeros(g, math.ceil(rows * cols / size), device=w.device)
        mean = empty.clone() if centering else None
        self.scales = _Scales(empty.clone(), empty.clone(), empty.clone(), mean)
        self.levels, self.size, self.centering = levels, size, centering

    def start(self, w: Tensor, blocks: Tensor) -> None:
        self.scales.set(blocks, *block_scales(w, blocks, self.size, self.centering))

    def pick(self, ids: Tensor) -> _Picked:
        return _pick(self.scales, ids)

    def quantize(self, x: Tensor, picked: _Picked) -> Tensor:
        return _quantize_picked(x, picked, self.levels)


def gptq_quantize(
    w: Tensor,
    h: Tensor,
    levels: Levels | Codebooks,
    block_size: int | None,
    centering: bool,
    settings: GPTQSettings,
) -> Tensor:
    """GPTQ-quantize G same-shaped matrices w [G, out, in] with Hessians h [G, in, in]; float32 result.

    `levels`: the codebook shared by the batch, or `Codebooks` with one per matrix (quantile: estimated by
    the caller from each matrix's original weights).
    """
    _check_shapes(w, h)
    size = _block(w, block_size)
    return gptq_solve(w, h, BlockwiseColumns(w, levels, size, centering), size, settings)


def gptq_solve(
    w: Tensor, h: Tensor, quantizer: ColumnQuantizer, block_size: int | None, settings: GPTQSettings
) -> Tensor:
    """GPTQ's column loop over G matrices w [G, out, in] with Hessians h [G, in, in] and any quantizer
    whose blocks are `block_size` values of the row-major flattening; float32 result."""
    _check_shapes(w, h)
    _g, rows, cols = w.shape
    size = _block(w, block_size)
    w = w.to(torch.float32).clone()
    row_base = torch.arange(rows, device=w.device) * cols
    if settings.act_order:
        return _act_order(w, h, quantizer, size, settings, row_base)
    u, dead = inverse_factor(h.to(torch.float32), settings.damp)
    w.masked_fill_(dead[:, None, :], 0.0)
    starts = block_starts(rows, cols, size)
    host_rows = torch.arange(rows, dtype=torch.int64) * cols
    for i1, i2 in _batches(cols, settings.lazy_block, starts):
        begin = torch.nonzero(starts == i1).flatten().to(w.device)
        if begin.numel():
            quantizer.start(w, begin)
        # one gather of the constants per batch when no block boundary falls inside it (every layout
        # but blocks that wrap from one row into the next): the loop below is launch-bound
        fixed = torch.equal((host_rows + i1) // size, (host_rows + i2 - 1) // size)
        _solve_batch(w, u, i1, i2, lambda j: (row_base + j) // size, quantizer, fixed)
    return w


def _check_shapes(w: Tensor, h: Tensor) -> None:
    if w.dim() != 3 or h.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(
            f"gptq needs w [G, out, in] and h [G, in, in]; got {tuple(w.shape)}, {tuple(h.shape)}"
        )


def _block(w: Tensor, block_size: int | None) -> int:
    """Values per block of one matrix of w [G, rows, cols]."""
    n = w.shape[1] * w.shape[2]
    return n if block_size is None else min(block_size, n)


def _batches(cols: int, lazy: int, starts: Tensor) -> list[tuple[int, int]]:
    """Lazy batches [i1, i2): every `lazy` columns, and cut wherever a block starts."""
    cuts = sorted({*range(0, cols, lazy), *starts.tolist(), cols})
    return list(itertools.pairwise(cuts))


def _solve_batch(
    w: Tensor,
    u: Tensor,
    i1: int,
    i2: int,
    block_ids: Callable[[int], Tensor],
    quantizer: ColumnQuantizer,
    fixed: bool = False,
) -> None:
    """Quantize columns i1..i2 of w in place (w holds q there after), then push their error right.

    `fixed`: every column of the batch lies in the same blocks (their constants are gathered once).
    """
    w1 = w[:, :, i1:i2].clone()
    err = torch.zeros_like(w1)
    u1 = u[:, i1:i2, i1:i2]
    picked = quantizer.pick(block_ids(i1)) if fixed else None
    for i in range(i2 - i1):
        x = w1[:, :, i]
        q = quantizer.quantize(x, picked if picked is not None else quantizer.pick(block_ids(i1 + i)))
        e = (x - q) / u1[:, i, i][:, None]
        w1[:, :, i:] -= e[:, :, None] * u1[:, None, i, i:]
        w1[:, :, i] = q
        err[:, :, i] = e
    w[:, :, i1:i2] = w1
    w[:, :, i2:] -= torch.bmm(err, u[:, i1:i2, i2:])


def _act_order(
    w: Tensor, h: Tensor, quantizer: ColumnQuantizer, size: int, settings: GPTQSettings, row_base: Tensor
) -> Tensor:
    """Columns by descending diag(H) per matrix; every block's constants from the original weights."""
    _g, rows, cols = w.shape
    w.masked_fill_((h.diagonal(dim1=-2, dim2=-1) == 0)[:, None, :], 0.0)  # dead columns, as GPTQ does
    quantizer.start(w, torch.arange(math.ceil(rows * cols / size), device=w.device))
    perm = torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)
    hp = torch.gather(torch.gather(h.to(torch.float32), 1, perm[:, :, None].expand(-1, -1, cols)), 2,
                      perm[:, None, :].expand(-1, cols, -1))  # fmt: skip
    u, _ = inverse_factor(hp, settings.damp)
    wp = torch.gather(w, 2, perm[:, None, :].expand(-1, rows, -1))
    no_starts = torch.zeros(0, dtype=torch.int64)
    for i1, i2 in _batches(cols, settings.lazy_block, no_starts):
        _solve_batch(wp, u, i1, i2, lambda j: (row_base[None, :] + perm[:, j : j + 1]) // size, quantizer)
    out = torch.empty_like(wp)
    out.scatter_(2, perm[:, None, :].expand(-1, rows, -1), wp)
    return out
