"""Synthetic studies shared by the analysis tests (written once per module as real Parquet)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.tidy import tidy_jobs
from pipeline.results import load_results
from tests.analysis.synthetic import Law, grid, write_study

SIZES = (1_000_000, 4_000_000, 16_000_000, 64_000_000)


@pytest.fixture(scope="module")
def law() -> Law:
    return Law()


@pytest.fixture(scope="module")
def law_study(tmp_path_factory: pytest.TempPathFactory, law: Law) -> Path:
    """One family, fp B64, bits 3..8 and the 16-bit baseline, 4 sizes, small noise."""
    study = tmp_path_factory.mktemp("law") / "law"
    write_study(study, grid(sizes=SIZES), law=law, noise=0.002, seed=1)
    return study


@pytest.fixture(scope="module")
def law_tidy(law_study: Path) -> pd.DataFrame:
    return tidy_jobs(load_results(law_study))
