"""Binary-coding quantization (BCQ): a block of weights as Σ_{i=1..q} α_i·b_i with b_i ∈ {−1, +1}.

Blocks are this package's (`block_size` consecutive values of the row-major flattening; where the block
size divides an nn.Linear's width, a group of one row along the input dimension; the tail block may be
shorter). Each block stores q scales α (`ScaleFormat`: float16, or sums of signed powers of two) and
each value q sign bits: its code is the index of its sign pattern (bit i set: b_i = +1), so the value
decodes to Σ α_i·b_i and the q bit planes pack like any code (`kernels.packing.pack_planes`).

Fitting (`fit_blocks`), batched over all blocks of a tensor at once (Python loops over rounds and q only):
- greedy: r = x; for i = 1..q: b_i = +1 where r > 0 else −1, α_i = mean |r| (in the scale format),
  r −= α_i·b_i;
- up to `iters` rounds of alternating refinement (`refine_blocks`): α by least squares over the q basis
  vectors with b fixed (BᵀB α = Bᵀx from per-pattern counts and sums in float64, so no [blocks, B, q]
  tensor; Cholesky, the pseudo-inverse where BᵀB is singular), rounded to the format and kept only
  where it lowers the block's squared error; then each b by exhaustive search over the 2^q sign
  patterns: the nearest of the block's 2^q sums (a value's rank is the count of the sorted midpoints
  below it; a value on a midpoint takes the lower sum, the codebooks' rule). Neither step raises a
  block's error, so no round does (a test checks). q = 1 is its greedy fit (sign · mean |x|) already,
  so it skips the rounds.

Cost of a round: one float64 copy of the blocks is made per fit, not per round; the counts scatter an
expanded 1 (no ones tensor); the rank is counted in uint8 by comparisons (no binary search); each
block's error at its codes is carried from the search that chose them (the sums it gathered), so a
round computes one error, the candidate α's. A round depends on a block's (α, codes) alone, so a block
whose round changed neither is at a fixed point and leaves the batch (compacted once such blocks are
an eighth of it; one host read a round): the result is bit for bit the one all `iters` rounds give
(a test checks against the unoptimized loop), and most blocks stop early (mean rounds run on a random
1024² matrix, block 128: 5.6 / 10.6 / 12.8 of 15 at q = 2 / 3 / 4).

Scale formats (fp16, ShiftAddLLM's additive powers of two) are `kernels.bcq_scales`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kernels.bcq_scales import ScaleFormat
from kernels.scaling import effective_block_size
from kernels.spec import QuantSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BCQSettings:
    """The fit's settings: refinement rounds after the greedy start, and the scale format."""

    iters: int = 15
    scales: ScaleFormat = field(default_factory=ScaleFormat)

    def __post_init__(self) -> None:
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"bcq iters={self.iters!r} is not allowed; use an int >= 0 (0: greedy only)")


def sign_patterns(q: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """[2^q, q]: row p holds b_i = +1 where bit i of p is set, else −1."""
    bits = (torch.arange(2**q, device=device)[:, None] >> torch.arange(q, device=device)) & 1
    return (2 * bits - 1).to(dtype)


def block_values(alpha: Tensor) -> Tensor:
    """[n, 2^q]: every block's 2^q sums Σ ±α_i, indexed by code (elementwise products, fixed order)."""
    return (alpha[:, None, :] * sign_patterns(alpha.shape[1], alpha.device)).sum(dim=-1)


def sorted_levels(alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(sorted sums [n, 2^q], their codes [n, 2^q], float32 midpoints [n, 2^q − 1]) of each block."""
    values, order = torch.sort(block_values(alpha), dim=1, stable=True)
    return values, order, (values[:, :-1] + values[:, 1:]) / 2


def nearest(x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """(int64 codes, float32 sums) [n, B]: each value's nearest of its block's 2^q sums (exhaustive
    over the patterns; a value on a midpoint takes the lower sum, the codebooks' rule).

    A value's rank among the sorted sums is the number of midpoints below it (what searchsorted over
    the midpoints returns), counted with 2^q − 1 comparisons: cheaper than a binary search on a CPU.
    The sums are gathered from the same sorted values, so they equal `decode(alpha, codes)` bit for bit.
    """
    values, order, mids = sorted_levels(alpha)
    rank = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for m in range(mids.shape[1]):
        rank += x > mids[:, m, None]
    rank64 = rank.to(torch.int64)  # gather converts any other index dtype to int64 first (on a CPU)
    return torch.gather(order, 1, rank64), torch.gather(values, 1, rank64)


def nearest_codes(x: Tensor, alpha: Tensor) -> Tensor:
    """int64 [n, B]: each value's nearest sum (exhaustive over the 2^q patterns), as its code."""
    return nearest(x, alpha)[0]


def decode(alpha: Tensor, codes: Tensor) -> Tensor:
    """float32 [n, B]: Σ α_i·b_i of each value's code."""
    return torch.gather(block_values(alpha), 1, codes)


def squared_errors(x: Tensor, decoded: Tensor) -> Tensor:
    """float64 [n]: Σ (x − decoded)² per block (float32 squares; overwrites `decoded`)."""
    return decoded.sub_(x).square_().sum(dim=1, dtype=torch.float64)


def block_errors(x: Tensor, alpha: Tensor, codes: Tensor) -> Tensor:
    """float64 [n]: each block's squared error."""
    return squared_errors(x, decode(alpha, codes))


def greedy_fit(x: Tensor, q: int, scales: ScaleFormat) -> tuple[Tensor, Tensor]:
    """(α [n, q], codes int64 [n, B]): the greedy residual fit of float32 blocks x [n, B]."""
    r = x.clone()
    codes = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    alphas = []
    for i in range(q):
        positive = r > 0
        alpha = scales.round(r.abs().mean(dim=1))
        r -= torch.where(positive, alpha[:, None], -alpha[:, None])
        codes |= positive.to(torch.int64) << i
        alphas.append(alpha)
    return torch.stack(alphas, dim=1), codes


def least_squares_alpha(x64: Tensor, codes: Tensor, q: int) -> Tensor:
    """float64 [n, q]: argmin_α ||x − Bα||² per block for the sign patterns `codes` (minimum-norm).

    x64: the blocks in float64 (made once a fit, not once a round). BᵀB and Bᵀx come from per-pattern
    counts and sums (scatter_add: one pass for any q, no [n, B, q] tensor); the counts are exact, and
    so are the sums wherever a block's values span less than ~2^22 in magnitude (float32 values summed
    in float64), so then any summation order gives the same normal equations.
    """
    n_patterns = 2**q
    counts = torch.zeros(x64.shape[0], n_patterns, dtype=torch.float64, device=x64.device)
    counts.scatter_add_(1, codes, torch.ones((), dtype=torch.float64, device=x64.device).expand(x64.shape))
    sums = torch.zeros_like(counts).scatter_add_(1, codes, x64)
    p = sign_patterns(q, x64.device, torch.float64)
    gram = (counts @ (p[:, :, None] * p[:, None, :]).reshape(n_patterns, q * q)).view(-1, q, q)
    return solve_normal_equations(gram, sums @ p)


def solve_normal_equations(gram: Tensor, rhs: Tensor) -> Tensor:
    """float64 [n, q]: the minimum-norm solution of gram·α = rhs per block (gram = BᵀB, rhs = Bᵀx).

    Cholesky where BᵀB is well conditioned (every pivot within 1e-6 of the largest), the pseudo-inverse
    for the rest (singular where sign vectors repeat or mirror each other; both give the least-squares
    α); one host read decides whether there is a rest.
    """
    factor, info = torch.linalg.cholesky_ex(gram)
    pivots = factor.diagonal(dim1=-2, dim2=-1)
    alpha = torch.cholesky_solve(rhs[:, :, None], factor)[:, :, 0]
    singular = (info != 0) | (pivots.amin(dim=1) <= 1e-6 * pivots.amax(dim=1))
    if bool(singular.any()):
        rest = torch.linalg.pinv(gram[singular], hermitian=True) @ rhs[singular][:, :, None]
        alpha[singular] = rest[:, :, 0]
    return alpha


@dataclass(frozen=True, eq=False)
class BlockFit:
    """Blocks under refinement: their values, the fit so far, and its error (all a round reads).

    Attributes:
        x: float32 [n, B] values.
        x64: the same in float64 (the normal equations' sums).
        alpha: float32 [n, q] scales.
        codes: int64 [n, B] sign-pattern codes.
        error: float64 [n]: `block_errors(x, alpha, codes)`, carried from the round that chose the codes.
    """

    x: Tensor
    x64: Tensor
    alpha: Tensor
    codes: Tensor
    error: Tensor

    @classmethod
    def start(cls, x: Tensor, alpha: Tensor, codes: Tensor) -> BlockFit:
        """The state of blocks x at a given fit (e.g. the greedy one)."""
        return cls(x, x.to(torch.float64), alpha, codes, block_errors(x, alpha, codes))

    def select(self, rows: Tensor) -> BlockFit:
        """The blocks `rows` (indices) only."""
        return BlockFit(self.x[rows], self.x64[rows], self.alpha[rows], self.codes[rows], self.error[rows])


def refine(fit: BlockFit, scales: ScaleFormat) -> BlockFit:
    """One round: least-squares α (kept where it lowers a block's error), then every code's nearest sum."""
    candidate = scales.round(least_squares_alpha(fit.x64, fit.codes, fit.alpha.shape[1]))
    better = block_errors(fit.x, candidate, fit.codes) <= fit.error
    alpha = torch.where(better[:, None], candidate, fit.alpha)
    alpha = torch.sort(alpha.abs(), dim=1, descending=True).values  # the same 2^q sums, canonical order
    codes, decoded = nearest(fit.x, alpha)
    return BlockFit(fit.x, fit.x64, alpha, codes, squared_errors(fit.x, decoded))


def refine_blocks(
    x: Tensor, alpha: Tensor, codes: Tensor, settings: BCQSettings
) -> tuple[Tensor, Tensor, Tensor]:
    """(α float32 [n, q], codes int64 [n, B], rounds int64 [n]): up to `settings.iters` rounds from the
    fit (α, codes) of float32 blocks x [n, B], and the rounds each block ran.

    A round is a function of a block's (α, codes) alone, so a block whose round left both unchanged is
    at a fixed point: further rounds would return it unchanged, and it leaves the batch (the result is
    the one all `iters` rounds give). One host read a round counts those blocks; the batch is compacted
    once they are an eighth of it (the others stay in, unchanged, until then).
    """
    rounds = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    if alpha.shape[1] == 1 or settings.iters == 0:  # q = 1: the greedy fit is the least-squares one
        return alpha, codes, rounds
    out_alpha, out_codes = alpha.clone(), codes.clone()
    rows = torch.arange(x.shape[0], device=x.device)
    fit = BlockFit.start(x, alpha, codes)
    for done in range(1, settings.iters + 1):
        new = refine(fit, settings.scales)
        fixed = (new.alpha == fit.alpha).all(dim=1) & (new.codes == fit.codes).all(dim=1)
        fit, n_fixed = new, int(fixed.sum())
        if n_fixed * 8 >= rows.numel():
            stop = rows[fixed]
            out_alpha[stop], out_codes[stop], rounds[stop] = fit.alpha[fixed], fit.codes[fixed], done
            keep = torch.nonzero(~fixed).flatten()
            rows, fit = rows[keep], fit.select(keep)
            if not rows.numel():
                break
        rounds[rows] = done
    out_alpha[rows], out_codes[rows] = fit.alpha, fit.codes
    return out_alpha, out_codes, rounds


def use_triton(x: Tensor, q: int, settings: BCQSettings) -> bool:
    """Whether `fit_blocks` takes the one-kernel path (`kernels.triton_bcq`): CUDA blocks, fp16 scales,
    q = 2..4, blocks of at most 4096 values, triton installed, and the compiled kernel agreeing with the
    torch loop on a probe (`kernel_agrees`, once per process and configuration); else the torch loop."""
    if not x.is_cuda or importlib.util.find_spec("triton") is None:
        return False
    from kernels.triton_bcq import supports

    if not supports(q, settings.scales.kind, x.shape[1], x.device):
        return False
    return kernel_agrees(q, x.shape[1], settings.iters, str(x.device))


@functools.cache
def kernel_agrees(q: int, block: int, iters: int, device: str) -> bool:
    """Whether the kernel, as this Triton compiles it here, fits a fixed probe of 64 blocks exactly as the
    torch loop does (α and codes); a failed compile or a mismatch is logged and the torch loop is used.
    The interpreter test pins the kernel's arithmetic on CPU; this guards the compiled code (another Triton
    version, another GPU) at the cost of one small fit per configuration and process."""
    from kernels.triton_bcq import fit_blocks_triton

    i = torch.arange(64 * block, dtype=torch.float64, device=device)
    x = (torch.sin(i * 0.731) * torch.cos(i * 0.0173) * 0.02).to(torch.float32).view(64, block)
    settings = BCQSettings(iters=iters)
    try:
        alpha, codes, _, _ = fit_blocks_triton(x, q, iters)
    except Exception as err:  # a compile failure on this Triton or device
        log.warning("bcq kernel unavailable for q=%d block=%d (%s); using the torch loop", q, block, err)
        return False
    ref_alpha, ref_codes, _ = refine_blocks(x, *greedy_fit(x, q, settings.scales), settings)
    assert codes is not None
    if torch.equal(alpha, ref_alpha) and torch.equal(codes.long(), ref_codes):
        return True
    log.warning(
        "bcq kernel disagrees with the torch loop for q=%d block=%d here; using the torch loop", q, block
    )
    return False


def fit_blocks(x: Tensor, q: int, settings: BCQSettings) -> tuple[Tensor, Tensor]:
    """(α float32 [n, q], codes int64 [n, B]) of float32 blocks x [n, B]: greedy, then `iters` rounds."""
    if use_triton(x, q, settings):
        alpha, codes, _ = _kernel_fit(x, q, settings, decoded=False)
        assert codes is not None
        return alpha, codes.long()
    alpha, codes, _ = refine_blocks(x, *greedy_fit(x, q, settings.scales), settings)
    return alpha, codes


def fit_decode_blocks(x: Tensor, q: int, settings: BCQSettings) -> Tensor:
    """float32 [n, B]: blocks x [n, B] as their fit decodes them (`decode(*fit_blocks(...))`); on the
    one-kernel path the kernel writes them directly (no codes stored)."""
    if use_triton(x, q, settings):
        _, _, out = _kernel_fit(x, q, settings, decoded=True)
        assert out is not None
        return out
    return decode(*fit_blocks(x, q, settings))


def _kernel_fit(
    x: Tensor, q: int, settings: BCQSettings, decoded: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(α, uint8 codes or None, decoded values or None) from `kernels.triton_bcq` (codes unless `decoded`)."""
    from kernels.triton_bcq import fit_blocks_triton

    alpha, codes, out, _ = fit_blocks_triton(x, q, settings.iters, store_codes=not decoded, store_out=decoded)
    return alpha, codes, out


@dataclass(frozen=True, eq=False)
class BinaryCodes:
    """A BCQ-quantized weight: everything `bcq_dequantize` needs.

    Attributes:
        codes: int64 [numel] sign-pattern codes in row-major order (bit i set: b_i = +1).
        alpha: float32 [n_blocks, q] scales, exact in the spec's scale format (tail block last).
        shape: the weight's shape.
        torch_dtype: the weight's torch dtype (dequantize returns it).
        spec: the codes (dtype "bcq", bits = q, block_size).
    """

    codes: Tensor
    alpha: Tensor
    shape: tuple[int, ...]
    torch_dtype: torch.dtype
    spec: QuantSpec


def check_spec(spec: QuantSpec) -> None:
    """Raise ValueError unless `spec` is a bcq spec (no centering)."""
    if spec.dtype != "bcq" or spec.centering:
        raise ValueError(f"binary-coding quantization needs dtype 'bcq' without centering, got {spec}")


def blocks_of(flat: Tensor, size: int) -> list[Tensor]:
    """float32 full blocks [n // size, size] of a flat tensor, then its tail [1, n % size] if any."""
    n_full = flat.numel() // size
    x = flat.to(torch.float32)
    parts = [x[: n_full * size].view(n_full, size)] if n_full else []
    return parts + ([x[n_full * size :].view(1, -1)] if flat.numel() % size else [])


def bcq_quantize(w: Tensor, spec: QuantSpec, settings: BCQSettings) -> BinaryCodes:
    """Fit every block of `w` (row-major flattening) at once; the tail block as a second batch."""
    check_spec(spec)
    size = effective_block_size(spec.block_size, w.numel())
    fits = [fit_blocks(x, spec.bits, settings) for x in blocks_of(w.detach().reshape(-1), size)]
    codes = torch.cat([c.reshape(-1) for _, c in fits])
    return BinaryCodes(codes, torch.cat([a for a, _ in fits]), tuple(w.shape), w.dtype, spec)


def bcq_dequantize(q: BinaryCodes) -> Tensor:
    """The tensor `q` stands for, in its original shape and torch dtype."""
    size = effective_block_size(q.spec.block_size, q.codes.numel())
    n_full = q.codes.numel() // size
    out = [decode(q.alpha[:n_full], q.codes[: n_full * size].view(n_full, size)).reshape(-1)]
    if q.codes.numel() % size:
        out.append(decode(q.alpha[n_full:], q.codes[n_full * size :].view(1, -1)).reshape(-1))
    return torch.cat(out).view(q.shape).to(q.torch_dtype)


def bcq_fake_quantize(w: Tensor, spec: QuantSpec, settings: BCQSettings) -> Tensor:
    """Quantize and dequantize `w` with BCQ: same shape and torch dtype (`bcq_dequantize(bcq_quantize(
    ...))`, without materializing the codes)."""
    check_spec(spec)
    size = effective_block_size(spec.block_size, w.numel())
    blocks = blocks_of(w.detach().reshape(-1), size)
    parts = [fit_decode_blocks(x, spec.bits, settings).reshape(-1) for x in blocks]
    return torch.cat(parts).view(w.shape).to(w.dtype)


def n_blocks(numel: int, block_size: int | None) -> int:
    """Blocks (and so α vectors) of a tensor of `numel` values."""
    return math.ceil(numel / effective_block_size(block_size, numel))


class BCQColumns:
    """Binary codes as GPTQ's column quantizer (`kernels.gptq.gptq_solve`; the `shiftadd` method).

    When a block's first column comes up, its α are fitted (`fit_blocks`: greedy, then refinement) to the
    block's weights as updated by then: GPTQ's rule for block scales, and ShiftAddLLM's block scheme (α
    of a block from its current weights when its first column is reached, then each column's binary
    codes chosen given α). Each column's values then take the nearest of their block's 2^q sums, so the
    result is exactly representable by the block's α and one sign pattern a value.
    """

    def __init__(self, w: Tensor, q: int, size: int, settings: BCQSettings) -> None:
        g, rows, cols = w.shape
        self.numel, self.size, self.q, self.settings = rows * cols, size, q, settings
        blocks = n_blocks(self.numel, size)
        self.alpha = torch.zeros(g, blocks, q, device=w.device)
        self.values = torch.zeros(g, blocks, 2**q, device=w.device)
        self.mids = torch.zeros(g, blocks, 2**q - 1, device=w.device)

    def start(self, w: Tensor, blocks: Tensor) -> None:
        g = w.shape[0]
        flat = w.reshape(g, -1)
        n_full = self.numel // self.size
        full = blocks[blocks < n_full]
        if full.numel():
            idx = full[:, None] * self.size + torch.arange(self.size, device=w.device)
            alpha, _ = fit_blocks(flat[:, idx].reshape(-1, self.size), self.q, self.settings)
            self._set(full, alpha.view(g, -1, self.q))
        if self.numel % self.size and bool((blocks == n_full).any()):
            alpha, _ = fit_blocks(flat[:, n_full * self.size :].contiguous(), self.q, self.settings)
            self._set(blocks.new_tensor([n_full]), alpha.view(g, 1, self.q))

    def _set(self, blocks: Tensor, alpha: Tensor) -> None:
        g, k, q = alpha.shape
        values, _, mids = sorted_levels(alpha.reshape(-1, q))
        self.alpha[:, blocks] = alpha
        self.values[:, blocks] = values.view(g, k, -1)
        self.mids[:, blocks] = mids.view(g, k, -1)

    def pick(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        if ids.dim() == 1:
            return self.values[:, ids], self.mids[:, ids]
        return (
            torch.gather(self.values, 1, ids[:, :, None].expand(-1, -1, self.values.shape[2])),
            torch.gather(self.mids, 1, ids[:, :, None].expand(-1, -1, self.mids.shape[2])),
        )

    def quantize(self, x: Tensor, picked: tuple[Tensor, Tensor]) -> Tensor:
        values, mids = picked  # [G, rows, 2^q], [G, rows, 2^q - 1]
        return torch.gather(values, 2, torch.searchsorted(mids, x[:, :, None].contiguous()))[:, :, 0]
