"""kbitscale's pipeline: Hydra configs -> content-hashed jobs -> Ray workers -> Parquet results.

Nothing is imported here eagerly, so `python -m pipeline.run --help` answers without loading pandas;
`load_results` and the schema constants are resolved on first use (`analysis` uses them).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SCHEMA", "SCHEMA_VERSION", "ResultsError", "load_results"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("pipeline.results"), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
