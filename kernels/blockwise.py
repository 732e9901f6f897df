"""Blockwise quantization: the vectorized torch reference and the public entry points.

Numerics (identical in the torch reference and the fused Triton kernel, so their codes agree bit for
bit): the weight is flattened row-major and cut into blocks of `block_size` values (the last, tail
block may be shorter and gets its own absmax). In float32, per block:

    absmax = max |x|                       (an all-zero block uses 1 for the scale below; output 0)
    s      = 2^64 if absmax < 2^-64 else 1 (exact; keeps 1 / absmax finite for tiny blocks)
    inv    = 1 / (absmax * s)              (one IEEE round-to-nearest division per block)
    code   = #{j : mids[j] < (x * s) * inv} (nearest codebook value; exact midpoint -> the lower code)
    x_hat  = codebook[code] * absmax       (then cast to the weight's torch dtype, round-to-nearest-even)

`centering` subtracts the block mean (sum / count in float32) first and adds it back last (torch only).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.codebooks import (
    CODEBOOKS,
    QUANTILE_MAX_SAMPLE,
    Levels,
    levels_from_value_rows,
    levels_from_values,
    quantile_value_rows,
    quantile_values,
    static_levels,
)
from kernels.scaling import TINY_ABSMAX, TINY_SCALE, check_finite_absmax, effective_block_size
from kernels.spec import QuantSpec

log = logging.getLogger(__name__)

Impl = Literal["auto", "torch", "triton"]
IMPLS: tuple[str, ...] = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized weight: everything `dequantize` needs.

    Attributes:
        codes: [numel] codebook indices in row-major order; uint8 for bits <= 8, else int32.
        absmax: float32 [n_blocks]; for 16-bit weights it is one of the weights, so exactly 16 bits.
        codebook: float32 sorted codebook values.
        shape: the weight's shape.
        torch_dtype: the weight's torch dtype (dequantize returns it).
        spec: the recipe used.
        mean: float32 [n_blocks] block means when `spec.centering`, else None.
    """

    codes: Tensor
    absmax: Tensor
    codebook: Tensor
    shape: tuple[int, ...]
    torch_dtype: torch.dtype
    spec: QuantSpec
    mean: Tensor | None = None


def check_weight(w: object) -> Tensor:
    """Return `w` if it is a non-empty floating tensor, else raise ValueError naming what is allowed."""
    if not isinstance(w, Tensor):
        raise ValueError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"w has torch dtype {w.dtype}; allowed: {', '.join(map(str, FLOAT_DTYPES))}")
    if w.numel() == 0:
        raise ValueError(f"w is empty (shape {tuple(w.shape)}); quantize needs at least one value")
    return w


def normalize_rows(xb: Tensor, count: Tensor | None, centering: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Center (optionally) and scale each row of a float32 [rows, B] block matrix.

    Args:
        xb: float32 blocks; padding (if any) is zeros at the end of the last row.
        count: valid values per row (float32), needed only for centering.
        centering: subtract the row mean first.

    Returns:
        (normalized blocks, absmax [rows], mean [rows] or None). Padding stays 0.
    """
    mean = None
    if centering:
        assert count is not None
        mean = xb.sum(dim=1) / count
        valid = torch.arange(xb.shape[1], device=xb.device)[None, :] < count[:, None]
        xb = torch.where(valid, xb - mean[:, None], torch.zeros((), device=xb.device))
    absmax = xb.abs().amax(dim=1)
    # Blocks with absmax < 2^-64 are first scaled by 2^64 (exact) so 1/absmax cannot overflow to inf.
    scale = torch.where(absmax < TINY_ABSMAX, TINY_SCALE, 1.0)
    inv = torch.reciprocal(torch.where(absmax > 0, absmax, torch.ones_like(absmax)) * scale)
    return (xb * scale[:, None]) * inv[:, None], absmax, mean


def _padded_blocks(w: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """float32 [n_blocks, block] zero-padded blocks of w's row-major flattening, and valid counts."""
    n = w.numel()
    n_blocks = math.ceil(n / block)
    x = F.pad(w.detach().reshape(-1).to(torch.float32), (0, n_blocks * block - n))
    count = torch.full((n_blocks,), float(block), device=w.device)
    count[-1] = n - (n_blocks - 1) * block
    return x.view(n_blocks, block), count


def quantile_sample(w: Tensor, block_size: int | None, centering: bool = False) -> Tensor:
    """The normalized values a quantile codebook is estimated from (deterministic).

    Tensors of up to `QUANTILE_MAX_SAMPLE` (2^20) values use every value. Larger ones use evenly
    strided whole blocks (block_size=None: every s-th value, scaled by the whole tensor's absmax),
    about 2^20 values in all.
    """
    n = w.numel()
    if n <= QUANTILE_MAX_SAMPLE:
        blocks, count = _padded_blocks(w, effective_block_size(block_size, n))
        return normalize_rows(blocks, count, centering)[0].reshape(-1)[:n]
    x = w.detach().reshape(-1)
    if block_size is None or block_size >= n:
        stride = math.ceil(n / QUANTILE_MAX_SAMPLE)
        mean = torch.mean(x, dtype=torch.float32) if centering else torch.zeros((), device=x.device)
        lo, hi = torch.aminmax(x)
        absmax = torch.maximum(hi.float() - mean, mean - lo.float())
        sample = x[::stride].float() - mean
        return sample / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    n_full = n // block_size
    stride = math.ceil(n_full / max(1, QUANTILE_MAX_SAMPLE // block_size))
    rows = x[: n_full * block_size].view(n_full, block_size)[::stride].to(torch.float32)
    count = torch.full((rows.shape[0],), float(block_size), device=x.device)
    return normalize_rows(rows, count, centering)[0].reshape(-1)


def quantile_levels(ws: Sequence[Tensor], spec: QuantSpec) -> list[Levels]:
    """`levels_for(w, spec)` of each of same-shaped tensors `ws` for a quantile spec, in one batch.

    Equal bit for bit to one call per tensor (a test checks); the G samples are sorted in one call.
    """
    if not CODEBOOKS[spec.dtype].data_dependent:
        raise ValueError(f"quantile_levels needs a data-dependent dtype, got {spec.dtype!r}")
    if len({tuple(w.shape) for w in ws}) > 1:
        raise ValueError(
            f"quantile_levels needs same-shaped tensors, got {sorted({tuple(w.shape) for w in ws})}"
        )
    samples = torch.stack([quantile_sample(w, spec.block_size, spec.centering) for w in ws])
    return levels_from_value_rows(quantile_value_rows(samples, spec.bits))


def levels_for(w: Tensor, spec: QuantSpec) -> Levels:
    """The codebook levels to quantize `w` with, on w's device (cached unless data-dependent)."""
    if CODEBOOKS[spec.dtype].data_dependent:
        sample = quantile_sample(w, spec.block_size, spec.centering)
        return levels_from_values(quantile_values(sample, spec.bits))
    return static_levels(spec.dtype, spec.bits, spec.resolved_exponent_bits, w.device)


def _codes_torch(
    w: Tensor, spec: QuantSpec, levels: Levels, check_finite: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Reference codes: (codes [n_blocks, B] int32, absmax, mean or None). code = #(mids < xn), so a NaN
    (reachable with `check_finite=False`) is code 0, as the fused kernel's compares give; torch.bucketize
    alone would give it len(mids), past the codebook."""
    blocks, count = _padded_blocks(w, effective_block_size(spec.block_size, w.numel()))
    xn, absmax, mean = normalize_rows(blocks, count, spec.centering)
    if check_finite:
        check_finite_absmax(absmax)
    codes = torch.bucketize(xn, levels.mids, out_int32=True)
    return codes.masked_fill_(xn.isnan(), 0), absmax, mean


def _decode(
    codes: Tensor, absmax: Tensor, mean: Tensor | None, values: Tensor, shape: Sequence[int], torch_dtype
) -> Tensor:
    """codebook[code] * absmax (+ mean) for [n_blocks, B] codes, cropped to `shape`, cast to torch_dtype."""
    x_hat = values[codes] * absmax[:, None]  # int32 codes index directly
    if mean is not None:
        x_hat = x_hat + mean[:, None]
    return x_hat.reshape(-1)[: math.prod(shape)].view(tuple(shape)).to(torch_dtype)


def reference_fake_quantize(w: Tensor, spec: QuantSpec, levels: Levels, check_finite: bool = True) -> Tensor:
    """The torch reference `fake_quantize` with given levels (no host sync unless check_finite)."""
    codes, absmax, mean = _codes_torch(w, spec, levels, check_finite)
    return _decode(codes, absmax, mean, levels.values, w.shape, w.dtype)


@functools.lru_cache(maxsize=1)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, w: Tensor, spec: QuantSpec) -> str:
    """Pick "torch" or "triton" for this call, or raise ValueError for an impossible request."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not allowed; allowed: {', '.join(IMPLS)}")
    has_triton = _has_triton()
    if impl == "auto":
        return "triton" if (w.is_cuda and has_triton and not spec.centering) else "torch"
    if impl == "triton":
        if not has_triton:
            raise ValueError("impl='triton' needs the triton package (pip install 'kbitscale[triton]')")
        if spec.centering:
            raise ValueError("impl='triton' does not support centering=True; use impl='torch' or 'auto'")
        if not w.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"impl='triton' needs a CUDA tensor (w is on {w.device}) or TRITON_INTERPRET=1")
    return impl


def _check_keep_columns(w: Tensor, keep_columns: Sequence[int] | Tensor) -> Tensor:
    if w.dim() != 2:
        raise ValueError(f"keep_columns needs a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    cols = torch.as_tensor(keep_columns, dtype=torch.long).reshape(-1).cpu()
    n_in = w.shape[1]
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= n_in):
        raise ValueError(f"keep_columns has indices outside 0..{n_in - 1}: {cols.tolist()[:10]}")
    if torch.unique(cols).numel() != cols.numel():
        raise ValueError("keep_columns has repeated indices")
    return cols


def fake_quantize(
    w: Tensor,
    spec: QuantSpec,
    keep_columns: Sequence[int] | Tensor | None = None,
    *,
    impl: Impl = "auto",
    check_finite: bool = True,
    levels: Levels | None = None,
) -> Tensor:
    """Quantize and dequantize `w` (the hot path). Same shape and torch dtype as `w`.

    Args:
        w: a floating tensor (an nn.Linear weight is [out, in]).
        spec: the recipe.
        keep_columns: input-column indices left unquantized (2-D w only). The other columns form one
            [out, in - n] matrix that is quantized on its own (its own blocks and, for quantile, its own
            codebook); kept columns are copied unchanged.
        impl: "auto" (fused Triton kernel for CUDA tensors without centering, else torch), "torch",
            or "triton".
        check_finite: raise ValueError if w has NaN/Inf (one host sync on a tiny tensor).
        levels: `levels_for(w, spec)` computed by the caller (e.g. `quantile_levels` for a batch of
            matrices); not with keep_columns.

    Returns:
        The fake-quantized tensor.
    """
    check_weight(w)
    if levels is not None and keep_columns is not None and len(keep_columns):
        raise ValueError("levels cannot be given with keep_columns (the kept columns change the codebook)")
    if keep_columns is not None:
        cols = _check_keep_columns(w, keep_columns)
        if cols.numel():
            quantized = torch.ones(w.shape[1], dtype=torch.bool)
            quantized[cols] = False
            out = w.detach().clone()
            if cols.numel() < w.shape[1]:
                quantized = quantized.to(w.device)
                out[:, quantized] = fake_quantize(w[:, quantized], spec, impl=impl, check_finite=check_finite)
            return out
    levels = levels_for(w, spec) if levels is None else levels
    if resolve_impl(impl, w, spec) == "triton":
        from kernels.triton_fused import fused_fake_quantize

        return fused_fake_quantize(w, spec, levels, check_finite=check_finite)
    return reference_fake_quantize(w, spec, levels, check_finite)


def quantize(w: Tensor, spec: QuantSpec, *, impl: Impl = "auto") -> QuantizedTensor:
    """Quantize `w` to codes, block absmax (and means), keeping the codebook. Raises on NaN/Inf."""
    check_weight(w)
    levels = levels_for(w, spec)
    code_dtype = torch.uint8 if spec.bits <= 8 else torch.int32
    if resolve_impl(impl, w, spec) == "triton":
        from kernels.triton_fused import fused_quantize

        codes, absmax = fused_quantize(w, spec, levels)
        mean = None
    else:
        codes2d, absmax, mean = _codes_torch(w, spec, levels, check_finite=True)
        codes = codes2d.reshape(-1)[: w.numel()]
    return QuantizedTensor(
        codes=codes.to(code_dtype),
        absmax=absmax,
        codebook=levels.values.clone(),  # static levels are cached: never hand out the cached tensor
        shape=tuple(w.shape),
        torch_dtype=w.dtype,
        spec=spec,
        mean=mean,
    )


def dequantize(q: QuantizedTensor) -> Tensor:
    """The tensor `q` stands for, in its original shape and torch dtype."""
    n = q.codes.numel()
    block = effective_block_size(q.spec.block_size, n)
    n_blocks = q.absmax.numel()
    codes = F.pad(q.codes.to(torch.int32), (0, n_blocks * block - n)).view(n_blocks, block)
    return _decode(codes, q.absmax, q.mean, q.codebook, q.shape, q.torch_dtype)
