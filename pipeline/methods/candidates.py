"""Candidate recipes of a mixed-precision allocation (`quant.candidates`), and their checks (no torch).

A candidate is a code's label as `kernels.QuantSpec.name` writes it ("nf3-b64", "int8-b64",
"fp4-e2-b1024", "int4-tensor", "int4-b64-centered") or "16-bit" (the layer left unquantized). Every
candidate shares the recipe's method, parameters, outlier fraction, scope and calibration; only the
codes differ. `check_allocation` is what `Recipe` runs at construction, so a bad value is named in
pre-flight, before anything loads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

UNIFORM = "uniform"
ALLOCATIONS = ("uniform", "knapsack", "shiftadd", "search")
BASELINE_CANDIDATE = "16-bit"
_BASELINE_SPELLINGS = ("16-bit", "16", "bf16", "fp16")
_LABEL = re.compile(
    r"^(?P<dtype>[a-z]+?)(?P<bits>\d+)(?:-e(?P<exponent>\d+))?-(?:b(?P<block>\d+)|tensor)(?P<centered>-centered)?$"
)


def candidate_codes(label: str) -> dict[str, Any] | None:
    """The `Recipe` code fields of a candidate label; None for the 16-bit candidate.

    Raises:
        ValueError: a label of another form, or codes `QuantSpec` refuses (e.g. bits a dtype lacks).
        KeyError: an unknown data type (with close matches).
    """
    if label in _BASELINE_SPELLINGS:
        return None
    found = _LABEL.match(label)
    if found is None:
        raise ValueError(
            f"quant.candidates: {label!r} is not a candidate; write one like 'nf3-b64', 'int8-tensor', "
            "'fp4-e2-b64', 'int4-b64-centered' or '16-bit'"
        )
    exponent, block = found["exponent"], found["block"]
    codes = {
        "dtype": found["dtype"],
        "bits": int(found["bits"]),
        "block_size": None if block is None else int(block),
        "exponent_bits": None if exponent is None else int(exponent),
        "centering": found["centered"] is not None,
    }
    _spec(codes)  # validates
    from kernels import CODEBOOKS

    if codes["dtype"] not in CODEBOOKS:
        raise ValueError(
            f"quant.candidates: {label!r}: a candidate needs a codebook data type ({', '.join(CODEBOOKS)}); "
            "bcq codes are not allocated per layer yet"
        )
    return codes


def canonical_label(label: str) -> str:
    """The candidate as `QuantSpec.name` spells it ("fp4-b64" -> "fp4-e2-b64"; "16" -> "16-bit")."""
    codes = candidate_codes(label)
    return BASELINE_CANDIDATE if codes is None else _spec(codes).name


def nominal_bits(label: str) -> float:
    """Bits per parameter of a candidate on a matrix of whole blocks (k + 16/B, x2 centered), without a
    data-dependent codebook's table: what a target is checked against before shapes are known."""
    codes = candidate_codes(label)
    if codes is None:
        return 16.0
    from kernels.packing import CONSTANT_BITS

    block = codes["block_size"]
    per_block = CONSTANT_BITS * (2 if codes["centering"] else 1)
    return codes["bits"] + (0.0 if block is None else per_block / block)


def check_allocation(
    allocation: str, target_bits: float | None, candidates: Sequence[str]
) -> tuple[str, ...]:
    """The candidates, canonical, deduplicated and cheapest first; raises on any bad value.

    Raises:
        ValueError, KeyError: an unknown allocation or candidate, an empty candidate list, a missing
            target or one outside the candidates' bits.
    """
    if allocation not in ALLOCATIONS:
        from kernels.registry import unknown_name

        raise unknown_name("quant.allocation", allocation, ALLOCATIONS)
    if allocation == UNIFORM:  # the recipe drops target and candidates (a sweep sets them for every grid)
        return ()
    if not candidates:
        raise ValueError(
            f"quant.allocation={allocation} needs quant.candidates, e.g. [nf3-b64,nf4-b64,int8-b64]"
        )
    labels = sorted(dict.fromkeys(canonical_label(c) for c in candidates), key=lambda c: (nominal_bits(c), c))
    if all(label == BASELINE_CANDIDATE for label in labels):
        raise ValueError("quant.candidates: give at least one quantized candidate beside 16-bit")
    if target_bits is None:
        raise ValueError(
            f"quant.allocation={allocation} needs quant.target_bits (bits per quantized parameter)"
        )
    low, high = nominal_bits(labels[0]), nominal_bits(labels[-1])
    if not low <= target_bits <= high:
        raise ValueError(
            f"quant.target_bits={target_bits:g} is outside the candidates' bits per parameter "
            f"{low:g} ({labels[0]}) .. {high:g} ({labels[-1]})"
        )
    return tuple(labels)


def _spec(codes: dict[str, Any]) -> Any:
    from kernels import QuantSpec

    return QuantSpec(**codes)
