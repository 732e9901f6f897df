"""A quantization method or scope other than the default is always a setting of its own."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from analysis.compare import dtype_block_table
from analysis.curves import curve_points
from analysis.report import main
from analysis.summary import describe_curve
from analysis.tidy import method_label, study_grid, tidy_jobs
from pipeline.results import load_results
from tests.analysis.synthetic import Config, grid, write_study

TOY = "toy(damp=0.1) fp e2 B64"  # the 'toy' method, with its one parameter
EMB = "fp e2 B64 +emb"  # round-to-nearest, embeddings quantized too
RTN = "fp e2 B64"


def method_configs() -> list[Config]:
    """rtn, the 'toy' method and rtn with embeddings quantized, at 3 sizes x 3/4 bits, one baseline."""
    base = grid(sizes=(1_000_000, 4_000_000, 16_000_000), bits=(3, 4))
    quantized = [c for c in base if c.bits < 16]
    toy = [replace(c, method="toy", method_params='{"damp":0.1}') for c in quantized]
    emb = [replace(c, quantize_embeddings=True) for c in quantized]
    return base + toy + emb


def shift(cfg: Config) -> float:
    """The toy method is a bit better, quantized embeddings a bit worse."""
    return 0.02 * (cfg.method == "toy") - 0.03 * cfg.quantize_embeddings


@pytest.fixture(scope="module")
def methods_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    study = tmp_path_factory.mktemp("methods") / "methods"
    write_study(study, method_configs(), noise=0.002, offset=shift)
    return study


@pytest.fixture(scope="module")
def methods_raw(methods_study: Path) -> pd.DataFrame:
    return load_results(methods_study)


@pytest.fixture(scope="module")
def methods_report(methods_study: Path) -> Path:
    out = methods_study.parent / "report"
    assert main([str(methods_study), "--out", str(out), "--n-boot", "20", "--budgets", "6"]) == 0
    return out


def test_method_labels() -> None:
    assert method_label("rtn") == "rtn"
    assert method_label("gptq", '{"act_order":true,"damp":0.01}') == "gptq(act_order=true,damp=0.01)"
    assert method_label("gptq", '{"order":"desc"}') == "gptq(order=desc)"


def test_methods_and_scopes_are_their_own_settings(methods_raw: pd.DataFrame) -> None:
    tidy = tidy_jobs(methods_raw)
    assert set(tidy["setting"]) == {RTN, TOY, EMB, "16-bit"}
    assert set(tidy.loc[tidy["bits"] == 16, "method"]) == {"none"}
    points = curve_points(tidy, "mean_acc")
    assert set(points["curve"]) == {"16-bit"} | {f"{k}-bit {s}" for k in (3, 4) for s in (RTN, TOY, EMB)}
    assert (points.groupby(["curve", "n_params"]).size() == 1).all()  # one job each: nothing averaged
    assert points.loc[points["setting"] == "16-bit", "n_params"].nunique() == 3  # one shared baseline
    four = points[points["bits"] == 4].set_index(["setting", "n_params"])["value"].unstack()
    assert (four.loc[TOY] > four.loc[RTN]).all() and (four.loc[EMB] < four.loc[RTN]).all()
    table = dtype_block_table(tidy, "mean_acc", 4)
    assert sorted(table["method"]) == ["rtn", "rtn +emb", "toy(damp=0.1)"]
    assert describe_curve(f"4-bit {TOY}", tidy).startswith("4-bit toy(damp=0.1) with dtype fp")
    assert describe_curve(f"4-bit {EMB}", tidy).endswith("block 64, embeddings quantized too")


def test_grid_shows_method_and_scope(methods_raw: pd.DataFrame) -> None:
    grid_values = study_grid(methods_raw).set_index("axis")["values"]
    assert grid_values["method"] == "none, rtn, toy(damp=0.1)"
    assert grid_values["quantize_embeddings"] == "False, True"
    assert "quantize_lm_head" not in grid_values  # at its default in every job: not an axis of this study


def test_report_names_every_method_and_scope(methods_report: Path) -> None:
    for name in ("summary.md", "report.html"):
        text = (methods_report / name).read_text(encoding="utf-8")
        for label in (TOY, EMB, f"4-bit {TOY}"):  # settings in the fit tables, the winning curve
            assert label in text, (name, label)
    summary = (methods_report / "summary.md").read_text(encoding="utf-8")
    assert "| method | none, rtn, toy(damp=0.1) |" in summary
    assert f"| toy | {EMB} | shared_slope | a_4 |" in summary
    gaps = summary.split("## Gaps")[1].split("## Study")[0].strip()
    assert "Proxy" not in gaps and "## Proxy" not in summary  # no proxy jobs: the section is left out
    answer = summary.split("## Gaps")[0]
    assert "no paired CI is available" in answer  # the rows carry no per-unit data: no winner named
    optimality = summary.split("## Bit-optimal precision per memory budget")[1].split("## Pareto")[0]
    assert f"| 4-bit {TOY} |" in optimality  # the method's curve has the best point estimate
