"""Figures a researcher can trust, checked on the rendered figures: distinct tick labels, titles clear of
every other text, every data type drawn, no fit drawn or tabled on too few points, failed fits flagged."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Text

from analysis.curves import curve_points
from analysis.fits import QUALITY_COLUMNS, FitResult, fit_law
from analysis.plots_curves import (
    BEST_PANEL,
    data_type_of,
    fit_quality_table,
    fit_verdicts,
    plot_fit_quality,
    plot_scaling_curves,
)
from analysis.report import build_sections, study_from_results
from analysis.style import bits_axis, eng_label, new_figure, styled
from analysis.tidy import tidy_jobs
from tests.analysis.synthetic import Config, Units, grid, study_frame

DTYPES = ("dynamic", "fp", "int", "nf", "quantile")
SIZES = (1_000_000, 4_000_000, 16_000_000)


def better_nf(cfg: Config) -> float:
    """nf is best at every bit width, block size 64 without proxy best within each data type."""
    return 0.02 * (cfg.dtype == "nf") - 0.01 * (cfg.block_size is None) - 0.005 * (cfg.outlier_fraction > 0)


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    """Five data types x two block sizes x bits 3/4/8, proxy on/off, three sizes, per-chunk units."""
    configs = grid(sizes=SIZES, bits=(3, 4, 8), dtypes=DTYPES, block_sizes=(64, None),
                   outlier_fractions=(0.0, 0.02))  # fmt: skip
    return study_frame(configs, noise=0.001, seed=3, offset=better_nf, units=Units(n_units=40))


@pytest.fixture(scope="module")
def points(raw: pd.DataFrame) -> pd.DataFrame:
    return curve_points(tidy_jobs(raw), "ce_wikitext2")


@pytest.fixture(scope="module")
def report_figures(raw: pd.DataFrame) -> dict[str, Figure]:
    """Every figure of the whole report on the study, by name."""
    study = study_from_results(raw, "figures", n_boot=20, n_budgets=5)
    sections = build_sections(study)
    figures = {b.name: b.figure for s in sections for b in s.blocks if b.figure is not None}
    assert {"pareto", "fit-interpolation", "fit-shared-slope", "proxy"} <= set(figures)
    return figures


def drawn(fig: Figure) -> Figure:
    fig.draw_without_rendering()
    return fig


def in_view(ax: Axes, axis: str) -> list[Text]:
    """The major and minor tick labels inside the axis's view (what a reader sees; ticks outside it are
    not drawn)."""
    low, high = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    span = high - low
    which = ax.xaxis if axis == "x" else ax.yaxis
    ticks = which.get_major_ticks() + which.get_minor_ticks()
    return [
        tick.label1
        for tick in ticks
        if low - 1e-9 * span <= tick.get_loc() <= high + 1e-9 * span and tick.label1.get_visible()
    ]


def visible_tick_labels(ax: Axes, axis: str) -> list[str]:
    """The texts of the major tick labels a reader sees on one axis."""
    return [label.get_text() for label in in_view(ax, axis) if label.get_text()]


def texts(fig: Figure) -> list[Text]:
    """Every visible, non-empty text of a drawn figure: titles, axis and tick labels, legend entries."""
    found: list[Text] = [fig._suptitle] if fig._suptitle is not None else []  # type: ignore[attr-defined]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        found += [ax.title, ax._left_title, ax._right_title]  # type: ignore[attr-defined]
        found += [ax.xaxis.label, ax.yaxis.label]
        found += in_view(ax, "x") + in_view(ax, "y")
        legend = ax.get_legend()
        if legend is not None:
            found += legend.get_texts()
        found += ax.texts
    return [t for t in found if t.get_visible() and t.get_text().strip()]


def title_collisions(fig: Figure) -> list[tuple[str, str]]:
    """(title, other text) pairs whose boxes overlap, and titles that leave the figure."""
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    every = texts(drawn(fig))
    titles = [t for t in every if t is fig._suptitle or any(t is ax.title for ax in fig.axes)]  # type: ignore[attr-defined]
    page = fig.bbox
    bad = []
    for title in titles:
        box = title.get_window_extent(renderer)
        if box.x0 < page.x0 - 1 or box.x1 > page.x1 + 1 or box.y1 > page.y1 + 1:
            bad.append((title.get_text(), "<outside the figure>"))
        for other in every:
            if other is not title and box.overlaps(other.get_window_extent(renderer)):
                bad.append((title.get_text(), other.get_text()))
    return bad


@pytest.mark.parametrize(
    ("low", "high"),
    [(1.1e6, 1.9e6), (6e5, 4e6), (3e6, 9e6), (9.6e5, 1.04e6), (1e6, 1e9), (3e5, 2e12), (172e3, 8.7e6)],
)
def test_bits_axis_never_repeats_a_label(low: float, high: float) -> None:
    @styled
    def figure() -> Figure:
        fig, (ax,) = new_figure(1)
        ax.plot(np.geomspace(low, high, 7), np.arange(7.0), "o")
        bits_axis(ax)
        return fig

    ax = drawn(figure()).axes[0]
    labels = visible_tick_labels(ax, "x")
    assert len(labels) >= 2, labels
    assert len(labels) == len(set(labels)), labels
    assert len(labels) <= 8, labels  # they fit side by side in a panel


def test_eng_labels_are_compact() -> None:
    assert [eng_label(v, 0) for v in (2e6, 5e5, 1e9, 999.7e3)] == ["2M", "500k", "1G", "1M"]
    assert eng_label(1.25e6, 2) == "1.25M" and eng_label(1.5e6, 3) == "1.5M"


def test_no_figure_of_the_report_repeats_a_tick_label(report_figures: dict[str, Figure]) -> None:
    for name, fig in report_figures.items():
        drawn(fig)
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            for axis in ("x", "y"):
                labels = visible_tick_labels(ax, axis)
                assert len(labels) == len(set(labels)), (name, ax.get_title(), axis, labels)


def test_no_title_overlaps_a_label(report_figures: dict[str, Figure]) -> None:
    for name, fig in report_figures.items():
        assert title_collisions(fig) == [], name


def test_long_titles_are_wrapped_to_their_panel() -> None:
    quality = pd.DataFrame(
        [{"model_family": "toy", "setting": f"setting {i}", "law": "shared_slope", "n_points": 9,
          "n_sizes": 3, "n_fit_params": 4, "r2": r2, "rmse": 0.01} for i, r2 in enumerate([0.9, -2.0, 0.5])]
    )  # fmt: skip
    fig = plot_fit_quality(_fit(quality), "cross-entropy", "a long figure title " * 8)
    assert title_collisions(fig) == []


def test_curves_show_every_data_type_and_the_best_of_each_bit_width(points: pd.DataFrame) -> None:
    fig = plot_scaling_curves(points, "cross-entropy", "toy", higher_is_better=False)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == [BEST_PANEL, *DTYPES]
    best = fig.axes[0].get_legend_handles_labels()[1]
    assert best == ["3-bit nf B64", "4-bit nf B64", "8-bit nf B64", "16-bit"]
    for ax, dtype in zip(fig.axes[1:], DTYPES, strict=True):
        labels = ax.get_legend_handles_labels()[1]
        exponent = "e2 " if dtype == "fp" else ""  # the synthetic fp has 2 exponent bits
        assert labels == [*(f"{k}-bit {exponent}B64" for k in (3, 4, 8)), "16-bit"], (dtype, labels)
        thin = [line for line in ax.get_lines() if line.get_linewidth() < 1.0]
        assert len(thin) >= 3, dtype  # the other settings of the type (per-tensor, proxy) are drawn too


def test_best_setting_follows_the_metric_direction(points: pd.DataFrame) -> None:
    flipped = points.assign(value=-points["value"])  # an accuracy-like metric: now nf is the worst
    fig = plot_scaling_curves(flipped, "accuracy", "toy", higher_is_better=True)
    best = fig.axes[0].get_legend_handles_labels()[1]
    assert best[:3] == ["3-bit nf B64", "4-bit nf B64", "8-bit nf B64"]
    fig = plot_scaling_curves(flipped, "accuracy", "toy", higher_is_better=False)
    assert not any("nf B64" in label for label in fig.axes[0].get_legend_handles_labels()[1])


def test_data_type_of_setting_labels() -> None:
    assert data_type_of("nf B64") == "nf"
    assert data_type_of("fp e2 per-tensor proxy 2%") == "fp"
    assert data_type_of("gptq(damp=0.1) int B64 +emb") == "gptq(damp=0.1) int"
    assert data_type_of("16-bit") == "16-bit"


def _fit(quality: pd.DataFrame) -> FitResult:
    """A FitResult with the given quality rows, each group with `n_points` predictions at bits 4."""
    predictions = pd.concat(
        [
            pd.DataFrame({
                "model_family": row.model_family, "setting": row.setting, "bits": 4, "law": row.law,
                "total_model_bits": np.geomspace(1e6, 8e6, int(row.n_points)),
                "value": np.linspace(3.0, 2.0, int(row.n_points)) + (0.5 if row.r2 < 0 else 0.0),
                "predicted": np.linspace(3.0, 2.0, int(row.n_points)),
            })
            for row in quality.itertuples()
        ],
        ignore_index=True,
    )  # fmt: skip
    predictions["residual"] = predictions["value"] - predictions["predicted"]
    params = pd.DataFrame(
        [{"model_family": row.model_family, "setting": row.setting, "law": row.law, "param": p,
          "estimate": e} for row in quality.itertuples() for p, e in (("a_4", 1.0), ("b", -0.1))]
    )  # fmt: skip
    return FitResult(params, predictions, quality[QUALITY_COLUMNS], pd.DataFrame())


def test_fits_with_too_few_points_are_neither_drawn_nor_tabled() -> None:
    rows = [("ok", "shared_slope", 6, 3, 0.95), ("few", "shared_slope", 3, 3, 0.99),
            ("loo-two", "interpolation", 2, 0, 0.8), ("failed", "shared_slope", 6, 3, -17780.0),
            ("loo-ok", "interpolation", 3, 0, 0.9)]  # fmt: skip
    quality = pd.DataFrame(
        [{"model_family": "toy", "setting": s, "law": law, "n_points": n, "n_sizes": 3, "n_fit_params": p,
          "r2": r2, "rmse": 0.01} for s, law, n, p, r2 in rows]
    )  # fmt: skip
    verdicts = dict(zip(quality["setting"], fit_verdicts(quality), strict=True))
    assert verdicts["ok"] == verdicts["loo-ok"] == "ok"
    assert verdicts["few"].startswith("not fit") and verdicts["loo-two"].startswith("not fit")
    assert verdicts["failed"] == "failed fit (R² < 0)"

    table = fit_quality_table(_fit(quality)).set_index("setting")
    assert table["r2"].notna().to_dict() == {"ok": True, "few": False, "loo-two": False, "failed": False,
                                             "loo-ok": True}  # fmt: skip
    assert (table["r2"].dropna() >= 0).all()  # no negative R² printed as a statistic

    fig = drawn(plot_fit_quality(_fit(quality), "cross-entropy", "synthetic"))
    points_drawn = sum(np.asarray(c.get_offsets()).shape[0] for c in fig.axes[0].collections)
    assert points_drawn == 6 + 3  # the two accepted fits only
    title = fig.axes[0].get_title().replace("\n", " ")
    assert "-17780" not in title and "−17780" not in title
    assert "1 failed (R² < 0)" in title and "2 not fit (too few points)" in title


def test_curves_draw_only_accepted_fits(points: pd.DataFrame) -> None:
    fit = fit_law(points, "shared_slope", n_boot=0)
    dashed = _dashed_lines(plot_scaling_curves(points, "ce", "toy", fit))
    assert dashed > 0
    failed = fit.quality.assign(r2=-1.0)
    assert _dashed_lines(plot_scaling_curves(points, "ce", "toy", FitResult(
        fit.params, fit.predictions, failed, fit.skipped))) == 0  # fmt: skip
    few = fit.quality.assign(n_points=fit.quality["n_fit_params"])
    assert _dashed_lines(plot_scaling_curves(points, "ce", "toy", FitResult(
        fit.params, fit.predictions, few, fit.skipped))) == 0  # fmt: skip


def _dashed_lines(fig: Figure) -> int:
    return sum(line.get_linestyle() == "--" for ax in fig.axes for line in ax.get_lines())


def test_sections_the_study_did_not_ask_for_are_silent(
    raw: pd.DataFrame, caplog: pytest.LogCaptureFixture
) -> None:
    plain = raw[raw["outlier_fraction"].fillna(0) == 0]
    with caplog.at_level(logging.WARNING, logger="analysis"):
        sections = build_sections(study_from_results(plain, "plain", n_boot=5, n_budgets=4))
    titles = [s.title for s in sections]
    assert not any("Proxy" in t for t in titles), titles
    assert not any("roxy" in r.getMessage() for r in caplog.records)
    assert not any("roxy" in g for s in sections for g in s.gaps)
