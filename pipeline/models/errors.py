"""Errors of the model side that callers catch by type."""

from __future__ import annotations


class QuantizationError(RuntimeError):
    """Quantization produced a non-finite weight (NaN or Inf)."""
