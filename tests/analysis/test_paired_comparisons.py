"""Method, data-type and proxy comparisons get paired CIs from per-unit data, and none without it."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from analysis.compare import dtype_block_table, proxy_effect, proxy_summary
from analysis.methods import method_pairs, method_summary
from analysis.render import render_markdown
from analysis.report import build_sections, study_from_results
from analysis.tidy import PAPER_TASKS, tidy_jobs
from analysis.units import JobDraws, job_draws
from tests.analysis.synthetic import Config, Units, grid, study_frame

SIZES = (1_000_000, 4_000_000, 16_000_000)
UNITS = Units(shared_sd=0.5, job_sd=0.01)


def offset(cfg: Config) -> float:
    """toy beats rtn by 0.02; int trails fp and nf by 0.05; proxy helps by 0.03 at 3 bits only."""
    proxy = 0.03 if cfg.outlier_fraction > 0 and cfg.bits == 3 else 0.0
    return 0.02 * (cfg.method == "toy") - 0.05 * (cfg.dtype == "int") + proxy


def configs() -> list[Config]:
    base = grid(sizes=SIZES, bits=(3, 4), dtypes=("fp", "nf", "int"), outlier_fractions=(0.0, 0.02))
    toy = [replace(c, method="toy") for c in base if c.bits < 16 and c.outlier_fraction == 0]
    return base + toy


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    return study_frame(configs(), offset=offset, units=UNITS, seed=6)


@pytest.fixture(scope="module")
def draws(raw: pd.DataFrame) -> JobDraws:
    found = job_draws(raw, "ce_wikitext2", PAPER_TASKS, n_boot=400)
    assert found is not None
    return found


def test_method_gains_are_decisive_when_paired(raw: pd.DataFrame, draws: JobDraws) -> None:
    tidy = tidy_jobs(raw)
    pairs = method_pairs(tidy, "ce_wikitext2", draws=draws)
    assert pairs["gain"].to_numpy() == pytest.approx(0.02) and pairs["decisive"].all()
    assert (pairs["gain_ci_low"] > 0).all()
    summary = method_summary(pairs, draws)
    assert (summary["decisive"] == "3 wins, 0 losses of 3").all() and (summary["gain_ci_low"] > 0.015).all()
    bare = method_pairs(tidy, "ce_wikitext2")
    assert bare["decisive"].isna().all() and (method_summary(bare)["decisive"] == "no CI").all()


def test_dtype_table_ties_equal_settings_and_separates_worse_ones(raw: pd.DataFrame, draws: JobDraws) -> None:
    rtn = tidy_jobs(raw).query("method != 'toy'")
    table = dtype_block_table(rtn, "ce_wikitext2", 4, draws).set_index("dtype")
    assert table.loc["int", "gap_to_best"] == pytest.approx(0.05)
    assert table.loc["int", "tied_with_best"] is False and table.loc["int", "gap_ci_low"] > 0.04
    best, other = table.index[0], ({"fp", "nf"} - {table.index[0]}).pop()
    assert best in {"fp", "nf"} and table.loc[best, "tied_with_best"] is None
    assert table.loc[other, "tied_with_best"] is True  # fp and nf score alike: the CI includes 0
    assert dtype_block_table(rtn, "ce_wikitext2", 4)["tied_with_best"].isna().all()


def test_proxy_gains_are_decisive_only_where_they_exist(raw: pd.DataFrame, draws: JobDraws) -> None:
    pairs = proxy_effect(tidy_jobs(raw), "ce_wikitext2", draws=draws)
    three, four = pairs[pairs["bits"] == 3], pairs[pairs["bits"] == 4]
    assert three["decisive"].all() and (three["gain_ci_low"] > 0).all()
    assert not four["decisive"].any()
    summary = proxy_summary(pairs).set_index("bits")
    assert summary.loc[3, "decisive"] == f"{len(three)} helped, 0 hurt of {len(three)}"
    assert summary.loc[4, "decisive"] == f"0 helped, 0 hurt of {len(four)}"


def test_a_report_with_units_states_paired_cis(raw: pd.DataFrame) -> None:
    study = study_from_results(raw, "paired", metric="ce_wikitext2", n_boot=100, n_budgets=6)
    text = render_markdown("paired", build_sections(study))
    assert "No paired CI is available" not in text and "no paired CI is available" not in text
    assert "CIs: paired bootstrap, 100 replicates" in text
    assert "by the paired test" in text.split("## Gaps")[0]
