"""Report at scale (issue 17): the report's parts run in worker processes and give the same report as
one process; a study of many families gets one combined curve figure, optimality figures for 12 of them
and capped fit replicates (each stated in the report); the shared-slope bootstrap solves each distinct
replicate once and the leave-one-out runs over all curves at once, bit for bit."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import fits, parts
from analysis.answer import optimality_section, optimality_table
from analysis.curves import curve_points, with_baseline
from analysis.render import render_markdown
from analysis.report import build_sections, study_from_results, write_report
from analysis.sections import MAX_FAMILY_FIGURES, Study, curves_section, guarded
from analysis.sections_fits import SCALE_FIT_BOOT, fit_blocks_shape, fit_replicates, fits_section
from tests.analysis.synthetic import Units, grid, study_frame

SIZES = (1_000_000, 4_000_000, 16_000_000)


def _study(families: int, n_boot: int, units: bool = False) -> Study:
    configs = [
        c
        for i in range(families)
        for c in grid(sizes=SIZES, bits=(3, 4), dtypes=("fp", "int"), family=f"fam{i:02d}")
    ]
    frame = study_frame(configs, noise=0.002, seed=1, units=Units() if units else None)
    return study_from_results(frame, "scale", n_boot=n_boot, n_budgets=4)


def _pngs(out: Path) -> dict[str, bytes]:
    return {png.name: png.read_bytes() for png in sorted((out / "figures").glob("*.png"))}


@pytest.mark.parametrize("start", ["fork", "forkserver"])
def test_worker_processes_give_the_report_of_one_process(
    tmp_path: Path, start: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both ways the pool starts its workers (`parts._pool_context`): forked (the study inherited) and from
    # a forkserver (the study pickled; the way once Ray is imported), each the report of one process.
    if start not in mp.get_all_start_methods():
        pytest.skip(f"no {start} start method here")
    context = mp.get_context(start)
    if start == "forkserver":
        context.set_forkserver_preload([parts.__name__])
    monkeypatch.setattr(parts, "_pool_context", lambda: context)
    study = _study(families=2, n_boot=30, units=True)
    runs = {
        "serial": build_sections(study, processes=1, fig_dir=tmp_path / "serial" / "figures"),
        "pooled": build_sections(study, processes=2, fig_dir=tmp_path / "pooled" / "figures"),
        "memory": build_sections(study),  # figures held, saved by write_report
    }
    assert sum(b.saved for s in runs["pooled"] for b in s.blocks) >= 5  # saved by the workers
    files = {name: write_report("r", sections, tmp_path / name) for name, sections in runs.items()}
    text = files["serial"].markdown.read_text(encoding="utf-8")
    assert "CIs: paired bootstrap, 30 replicates" in text  # the paired draws ran in the workers too
    for name in ("pooled", "memory"):
        assert files[name].markdown.read_text(encoding="utf-8") == text
        assert [p.name for p in files[name].figures] == [p.name for p in files["serial"].figures]
        assert _pngs(tmp_path / name) == _pngs(tmp_path / "serial")
    assert len(_pngs(tmp_path / "serial")) >= 6


def test_the_pool_forks_only_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert parts._pool_context().get_start_method() == "fork"
    monkeypatch.setitem(sys.modules, "ray", sys)  # any module: Ray imported, its threads may run
    assert parts._pool_context().get_start_method() in ("forkserver", "spawn")


@pytest.mark.parametrize("sizes", [SIZES, SIZES[:1]])
def test_fits_in_parts_is_the_fits_section(sizes: tuple[int, ...]) -> None:
    """The fits as tasks (the shape part, the effective law in runs of families) joined give the
    section `fits_section` gives in one piece; a part's error is the section's gap."""
    configs = [c for family in ("a", "b", "c") for c in grid(sizes=sizes, bits=(3, 4), family=family)]
    study = study_from_results(study_frame(configs, noise=0.002, seed=2), "three", n_boot=20)
    joined = next(s for s in build_sections(study) if s.title == "Parametric fits")
    whole = guarded("Parametric fits", lambda: fits_section(study))
    assert render_markdown("f", [joined]) == render_markdown("f", [whole])
    assert bool(joined.gaps) == (len(sizes) == 1)


def test_many_families_get_one_combined_curve_figure_and_say_so() -> None:
    many = curves_section(_study(families=MAX_FAMILY_FIGURES + 1, n_boot=0))
    names = [b.name for b in many.blocks if b.has_figure]
    assert names and all(name.startswith("curves-all-families-") for name in names)
    assert f"more than {MAX_FAMILY_FIGURES}" in many.blocks[0].text
    fig = many.blocks[1].figure
    assert fig is not None and len([ax for ax in fig.axes if ax.get_visible()]) == MAX_FAMILY_FIGURES + 1

    few = curves_section(_study(families=2, n_boot=0))
    per_family = [b.name for b in few.blocks if b.has_figure]
    assert {n.split("-")[1] for n in per_family} == {"fam00", "fam01"}
    assert "more than" not in few.blocks[0].text


def test_many_families_cap_the_fit_replicates_and_say_so() -> None:
    asked = SCALE_FIT_BOOT + 100
    many = _study(families=MAX_FAMILY_FIGURES + 1, n_boot=asked)
    assert fit_replicates(many) == SCALE_FIT_BOOT
    blocks = fit_blocks_shape(many)
    assert f"{SCALE_FIT_BOOT} replicates rather than {asked}" in blocks[0].text
    params = next(b.table for b in blocks if b.table is not None and "parameters" in b.name)
    assert 0 < params["replicates"].max() <= SCALE_FIT_BOOT

    few = _study(families=2, n_boot=asked)
    assert fit_replicates(few) == asked
    assert "rather than" not in fit_blocks_shape(few)[0].text


def _shared_slope_every_row(group: pd.DataFrame, weights: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The unoptimized reference: every replicate solved, duplicates too."""
    bits = sorted(group["bits"].unique())
    design = np.column_stack([(group["bits"] == k).to_numpy(float) for k in bits] + [group["log2_bits"]])
    root_w = np.sqrt(weights)[:, :, None]
    weighted = root_w * design[None]
    replicates = (np.linalg.pinv(weighted) @ (root_w * targets[:, :, None]))[:, :, 0]
    replicates[np.linalg.matrix_rank(weighted) != design.shape[1]] = np.nan
    return replicates.T


def test_shared_slope_replicates_are_those_of_solving_every_draw(law_tidy: pd.DataFrame) -> None:
    points = curve_points(law_tidy, "ce_wikitext2")
    family, setting = fits._groups(points)[0]
    group = with_baseline(points, family, setting).reset_index(drop=True)
    weights = fits.cluster_weights(group, 300, np.random.default_rng(0))
    targets = np.broadcast_to(group["value"].to_numpy(float), weights.shape).copy()
    targets[::7] *= 1.01  # some draws differ only in their targets: kept apart
    assert len(np.unique(weights, axis=0)) < len(weights)
    fast = fits._fit_shared_slope(group, weights, targets)
    reference = _shared_slope_every_row(group, weights, targets)
    np.testing.assert_array_equal(np.vstack([v[1:] for v in fast.draws.values()]), reference)


def _loo_every_curve(points: pd.DataFrame) -> pd.DataFrame:
    """The reference: each (family, curve) on its own, its interior points from their neighbours."""
    preds = []
    for _, curve in points.groupby(["model_family", "curve"], sort=True):
        x, y = curve["log2_bits"].to_numpy(), curve["value"].to_numpy()
        if len(curve) >= 3:
            predicted = y[:-2] + (x[1:-1] - x[:-2]) / (x[2:] - x[:-2]) * (y[2:] - y[:-2])
            inner = curve.iloc[1:-1]
            preds.append(
                inner.assign(law="interpolation", predicted=predicted, residual=inner["value"] - predicted)
            )
    return pd.concat(preds, ignore_index=True)


def test_leave_one_out_of_all_curves_at_once_is_that_of_each_curve() -> None:
    configs = [
        c
        for family, sizes in (("b", SIZES), ("a", (*SIZES, 64_000_000)), ("c", SIZES[:2]))
        for c in grid(sizes=sizes, bits=(3, 4), dtypes=("fp", "int"), family=family)
    ]
    tidy = study_from_results(study_frame(configs, noise=0.002, seed=3), "loo", n_boot=0).require_tidy()
    points = curve_points(tidy, "ce_wikitext2").sample(frac=1.0, random_state=0)  # any row order
    fit = fits.interpolation_loo(points)
    pd.testing.assert_frame_equal(fit.predictions, _loo_every_curve(points), check_exact=True)
    assert set(fit.predictions["model_family"]) == {"a", "b"}  # c: curves of 2 sizes, nothing inside


def test_many_families_draw_optimality_figures_for_twelve_and_say_so() -> None:
    many = _study(families=MAX_FAMILY_FIGURES + 1, n_boot=0)
    section = optimality_section(many, optimality_table(many))
    names = [b.name for b in section.blocks if b.has_figure]
    assert names == [f"optimality-fam{i:02d}" for i in range(MAX_FAMILY_FIGURES)]
    assert any(f"more than {MAX_FAMILY_FIGURES}: figures for the first" in b.text for b in section.blocks)
    few = _study(families=2, n_boot=0)
    section = optimality_section(few, optimality_table(few))
    assert [b.name for b in section.blocks if b.has_figure] == ["optimality-fam00", "optimality-fam01"]
    assert not any("more than" in b.text for b in section.blocks)
