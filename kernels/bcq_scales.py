"""BCQ's scale formats: how a block's q scales α are stored.

Pow2 scales (ShiftAddLLM's additive powers of two): each α is rounded greedily to `pow2_terms` signed
powers of two (each term the power nearest the residual, or 0), stored per term as a sign bit and a
6-bit exponent code (0: no term; c = 1..63: 2^(c − 48), i.e. 2^−47..2^15): 7 bits a term, so an α costs
7·pow2_terms bits (`ScaleFormat.bits`, what `kernels.packing.weight_bits` counts; `encode_pow2` and
`decode_pow2` are that code). A float16 α costs 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCALE_FORMATS = ("fp16", "pow2")
FP16_MAX = 65504.0
POW2_EXPONENT_BITS = 6  # per term, besides its sign bit
POW2_BIAS = 48  # exponent code c in 1..63 is 2^(c - 48); c = 0: the term is zero
POW2_MIN_EXP, POW2_MAX_EXP = 1 - POW2_BIAS, 2**POW2_EXPONENT_BITS - 1 - POW2_BIAS


@dataclass(frozen=True)
class ScaleFormat:
    """How a block's scales α are stored: "fp16", or "pow2" (`pow2_terms` signed powers of two each)."""

    kind: str = "fp16"
    pow2_terms: int = 3

    def __post_init__(self) -> None:
        if self.kind not in SCALE_FORMATS:
            raise ValueError(f"bcq scales={self.kind!r} is not allowed; allowed: {list(SCALE_FORMATS)}")
        terms = self.pow2_terms
        if isinstance(terms, bool) or not isinstance(terms, int) or terms < 1:
            raise ValueError(f"bcq pow2_terms={terms!r} is not allowed; use an int >= 1")

    @property
    def bits(self) -> int:
        """Stored bits of one α."""
        return 16 if self.kind == "fp16" else self.pow2_terms * (1 + POW2_EXPONENT_BITS)

    def round(self, alpha: Tensor) -> Tensor:
        """α rounded to the format (float32, same shape)."""
        if self.kind == "fp16":
            return alpha.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)
        return decode_pow2(encode_pow2(alpha, self.pow2_terms))


def encode_pow2(alpha: Tensor, n_terms: int) -> Tensor:
    """int64 [..., n_terms] 7-bit term codes (sign << 6 | exponent code) of α rounded greedily."""
    r = alpha.to(torch.float64)
    codes = []
    for _ in range(n_terms):
        mantissa, exponent = torch.frexp(r.abs())  # |r| = m·2^e, m in [0.5, 1)
        e = (exponent - 1 + (mantissa >= 0.75).to(exponent.dtype)).clamp(POW2_MIN_EXP, POW2_MAX_EXP)
        zero = r.abs() < 2.0 ** (POW2_MIN_EXP - 1)  # nearer 0 than the smallest term
        negative = (r < 0) & ~zero
        term = torch.where(zero, 0.0, torch.ldexp(torch.where(negative, -1.0, 1.0).to(r), e))
        r = r - term
        code = torch.where(zero, 0, (e.to(torch.int64) + POW2_BIAS) | (negative.to(torch.int64) << 6))
        codes.append(code)
    return torch.stack(codes, dim=-1)


def decode_pow2(codes: Tensor) -> Tensor:
    """float32 [...]: the sums of the terms `encode_pow2` wrote ([..., n_terms])."""
    exponent = (codes & 63) - POW2_BIAS
    sign = 1.0 - 2.0 * ((codes >> 6) & 1).to(torch.float64)
    terms = torch.where((codes & 63) == 0, 0.0, torch.ldexp(sign, exponent))
    return terms.sum(dim=-1).to(torch.float32)
