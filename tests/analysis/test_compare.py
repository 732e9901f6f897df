from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.compare import default_fixed_bits, dtype_block_table, proxy_effect, proxy_summary
from analysis.errors import AnalysisError
from analysis.tidy import tidy_jobs
from pipeline.results import load_results
from tests.analysis.synthetic import Config, grid, write_study


@pytest.fixture(scope="module")
def settings_tidy(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Two data types x two block sizes x proxy on/off; int is worse, proxy helps at 3 bits only."""
    study = tmp_path_factory.mktemp("settings")
    configs = grid(sizes=(1_000_000, 4_000_000), bits=(3, 4), dtypes=("fp", "int"), block_sizes=(64, None),
                   outlier_fractions=(0.0, 0.02))  # fmt: skip

    def offset(cfg: Config) -> float:
        proxy = 0.0 if cfg.outlier_fraction == 0 else 0.03 if cfg.bits == 3 else -0.01
        return (-0.05 if cfg.dtype == "int" else 0.0) + (-0.02 if cfg.block_size is None else 0.0) + proxy

    write_study(study, configs, offset=offset)
    return tidy_jobs(load_results(study))


def test_dtype_block_table_ranks_known_order(settings_tidy: pd.DataFrame) -> None:
    assert default_fixed_bits(settings_tidy) == 4
    table = dtype_block_table(settings_tidy, "mean_acc", 4)
    order = list(zip(table["dtype"], table["block_size"], strict=True))
    assert order == [("fp", 64), ("fp", "per-tensor"), ("int", 64), ("int", "per-tensor")]
    assert table["rank"].tolist() == [1, 2, 3, 4]
    assert list(table.columns[3:5]) == ["toy-1000000", "toy-4000000"]
    loss = dtype_block_table(settings_tidy, "ce_wikitext2", 4)  # lower is better: same loss, ties
    assert (loss["rank"] >= 1).all()
    with pytest.raises(AnalysisError, match="no quantized 5-bit job"):
        dtype_block_table(settings_tidy, "mean_acc", 5)


def test_proxy_effect_pairs_and_signs(settings_tidy: pd.DataFrame) -> None:
    pairs = proxy_effect(settings_tidy, "mean_acc")
    assert len(pairs) == 2 * 2 * 2 * 2  # bits x sizes x dtypes x block sizes
    assert (pairs.loc[pairs["bits"] == 3, "gain"] > 0).all()
    summary = proxy_summary(pairs).set_index("bits")
    assert summary.loc[3, "share_helped"] == 1.0
    assert summary.loc[3, "mean_gain"] > summary.loc[4, "mean_gain"]
    assert (pairs["extra_bits_per_param"] > 0).all()


def test_proxy_effect_without_proxy_jobs_is_a_clear_error(law_tidy: pd.DataFrame) -> None:
    with pytest.raises(AnalysisError, match="outlier_fraction > 0"):
        proxy_effect(law_tidy, "mean_acc")


def test_only_baseline_has_nothing_to_compare(law_tidy: pd.DataFrame) -> None:
    with pytest.raises(AnalysisError, match="only the 16-bit baseline"):
        default_fixed_bits(law_tidy[law_tidy["bits"] == 16])


def test_settings_labels(settings_tidy: pd.DataFrame, tmp_path: Path) -> None:
    labels = set(settings_tidy["setting"])
    assert {"fp e2 B64", "fp e2 per-tensor proxy 2%", "int B64", "16-bit"} <= labels
