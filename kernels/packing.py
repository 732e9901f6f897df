"""Dense code storage and exact bit accounting.

`pack` writes codes of any width 1..16 back to back into bytes (code i occupies stream bits
[i*bits, (i+1)*bits), least significant bit first; the last byte is zero-padded). `pack_planes` writes
them as bit planes instead (plane i holds bit i of every code, each plane padded to a whole byte): a
binary code's q sign matrices, as shift-add kernels read them. `weight_bits` counts what a quantized
weight costs when stored that way:

    codes (bits each) + one 16-bit absmax per block (tail block included)
    + one 16-bit mean per block with centering + 2^bits 16-bit values for a quantile codebook
    + 16 bits per value of a kept (unquantized) input column.

A bcq weight (`kernels.bcq`) has no absmax or codebook: q sign bits per value plus q scales per block
of `scale_bits` each (16: float16; pow2 scales: `kernels.bcq_scales.ScaleFormat.bits`).

The kept columns' index list is not counted (the paper's convention; <= 32 bits per kept column).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kernels.codebooks import DATA_TYPES
from kernels.spec import QuantSpec

CONSTANT_BITS = 16  # absmax, block mean and codebook values are stored in 16 bits


def _check_width(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits={bits!r} is not allowed for pack/unpack; allowed: an int in 1..16")
    return bits


def _flat_codes(codes: Tensor, bits: int) -> Tensor:
    """`codes` flattened to int64 after checking they are integers in [0, 2^bits)."""
    _check_width(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dtype.is_complex:
        raise ValueError(f"codes must be an integer tensor, got torch dtype {codes.dtype}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(
            f"codes must lie in 0..{2**bits - 1} for bits={bits}; got {int(flat.min())}..{int(flat.max())}"
        )
    return flat


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in [0, 2^bits) densely into ceil(numel * bits / 8) uint8 bytes (row-major)."""
    flat = _flat_codes(codes, bits)
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    weights = (1 << torch.arange(8, device=flat.device)).to(torch.uint8)
    return (stream.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack`: the first `numel` codes (int32) from dense uint8 bytes."""
    _check_width(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got torch dtype {packed.dtype}")
    if numel < 0 or numel * bits > packed.numel() * 8:
        raise ValueError(
            f"numel={numel} codes of {bits} bits need {math.ceil(numel * bits / 8)} bytes, "
            f"packed has {packed.numel()}"
        )
    shifts = torch.arange(8, device=packed.device)
    stream = ((packed.reshape(-1).to(torch.int32)[:, None] >> shifts) & 1).reshape(-1)[: numel * bits]
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream.view(numel, bits) * weights).sum(dim=1, dtype=torch.int32)


def pack_planes(codes: Tensor, bits: int) -> Tensor:
    """Codes in [0, 2^bits) as `bits` bit planes: uint8 [bits, ceil(numel / 8)]; plane i holds bit i of
    every code (row-major, least significant bit first in a byte, each plane's last byte zero-padded)."""
    flat = _flat_codes(codes, bits)
    planes = (flat[None, :] >> torch.arange(bits, device=flat.device)[:, None]) & 1  # [bits, numel]
    planes = torch.nn.functional.pad(planes, (0, -flat.numel() % 8)).view(bits, -1, 8)
    weights = 1 << torch.arange(8, device=flat.device)
    return (planes * weights).sum(dim=2).to(torch.uint8)


def unpack_planes(planes: Tensor, numel: int) -> Tensor:
    """Inverse of `pack_planes`: the first `numel` codes (int32) from uint8 planes [bits, n_bytes]."""
    if planes.dtype != torch.uint8 or planes.dim() != 2:
        raise ValueError(f"planes must be uint8 [bits, n_bytes], got {planes.dtype} {tuple(planes.shape)}")
    bits = _check_width(planes.shape[0])
    if not 0 <= numel <= planes.shape[1] * 8:
        need = math.ceil(numel / 8)
        raise ValueError(f"numel={numel} codes need {need} bytes a plane; planes have {planes.shape[1]}")
    shifts = torch.arange(8, device=planes.device, dtype=torch.int32)
    stream = ((planes.to(torch.int32)[:, :, None] >> shifts) & 1).reshape(bits, -1)[:, :numel]
    weights = 1 << torch.arange(bits, device=planes.device, dtype=torch.int32)
    return (stream * weights[:, None]).sum(dim=0, dtype=torch.int32)


def _check_shape(shape: Sequence[int], n_keep_columns: int) -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    if any(d <= 0 for d in dims):
        raise ValueError(f"shape={dims} must have positive sizes")
    if n_keep_columns:
        if len(dims) != 2:
            raise ValueError(f"n_keep_columns needs a 2-D [out, in] shape, got {dims}")
        if not 0 <= n_keep_columns <= dims[1]:
            raise ValueError(f"n_keep_columns={n_keep_columns} is outside 0..{dims[1]} (the input columns)")
    elif n_keep_columns < 0:
        raise ValueError(f"n_keep_columns={n_keep_columns} must be >= 0")
    return dims


def weight_bits(
    spec: QuantSpec, shape: Sequence[int], n_keep_columns: int = 0, *, scale_bits: int = CONSTANT_BITS
) -> int:
    """Exact storage bits of one weight quantized with `spec` (see the module docstring).

    `scale_bits`: bits of one bcq scale (bcq only: 16 for float16 scales; a codebook data type's
    absmax is always 16 bits).
    """
    dims = _check_shape(shape, n_keep_columns)
    n_kept = dims[0] * n_keep_columns if n_keep_columns else 0
    n_quantized = math.prod(dims) - n_kept
    if n_quantized == 0:
        return CONSTANT_BITS * n_kept
    kind = DATA_TYPES[spec.dtype]
    if scale_bits != CONSTANT_BITS and kind.blockwise:
        raise ValueError(f"scale_bits={scale_bits} is for bcq scales; {spec.dtype!r} stores a 16-bit absmax")
    n_blocks = 1 if spec.block_size is None else math.ceil(n_quantized / spec.block_size)
    if not kind.blockwise:  # bcq: q sign bits per value, q scales per block
        return n_quantized * spec.bits + n_blocks * spec.bits * scale_bits + CONSTANT_BITS * n_kept
    constants = n_blocks * CONSTANT_BITS * (2 if spec.centering else 1)
    codebook_bits = CONSTANT_BITS * 2**spec.bits if kind.data_dependent else 0
    return n_quantized * spec.bits + constants + codebook_bits + CONSTANT_BITS * n_kept


def bits_per_param(
    spec: QuantSpec, shape: Sequence[int], n_keep_columns: int = 0, *, scale_bits: int = CONSTANT_BITS
) -> float:
    """Exact storage bits per parameter: `weight_bits / numel` (e.g. 4-bit, block 64: 4.25)."""
    bits = weight_bits(spec, shape, n_keep_columns, scale_bits=scale_bits)
    return bits / math.prod(int(d) for d in shape)
