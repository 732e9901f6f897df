"""The one error type of `analysis`: bad or insufficient input, named with what is allowed."""

from __future__ import annotations


class AnalysisError(ValueError):
    """Input that an analysis step cannot use (missing columns, too few sizes, unknown metric)."""
