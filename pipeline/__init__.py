"""kbitscale's pipeline: Hydra configs -> content-hashed jobs -> Ray workers -> Parquet results.

Imports stay light here: `load_results` needs only pandas/pyarrow, so `analysis` may use it.
"""

from pipeline.results import SCHEMA, SCHEMA_VERSION, ResultsError, load_results

__all__ = ["SCHEMA", "SCHEMA_VERSION", "ResultsError", "load_results"]
