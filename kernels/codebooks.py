"""The data types: `DATA_TYPES` (every `QuantSpec.dtype`) and `CODEBOOKS` (those with a codebook).

A codebook data type (int, fp, nf, quantile, dynamic) is a sorted codebook in [-1, 1] scaled by a block
absmax: what `fake_quantize` and GPTQ take. `bcq` (binary-coding quantization, `kernels.bcq`) is a data
type without one: a block is a sum of q signed 16-bit scales, quantized by its own methods (bcq,
shiftadd). Every data type declares the bit widths it supports (`DataType.bits`); `check_bits`
refuses the others, naming the allowed ones. Only int, nf and quantile define 2 bits (int: ternary
{-1, 0, +1}; nf and quantile: 4 levels); bcq takes 1..4 (2^q sign patterns are searched per weight).

A codebook is the set of values a normalized weight (weight / block absmax) may take; a code is an
index into it. Data-independent codebooks (int, fp, nf, dynamic) are built once per
(dtype, bits, exponent_bits) and cached; `quantile` is built from the tensor being quantized
(see `quantile_codebook`).

The nearest-code rule shared by the torch reference and the Triton kernel: with `mids` the
float32-rounded midpoints of adjacent codebook values, a normalized value `x` gets code
`#{j : mids[j] < x}`. A value exactly on a midpoint therefore maps to the lower code (toward -inf).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.registry import Registry

MIN_BITS, MAX_BITS = 3, 16  # the widths every codebook data type supports (the paper's sweeps: 3..8)
LOW_BITS = 2  # int (ternary), nf and quantile (4 levels) also define 2 bits
BCQ_BITS = (1, 2, 3, 4)  # bit planes of a binary code
MAX_EXPONENT_BITS = 6  # E >= 7 puts normalized codes below float32's normal range (the arithmetic is float32)
QUANTILE_MAX_SAMPLE = 1 << 20  # values used to estimate a quantile codebook (whole blocks, evenly strided)


@dataclass(frozen=True)
class DataType:
    """One quantization data type.

    Attributes:
        name: registry key, e.g. "nf".
        build: (bits, exponent_bits) -> float64 values, sorted, max |value| == 1; None when the
            codebook depends on the tensor (quantile).
        description: one line for docs and errors.
        bits: the bit widths it supports.
        blockwise: whether it is a codebook scaled by a block absmax (in `CODEBOOKS`, taken by
            `fake_quantize` and GPTQ); False for bcq, whose methods quantize it their own way.
    """

    name: str
    build: Callable[[int, int | None], Tensor] | None
    description: str
    bits: tuple[int, ...] = tuple(range(MIN_BITS, MAX_BITS + 1))
    blockwise: bool = True  # a codebook scaled by a block absmax; False: a format of its own (bcq)

    @property
    def data_dependent(self) -> bool:
        """The codebook is estimated from the tensor (stored with it): quantile."""
        return self.blockwise and self.build is None


@dataclass(frozen=True, eq=False)
class Levels:
    """A codebook ready for nearest-code search.

    Attributes:
        values: float32 [n], sorted ascending, in [-1, 1].
        mids: float32 [2**bits]: (values[j] + values[j+1]) / 2 rounded once to float32, then padded
            with +inf to a power of two so a branchless binary search needs exactly `bits` probes.
    """

    values: Tensor
    mids: Tensor


def default_exponent_bits(bits: int) -> int:
    """The paper's rule "exponent bits >= half the bits" (2,2,3,3,4,4 for 3..8), capped at 5.

    The cap makes 9..16-bit floats E5 (16 bits: IEEE half's E5M10 layout without inf/NaN).
    """
    return min((bits + 1) // 2, 5)


def max_exponent_bits(bits: int) -> int:
    """Largest exponent width allowed at `bits`: at least 0 mantissa bits and E <= 6."""
    return min(bits - 1, MAX_EXPONENT_BITS)


def _normalized(values: Tensor) -> Tensor:
    values = torch.unique(values.to(torch.float64))  # sorted, merges +0/-0
    return values / values.abs().max() + 0.0  # + 0.0 turns a -0.0 into +0.0


def _int_values(bits: int, exponent_bits: int | None) -> Tensor:
    m = 2 ** (bits - 1) - 1
    return torch.arange(-m, m + 1, dtype=torch.float64) / m


def _fp_values(bits: int, exponent_bits: int | None) -> Tensor:
    e_bits = default_exponent_bits(bits) if exponent_bits is None else exponent_bits
    m_bits = bits - 1 - e_bits
    bias = 2 ** (e_bits - 1)
    frac = torch.arange(2**m_bits, dtype=torch.float64) / 2**m_bits
    subnormal = frac * 2.0 ** (1 - bias)
    exps = torch.arange(1, 2**e_bits, dtype=torch.float64)
    normal = ((1 + frac)[None, :] * torch.pow(2.0, exps - bias)[:, None]).reshape(-1)
    positive = torch.cat([subnormal, normal])
    return _normalized(torch.cat([-positive, positive]))


def _nf_values(bits: int, exponent_bits: int | None) -> Tensor:
    # QLoRA's construction generalized: 2^(k-1) positive and 2^(k-1)-1 negative normal quantiles plus 0.
    # The offset is the midpoint of 1-1/(2(n-1)) and 1-1/(2n), rounded to 7 digits as QLoRA's 0.9677083
    # is; float32 linspace and float32 normalization reproduce the published NF4 table bit for bit.
    n = 2**bits
    offset = round(0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))), 7)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2)[:-1].double())
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).float().sort().values
    return (values / values.max()).double()


def _dynamic_values(bits: int, exponent_bits: int | None) -> Tensor:
    # Sign bit; z leading zeros give the base-10 exponent 10^-z; a 1 bit ends them (indicator); the
    # remaining F = bits-2-z bits select one of 2^F linear bins of [0.1, 1] (its midpoint), as in
    # bitsandbytes' dynamic map. All-zero magnitude is 0; the spare "-0" pattern encodes +1.0.
    magnitudes = []
    for z in range(bits - 1):
        f_bits = bits - 2 - z
        edges = torch.linspace(0.1, 1.0, 2**f_bits + 1, dtype=torch.float64)
        magnitudes.append(10.0 ** (-z) * (edges[:-1] + edges[1:]) / 2)
    mag = torch.cat(magnitudes)
    values = torch.cat([-mag, mag, torch.tensor([0.0, 1.0], dtype=torch.float64)])
    return torch.sort(values).values


WITH_LOW_BITS = tuple(range(LOW_BITS, MAX_BITS + 1))
DATA_TYPES: Registry[DataType] = Registry("quantization data type")
CODEBOOKS: Registry[DataType] = Registry("codebook data type")
for _kind in (
    DataType("int", _int_values, "symmetric integer, 2^k-1 levels (2 bits: ternary)", WITH_LOW_BITS),
    DataType("fp", _fp_values, "sign, E exponent, k-1-E mantissa bits, subnormals"),
    DataType("nf", _nf_values, "normal float: standard-normal quantiles plus 0", WITH_LOW_BITS),
    DataType("quantile", None, "the tensor's empirical quantiles plus 0", WITH_LOW_BITS),
    DataType("dynamic", _dynamic_values, "dynamic base-10 exponent"),
    DataType("bcq", None, "binary coding: q signed 16-bit scales per block", BCQ_BITS, blockwise=False),
):
    DATA_TYPES.register(_kind.name, _kind)
    if _kind.blockwise:
        CODEBOOKS.register(_kind.name, _kind)


def bit_ranges(values: tuple[int, ...]) -> str:
    """(2, 3, 4, 5, 8) -> "2..5, 8": allowed bit widths as they are named in errors."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def check_bits(bits: object, dtype: str | None = None) -> int:
    """Return `bits` if `dtype` supports it (None: the range every codebook type supports, 3..16).

    Raises:
        KeyError: unknown dtype.
        ValueError: naming the bad value and the data type's allowed widths.
    """
    allowed = tuple(range(MIN_BITS, MAX_BITS + 1)) if dtype is None else DATA_TYPES[dtype].bits
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        of = "" if dtype is None else f" for dtype {dtype!r}"
        raise ValueError(f"bits={bits!r} is not allowed{of}; bits must be an int in {bit_ranges(allowed)}")
    return bits


def check_exponent_bits(dtype: str, bits: int, exponent_bits: object) -> int | None:
    """Validate `exponent_bits` for (dtype, bits); only "fp" takes one."""
    if exponent_bits is None:
        return None
    if dtype != "fp":
        raise ValueError(f"exponent_bits={exponent_bits!r} is only allowed for dtype 'fp', not {dtype!r}")
    hi = max_exponent_bits(bits)
    if isinstance(exponent_bits, bool) or not isinstance(exponent_bits, int) or not 1 <= exponent_bits <= hi:
        raise ValueError(
            f"exponent_bits={exponent_bits!r} is impossible for a {bits}-bit float; allowed: 1..{hi} "
            f"(at least 0 mantissa bits, and E <= {MAX_EXPONENT_BITS} so codes stay in float32's "
            "normal range)"
        )
    return exponent_bits


def levels_from_values(values: Tensor) -> Levels:
    """Levels (float32 values and padded midpoints) from sorted values, on the values' device."""
    return levels_from_value_rows(values.reshape(1, -1))[0]


def levels_from_value_rows(values: Tensor) -> list[Levels]:
    """`levels_from_values` of each row of `values` [G, L] (sorted rows), computed at once."""
    values32 = values.to(torch.float32)
    n = values32.shape[1]
    size = 1 << max(1, (n - 1).bit_length())  # power of two >= n
    pair = values32.to(torch.float64)
    mids = ((pair[:, :-1] + pair[:, 1:]) / 2).to(torch.float32)
    pad = torch.full(
        (mids.shape[0], size - mids.shape[1]), float("inf"), dtype=torch.float32, device=values.device
    )
    mids = torch.cat([mids, pad], dim=1)
    return [Levels(values=v.contiguous(), mids=m.contiguous()) for v, m in zip(values32, mids, strict=True)]


@functools.lru_cache(maxsize=256)
def static_levels(dtype: str, bits: int, exponent_bits: int | None, device: torch.device) -> Levels:
    """Cached levels of a data-independent codebook on `device` (cheap to call per weight).

    Callers must not modify the returned tensors.
    """
    if device.type != "cpu":
        cpu = static_levels(dtype, bits, exponent_bits, torch.device("cpu"))
        return Levels(values=cpu.values.to(device), mids=cpu.mids.to(device))
    kind = CODEBOOKS[dtype]
    check_bits(bits, dtype)
    check_exponent_bits(dtype, bits, exponent_bits)
    if kind.build is None:
        raise ValueError(
            f"dtype {dtype!r} is data-dependent: its codebook is built from a tensor "
            "(pass the tensor: codebook('quantile', bits, w=w), or call fake_quantize)"
        )
    return levels_from_values(kind.build(bits, exponent_bits))


def quantile_values(normalized_sample: Tensor, bits: int) -> Tensor:
    """The quantile codebook from a sample of block-normalized values (float32, sorted, max |v| == 1).

    With n = 2^k - 1 equal-mass bins of the empirical CDF Q, code i is the midpoint of Q at its bin's
    edges, q_i = (Q(i / n) + Q((i+1) / n)) / 2 (the paper's midpoint formula, with the denominator set
    so the n codes plus an exact 0 fill the 2^k slots); then all are divided by max |q|. Q interpolates
    linearly between order statistics (float64). Codes repeat if the sample has fewer distinct values
    than codes (harmless: of equal values the lowest index is always chosen).
    Runs on the sample's device without a host sync.
    """
    return quantile_value_rows(normalized_sample.reshape(1, -1), bits)[0]


def quantile_value_rows(samples: Tensor, bits: int) -> Tensor:
    """`quantile_values` of each row of `samples` [G, S] at once: [G, 2^bits], equal bit for bit to G calls.

    One batched sort and one set of elementwise kernels for G codebooks (a model's same-shaped
    matrices), instead of ~30 small kernels per matrix.
    """
    s = torch.sort(samples.to(torch.float64), dim=-1).values
    n_codes = 2**bits - 1
    probs = torch.arange(n_codes + 1, dtype=torch.float64, device=s.device) / n_codes
    pos = probs * (s.shape[-1] - 1)
    lo = pos.floor().long()
    hi = torch.clamp(lo + 1, max=s.shape[-1] - 1)
    frac = pos - lo.to(torch.float64)
    edges = s[:, lo] + (s[:, hi] - s[:, lo]) * frac
    q = (edges[:, :-1] + edges[:, 1:]) / 2
    q = torch.cat([q, torch.zeros(q.shape[0], 1, dtype=torch.float64, device=s.device)], dim=1)
    scale = q.abs().amax(dim=1, keepdim=True)
    q = q / torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.sort(q.to(torch.float32), dim=-1).values


def codebook(
    dtype: str,
    bits: int,
    exponent_bits: int | None = None,
    w: Tensor | None = None,
    block_size: int | None = None,
) -> Tensor:
    """The sorted float32 codebook of a data type, values in [-1, 1].

    Args:
        dtype: a key of `CODEBOOKS` ("int", "fp", "nf", "quantile", "dynamic").
        bits: the data type's widths (`DataType.bits`).
        exponent_bits: "fp" only; None is `default_exponent_bits(bits)`.
        w: the weight tensor; required for "quantile", ignored otherwise.
        block_size: "quantile" only: the blocks whose normalized values the codebook is estimated
            from (None: one absmax for the whole tensor), as `fake_quantize` does.

    Returns:
        A new float32 tensor (CPU; quantile: on w's device).
    """
    kind = CODEBOOKS[dtype]  # bcq has no codebook: an unknown name here
    check_bits(bits, dtype)
    check_exponent_bits(dtype, bits, exponent_bits)
    if kind.data_dependent:
        if w is None:
            raise ValueError(f"dtype {dtype!r} needs the tensor to build its codebook: pass w=<tensor>")
        from kernels.blockwise import quantile_sample  # blockwise imports this module

        return quantile_values(quantile_sample(w, block_size), bits)
    return static_levels(dtype, bits, exponent_bits, torch.device("cpu")).values.clone()
