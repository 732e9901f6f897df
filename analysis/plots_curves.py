"""Figures of scaling curves, fit quality and bit-optimality (each returns a `Figure`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.errors import AnalysisError
from analysis.fits import FitResult
from analysis.style import bits_axis, bits_color, new_figure, styled
from analysis.tidy import BASELINE_SETTING

MAX_PANELS = 9


def _settings(points: pd.DataFrame, max_panels: int) -> list[str]:
    """A family's settings, most points first, the 16-bit baseline alone only if nothing else."""
    counts = points.loc[points["setting"] != BASELINE_SETTING, "setting"].value_counts(sort=False)
    ranked = sorted(counts.index, key=lambda s: (-counts[s], s))
    return ranked[:max_panels] or [BASELINE_SETTING]


@styled
def plot_scaling_curves(
    points: pd.DataFrame,
    metric_label: str,
    family: str,
    fit: FitResult | None = None,
    max_panels: int = MAX_PANELS,
) -> Figure:
    """The paper's Figure 1 for one family: metric vs total model bits, one line per bit width.

    One panel per quantization setting (the `max_panels` with most points), each with the family's
    16-bit baseline; the shared-slope fit, if given, is drawn dashed.
    """
    fam = points[points["model_family"] == family]
    if fam.empty:
        raise AnalysisError(
            f"no curve points for family {family!r}; have {sorted(points['model_family'].unique())}"
        )
    settings = _settings(fam, max_panels)
    fig, axes = new_figure(len(settings))
    for ax, setting in zip(axes, settings, strict=True):
        _draw_setting(ax, fam[fam["setting"].isin([setting, BASELINE_SETTING])], fit, family, setting)
        legend = ax.get_legend()
        if ax is not axes[0] and legend is not None:
            legend.remove()
        ax.set_title(setting)
        ax.set_ylabel(metric_label)
    fig.suptitle(f"{family}: {metric_label} vs total model bits")
    return fig


def _draw_setting(ax: Axes, rows: pd.DataFrame, fit: FitResult | None, family: str, setting: str) -> None:
    for bits, curve in rows.groupby("bits"):
        color = bits_color(int(bits))
        ax.plot(curve["total_model_bits"], curve["value"], "o-", color=color, label=f"{int(bits)}-bit")
        line = _fit_line(fit, family, setting, int(bits), curve)
        if line is not None:
            ax.plot(*line, "--", color=color, linewidth=0.9, alpha=0.8)
    bits_axis(ax)
    ax.legend(loc="best")


def _fit_line(
    fit: FitResult | None, family: str, setting: str, bits: int, curve: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray] | None:
    if fit is None or fit.params.empty:
        return None
    params = fit.params[(fit.params["model_family"] == family) & (fit.params["setting"] == setting)]
    est = dict(zip(params["param"], params["estimate"], strict=True))
    if f"a_{bits}" not in est:
        return None
    x = np.geomspace(curve["total_model_bits"].min(), curve["total_model_bits"].max(), 20)
    return x, est[f"a_{bits}"] + est["b"] * np.log2(x)


@styled
def plot_fit_quality(fit: FitResult, metric_label: str, title: str) -> Figure:
    """Goodness of fit: observed vs predicted (identity line) and residuals vs total model bits."""
    if fit.predictions.empty:
        raise AnalysisError(f"{title}: no fitted group to plot")
    pred = fit.predictions
    fig, (obs_ax, res_ax) = new_figure(2)
    for bits, rows in pred.groupby("bits"):
        color = bits_color(int(bits))
        obs_ax.scatter(rows["predicted"], rows["value"], s=14, color=color, label=f"{int(bits)}-bit")
        res_ax.scatter(rows["total_model_bits"], rows["residual"], s=14, color=color)
    values = pred[["predicted", "value"]].to_numpy(float)
    low, high = np.nanmin(values), np.nanmax(values)
    obs_ax.plot([low, high], [low, high], color="#555555", linewidth=0.8)
    obs_ax.set_xlabel("predicted")
    obs_ax.set_ylabel("observed")
    obs_ax.legend(loc="lower right")
    r2 = fit.quality["r2"]
    obs_ax.set_title(f"R² min {r2.min():.3f}, median {r2.median():.3f} over {len(r2)} fits")
    res_ax.axhline(0.0, color="#555555", linewidth=0.8)
    bits_axis(res_ax)
    res_ax.set_ylabel("residual (observed − predicted)")
    res_ax.set_title("residuals")
    fig.suptitle(f"{title}\n{metric_label}")
    return fig


@styled
def plot_bit_optimality(
    best: pd.DataFrame, optimality: pd.DataFrame, metric_label: str, family: str
) -> Figure:
    """Top: each bit width's best interpolated metric vs budget, winners marked. Bottom: margin + CI."""
    fam_best = best[best["model_family"] == family]
    fam_opt = optimality[optimality["model_family"] == family] if not optimality.empty else optimality
    if fam_best.empty:
        raise AnalysisError(f"no interpolated curves for family {family!r}")
    fig, (top, bottom) = new_figure(2, max_cols=2)
    for bits, rows in fam_best.groupby("bits"):
        color = bits_color(int(bits))
        top.plot(rows["budget_bits"], rows["value"], color=color, label=f"best {int(bits)}-bit")
        top.fill_between(
            rows["budget_bits"], rows["ci_low"], rows["ci_high"], color=color, alpha=0.15, linewidth=0
        )
    if not fam_opt.empty:
        for bits, rows in fam_opt.groupby("winner_bits"):
            top.scatter(
                rows["budget_bits"],
                rows["winner_value"],
                s=40,
                marker="*",
                color=bits_color(int(bits)),
                edgecolor="black",
                linewidth=0.5,
                zorder=3,
            )
        _draw_margins(bottom, fam_opt)
    bits_axis(top, "memory budget (total model bits)")
    top.set_ylabel(metric_label)
    top.legend(loc="best")
    top.set_title("best of each bit width, 95% band (stars: bit-optimal)")
    fig.suptitle(f"{family}: bit-optimal precision per memory budget")
    return fig


def _draw_margins(ax: Axes, opt: pd.DataFrame) -> None:
    low = opt["margin"] - opt["margin_ci_low"]
    high = opt["margin_ci_high"] - opt["margin"]
    for decisive, rows in opt.assign(low=low, high=high).groupby("decisive"):
        ax.errorbar(
            rows["budget_bits"],
            rows["margin"],
            yerr=[rows["low"], rows["high"]],
            fmt="o",
            capsize=2,
            color="#1f77b4" if decisive else "#aaaaaa",
            label="CI excludes 0" if decisive else "within bootstrap CI",
        )
    ax.axhline(0.0, color="#555555", linewidth=0.8)
    bits_axis(ax, "memory budget (total model bits)")
    ax.set_ylabel("margin over runner-up")
    ax.set_title("margin with bootstrap 95% CI")
    ax.legend(loc="best")
