"""The fused Triton `fake_quantize` for CUDA tensors (also runs under TRITON_INTERPRET=1 on CPU).

One pass per block for block sizes up to `MAX_FUSED_BLOCK`: each program loads ROWS whole blocks,
takes their absmax, normalizes, finds the nearest code by a branchless binary search over the
codebook's sorted midpoints (read from global memory, so codebooks of up to 2^16 entries work),
dequantizes and stores. Larger blocks and block_size=None take two passes: torch computes the block
absmax (exact: a max) and its IEEE reciprocal, then the kernel quantizes with them.

The arithmetic is the torch reference's, operation for operation (see kernels/blockwise.py):
inv = 1 / (absmax * s) with IEEE round-to-nearest (`tl.div_rn`; Triton's `/` is approximate),
code = #(mids < (x * s) * inv), codebook[code] * absmax, cast with round-to-nearest-even. So the codes and
outputs equal the reference's bit for bit. Written for Triton 3.6 and 3.9.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import scaling
from kernels.codebooks import Levels
from kernels.scaling import check_finite_absmax, effective_block_size
from kernels.spec import QuantSpec

TINY_ABSMAX = tl.constexpr(scaling.TINY_ABSMAX)  # blocks with a smaller absmax are scaled by 2^64 first
TINY_SCALE = tl.constexpr(scaling.TINY_SCALE)
MAX_FUSED_BLOCK = 8192  # widest (padded) block one program holds in registers
TILE = 4096  # elements per program


@triton.jit
def _nearest_code(xn, mids_ptr, LOG2_LEVELS: tl.constexpr):
    # #(mids < xn) over 2^LOG2_LEVELS sorted midpoints padded with +inf: exactly LOG2_LEVELS probes.
    # The first two levels probe at most three fixed midpoints: scalar loads and a select, no gather.
    top = 1 << (LOG2_LEVELS - 1)
    code = tl.where(tl.load(mids_ptr + (top - 1)) < xn, top, 0)
    if LOG2_LEVELS >= 2:
        quarter = top // 2
        low = tl.load(mids_ptr + (quarter - 1))
        high = tl.load(mids_ptr + (top + quarter - 1))
        code = tl.where(tl.where(code == 0, low, high) < xn, code + quarter, code)
    for s in tl.static_range(2, LOG2_LEVELS):
        half = 1 << (LOG2_LEVELS - 1 - s)
        probe = tl.load(mids_ptr + code + (half - 1))
        code = tl.where(probe < xn, code + half, code)
    return code


@triton.jit
def _cast_out(y, out_ptr, BF16_BY_HAND: tl.constexpr):
    # float32 -> the output dtype, round-to-nearest-even (as torch's .to()). Triton's interpreter truncates
    # a float32 -> bf16 cast, so there bf16 is rounded by hand; compiled, cvt.rn.bf16.f32 does the same.
    if BF16_BY_HAND:
        bits = y.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        bits = (bits + ((bits >> 16) & 1) + 0x7FFF) >> 16
        out = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = y.to(out_ptr.dtype.element_ty)
    return out


@triton.jit
def _fused_blocks_kernel(
    x_ptr, out_ptr, codes_ptr, absmax_ptr, values_ptr, mids_ptr, n, n_blocks, block,
    ROWS: tl.constexpr, BLOCK_P2: tl.constexpr, LOG2_LEVELS: tl.constexpr,
    STORE_OUT: tl.constexpr, STORE_CODES: tl.constexpr, BF16_BY_HAND: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_P2)
    offs = rows[:, None] * block + cols[None, :]
    mask = (cols[None, :] < block) & (offs < n)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)
    absmax = tl.max(ax, axis=1)
    nonfinite = tl.max(((x != x) | (ax == float("inf"))).to(tl.int32), axis=1)
    scale = tl.where(absmax < TINY_ABSMAX, TINY_SCALE, 1.0)
    safe = tl.where(absmax > 0, absmax, 1.0) * scale
    inv = tl.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
    code = _nearest_code((x * scale[:, None]) * inv[:, None], mids_ptr, LOG2_LEVELS)
    if STORE_OUT:
        y = tl.load(values_ptr + code) * absmax[:, None]
        tl.store(out_ptr + offs, _cast_out(y, out_ptr, BF16_BY_HAND), mask=mask)
    if STORE_CODES:
        tl.store(codes_ptr + offs, code.to(codes_ptr.dtype.element_ty), mask=mask)
    tl.store(absmax_ptr + rows, tl.where(nonfinite > 0, float("nan"), absmax), mask=rows < n_blocks)


@triton.jit
def _scaled_kernel(
    x_ptr, out_ptr, codes_ptr, absmax_ptr, inv_ptr, values_ptr, mids_ptr, n, block,
    TILE: tl.constexpr, LOG2_LEVELS: tl.constexpr, STORE_OUT: tl.constexpr, STORE_CODES: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.load(absmax_ptr + offs // block, mask=mask, other=1.0)
    inv = tl.load(inv_ptr + offs // block, mask=mask, other=1.0)  # torch's IEEE 1 / (absmax * scale)
    scale = tl.where(absmax < TINY_ABSMAX, TINY_SCALE, 1.0)
    code = _nearest_code((x * scale) * inv, mids_ptr, LOG2_LEVELS)
    if STORE_OUT:
        y = tl.load(values_ptr + code) * absmax
        tl.store(out_ptr + offs, _cast_out(y, out_ptr, BF16_BY_HAND), mask=mask)
    if STORE_CODES:
        tl.store(codes_ptr + offs, code.to(codes_ptr.dtype.element_ty), mask=mask)


def block_absmax(flat: Tensor, block: int) -> Tensor:
    """float32 absmax of each block of a flat tensor (tail block included); NaN/Inf propagate."""
    n = flat.numel()
    n_full = n // block
    parts = []
    if n_full:
        lo, hi = torch.aminmax(flat[: n_full * block].view(n_full, block), dim=1)
        parts.append(torch.maximum(-lo, hi))
    if n_full * block < n:
        lo, hi = torch.aminmax(flat[n_full * block :])
        parts.append(torch.maximum(-lo, hi).reshape(1))
    return torch.cat(parts).to(torch.float32)


def _launch(
    w: Tensor, spec: QuantSpec, levels: Levels, store_out: bool, code_dtype: torch.dtype | None
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Run the kernel; returns (fake-quantized w or None, flat codes or None, float32 absmax)."""
    x = w.detach().contiguous()
    n = x.numel()
    block = effective_block_size(spec.block_size, n)
    n_blocks = math.ceil(n / block)
    log2_levels = levels.mids.numel().bit_length() - 1
    assert levels.mids.numel() == 1 << log2_levels and levels.mids.device == x.device
    out = torch.empty_like(x) if store_out else None
    codes = torch.empty(n, dtype=code_dtype, device=x.device) if code_dtype is not None else None
    dummy = x  # never written when its STORE_* flag is off
    args = (x, out if out is not None else dummy, codes if codes is not None else dummy)
    flags = {
        "LOG2_LEVELS": log2_levels,
        "STORE_OUT": store_out,
        "STORE_CODES": codes is not None,
        "BF16_BY_HAND": x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
    }
    if block <= MAX_FUSED_BLOCK and spec.block_size is not None:
        block_p2 = triton.next_power_of_2(block)
        rows = max(1, min(TILE // block_p2, triton.next_power_of_2(n_blocks)))
        absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(n_blocks, rows),)
        _fused_blocks_kernel[grid](
            *args, absmax, levels.values, levels.mids, n, n_blocks, block,
            ROWS=rows, BLOCK_P2=block_p2, num_warps=8 if rows * block_p2 >= 4096 else 4, **flags,
        )  # fmt: skip
    else:
        absmax = block_absmax(x.reshape(-1), block)
        scale = torch.where(absmax < TINY_ABSMAX.value, TINY_SCALE.value, 1.0)
        inv = torch.reciprocal(torch.where(absmax > 0, absmax, torch.ones_like(absmax)) * scale)
        grid = (triton.cdiv(n, TILE),)
        _scaled_kernel[grid](
            *args, absmax, inv, levels.values, levels.mids, n, block, TILE=TILE, num_warps=8, **flags
        )  # fmt: skip
    return out, codes, absmax


def fused_fake_quantize(w: Tensor, spec: QuantSpec, levels: Levels, check_finite: bool = True) -> Tensor:
    """Fake-quantize `w` (CUDA, or CPU under TRITON_INTERPRET=1) with the given codebook levels."""
    out, _, absmax = _launch(w, spec, levels, store_out=True, code_dtype=None)
    if check_finite:
        check_finite_absmax(absmax)
    assert out is not None
    return out.view(w.shape)


def fused_quantize(w: Tensor, spec: QuantSpec, levels: Levels) -> tuple[Tensor, Tensor]:
    """Codes (flat, uint8 for bits <= 8 else int32) and float32 block absmax of `w`."""
    code_dtype = torch.uint8 if spec.bits <= 8 else torch.int32
    _, codes, absmax = _launch(w, spec, levels, store_out=False, code_dtype=code_dtype)
    check_finite_absmax(absmax)
    assert codes is not None
    return codes, absmax
