"""`QuantSpec`: what to quantize a weight to, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

from kernels.codebooks import DATA_TYPES, check_bits, check_exponent_bits, default_exponent_bits


@dataclass(frozen=True)
class QuantSpec:
    """One quantization recipe: data type, bits, block size.

    Attributes:
        dtype: a key of `DATA_TYPES`: "int", "fp", "nf", "quantile", "dynamic" (`CODEBOOKS`), "bcq".
        bits: bits per code, the data type's widths (`DataType.bits`: 3..16; int, nf, quantile from 2;
            bcq 1..4 bit planes).
        block_size: values per absmax block over the row-major flattening of the weight
            (nn.Linear's [out, in]); None: one absmax for the whole tensor.
        exponent_bits: "fp" only; None is the paper's default (`default_exponent_bits`).
        centering: subtract each block's mean before quantizing and add it back after
            (one more 16-bit constant per block).

    Raises:
        KeyError: unknown dtype (with close matches).
        ValueError: bits the data type does not support, impossible exponent_bits, block_size <= 0,
            non-bool centering.
    """

    dtype: str
    bits: int
    block_size: int | None
    exponent_bits: int | None = None
    centering: bool = False

    def __post_init__(self) -> None:
        DATA_TYPES[self.dtype]
        check_bits(self.bits, self.dtype)
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0
        ):
            raise ValueError(
                f"block_size={self.block_size!r} is not allowed; use a positive int or None (one per tensor)"
            )
        check_exponent_bits(self.dtype, self.bits, self.exponent_bits)
        if not isinstance(self.centering, bool):
            raise ValueError(f"centering={self.centering!r} is not allowed; use True or False")

    @property
    def resolved_exponent_bits(self) -> int | None:
        """Exponent bits actually used ("fp" only; None for other data types)."""
        if self.dtype != "fp":
            return None
        return default_exponent_bits(self.bits) if self.exponent_bits is None else self.exponent_bits

    @property
    def name(self) -> str:
        """A short label, e.g. "fp4-e2-b64" or "int8-tensor"."""
        e = f"-e{self.resolved_exponent_bits}" if self.dtype == "fp" else ""
        b = "tensor" if self.block_size is None else f"b{self.block_size}"
        c = "-centered" if self.centering else ""
        return f"{self.dtype}{self.bits}{e}-{b}{c}"
