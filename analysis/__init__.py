"""kbitscale's analysis: results Parquet -> tidy tables, bit-level scaling fits, bit-optimality,
Pareto fronts, fixed-precision comparisons, figures and a report.

Reads results only through `pipeline.results` (pandas/pyarrow); never imports torch, ray or
transformers. Functions take DataFrames and return DataFrames or matplotlib Figures; only
`analysis.report` writes files (`python -m analysis.report results/<study> [--out DIR]`).
"""

from analysis.compare import dtype_block_table, proxy_effect
from analysis.curves import curve_points, interpolate_curves
from analysis.errors import AnalysisError
from analysis.fits import FitResult, fit_law, interpolation_loo
from analysis.optimality import bit_optimality
from analysis.pareto import pareto_front
from analysis.tidy import failed_jobs, study_grid, tidy_jobs

__all__ = [
    "AnalysisError",
    "FitResult",
    "bit_optimality",
    "curve_points",
    "dtype_block_table",
    "failed_jobs",
    "fit_law",
    "interpolate_curves",
    "interpolation_loo",
    "pareto_front",
    "proxy_effect",
    "study_grid",
    "tidy_jobs",
]
