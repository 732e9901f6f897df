"""Figures of scaling curves, fit quality and bit-optimality (each returns a `Figure`).

A fit is drawn, and its R² shown, only where it is a fit: more points than parameters (`fit_verdicts`);
an R² below 0 (worse than the mean of the points) marks a failed fit, never a statistic.

Lines are drawn per precision (`analysis.tidy.precision_key`, `precision_style`): a bit width in its
own colour, solid; a mixed allocation ('mixed 3.25') dash-dotted in the colour between its neighbouring
bit widths'; a recovered curve ('4 +lora') dotted in its bit width's colour.
"""

from __future__ import annotations

import re
from itertools import takewhile

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure

from analysis.errors import AnalysisError
from analysis.fits import FitResult
from analysis.style import bits_axis, bits_color, new_figure, set_suptitle, set_title, styled
from analysis.tidy import BASELINE_SETTING, Precision, precision_label, precision_name, precision_order

BEST_PANEL = "best of each bit width"
LOO_LINE_PARAMS = 2  # leave-one-out predicts a point by the line through its two neighbours
VERDICT_OK = "ok"
_BLOCK_TOKEN = re.compile(r"^(B\d+|per-tensor)$")
_EXPONENT_TOKEN = re.compile(r"^e\d+$")
_ALLOCATION_TOKEN = re.compile(r"^[a-z_-]+\d[\d.]*\[")  # a mixed setting's 'knapsack3.25[nf3-b64+...]'
MIXED_LINESTYLE, RECOVERED_LINESTYLE = "-.", ":"  # fits are dashed; a bit width's own curves solid


def precision_style(key: Precision) -> tuple[str, str]:
    """(colour, line style) of a precision: a bit width's colour, solid; a mixed target the colour
    between its neighbouring bit widths' (3.25: a quarter of the way from 3 to 4), dash-dotted; a
    recovered curve its bit width's colour, dotted."""
    if not isinstance(key, str):
        return bits_color(int(key)), "-"
    bits = precision_order(key)[0]
    low = int(np.floor(bits)) if np.isfinite(bits) else 0
    frac = bits - low if np.isfinite(bits) else 0.0
    mix = (1 - frac) * np.array(to_rgb(bits_color(low))) + frac * np.array(to_rgb(bits_color(low + 1)))
    style = MIXED_LINESTYLE if key.startswith("mixed") else RECOVERED_LINESTYLE
    return to_hex(tuple(mix)), style


def curve_label(key: Precision, detail: str) -> str:
    """A legend label: '4-bit nf B64', '3-bit nf B64 +lora' (the setting names the recovery); a mixed
    curve without what its key says or what would not fit a legend (method parameters, candidates,
    target): 'mixed 3.25-bit gptq knapsack'."""
    base = key.split(" +")[0] if isinstance(key, str) else key  # the recovery is in `detail`
    if not (isinstance(base, str) and base.startswith("mixed")):
        return f"{precision_label(base)} {detail}"
    for pattern in _MIXED_DETAIL_DROPS:
        detail = pattern.sub("", detail)
    return " ".join([precision_label(base), *detail.split()])


_MIXED_DETAIL_DROPS = (
    re.compile(r"\([^)]*\)"),  # method parameters: 'gptq(search={...})'
    re.compile(r"\[[^\]]*\]"),  # candidates: '[nf2-b64+nf4-b64]'
    re.compile(r"(?<=[a-z_])\d+(?:\.\d+)?(?=\s|$)"),  # the target after the allocator: 'knapsack3.25'
    re.compile(r"(?:^|\s)mixed(?=\s|$)"),
)


def _precisions(frame: pd.DataFrame) -> pd.Series:
    """The `precision` column of curve points, or their bit widths for frames without one."""
    return frame["precision"] if "precision" in frame else frame["bits"].astype(int)


def data_type_of(setting: str) -> str:
    """The data type of a setting label, with its method where not rtn: 'nf B64' -> 'nf', 'fp e2
    per-tensor' -> 'fp', 'gptq int B64 +emb' -> 'gptq int' (block size, exponent bits, proxy, scope
    dropped); mixed settings are 'mixed' ('gptq mixed'); the 16-bit baseline is itself."""
    head = takewhile(lambda t: not (_BLOCK_TOKEN.match(t) or _ALLOCATION_TOKEN.match(t)), setting.split(" "))
    return " ".join(t for t in head if not _EXPONENT_TOKEN.match(t)) or setting


def best_settings(points: pd.DataFrame, higher_is_better: bool) -> dict[Precision, str]:
    """Per precision (bit width, or 'mixed 3.25', ...), its best setting among `points` (one family): of
    the settings measured at the most model sizes, the one with the best mean rank over those sizes
    (ties: best mean value, name)."""
    best: dict[Precision, str] = {}
    quantized = points[points["setting"] != BASELINE_SETTING]
    for bits, rows in quantized.groupby(_precisions(quantized)):
        coverage = rows.groupby("setting")["n_params"].nunique()
        rows = rows[rows["setting"].isin(coverage[coverage == coverage.max()].index)]
        signed = -rows["value"] if higher_is_better else rows["value"]
        ranked = rows.assign(rank=signed.groupby(rows["n_params"]).rank(method="average"), signed=signed)
        score = ranked.groupby("setting")[["rank", "signed"]].mean()
        best[bits if isinstance(bits, str) else int(bits)] = str(
            score.reset_index().sort_values(["rank", "signed", "setting"]).iloc[0]["setting"]
        )
    return best


@styled
def plot_scaling_curves(
    points: pd.DataFrame,
    metric_label: str,
    family: str,
    fit: FitResult | None = None,
    *,
    higher_is_better: bool = False,
) -> Figure:
    """The paper's Figure 1 for one family: metric vs total model bits, one line per bit width.

    The first panel holds each bit width's best setting over every data type and block size (the
    paper's figure); then one panel per data type (`data_type_of`), where each bit width's best setting
    of that type is drawn bold and its other settings (block sizes, exponent bits, ...) thin. Every panel
    has the family's 16-bit baseline and one y scale; a shared-slope fit that `fit_verdicts` accepts is
    drawn dashed along the bold lines.
    """
    fam = points[points["model_family"] == family]
    if fam.empty:
        raise AnalysisError(
            f"no curve points for family {family!r}; have {sorted(points['model_family'].unique())}"
        )
    quantized = fam[fam["setting"] != BASELINE_SETTING]
    panels = {BEST_PANEL: quantized} if not quantized.empty else {BASELINE_SETTING: quantized}
    for dtype in sorted(quantized["setting"].map(data_type_of).unique()):
        panels[dtype] = quantized[quantized["setting"].map(data_type_of) == dtype]
    fig, axes = new_figure(len(panels))
    accepted = _accepted_fits(fit, family)
    baseline = fam[fam["setting"] == BASELINE_SETTING]
    for ax, (name, rows) in zip(axes, panels.items(), strict=True):
        best = best_settings(rows, higher_is_better)
        prefix = "" if name in (BEST_PANEL, BASELINE_SETTING) else name
        _draw_panel(ax, rows, baseline, best, prefix, accepted)
        set_title(ax, name)
        if ax is not axes[0]:
            ax.sharey(axes[0])
        if ax.get_subplotspec().is_first_col():  # type: ignore[union-attr]
            ax.set_ylabel(metric_label)
    set_suptitle(fig, f"{family}: {metric_label} vs total model bits")
    return fig


def _draw_panel(
    ax: Axes,
    rows: pd.DataFrame,
    baseline: pd.DataFrame,
    best: dict[Precision, str],
    prefix: str,
    accepted: dict[str, dict[str, float]],
) -> None:
    """Thin lines for every setting but each precision's best, bold lines (and accepted fits) for those."""
    for (bits, setting), curve in rows.groupby([_precisions(rows), rows["setting"]]):
        if best.get(bits) != setting:
            color, style = precision_style(bits)
            ax.plot(curve["total_model_bits"], curve["value"], style, color=color, linewidth=0.7, alpha=0.35)
    for bits, setting in sorted(best.items(), key=lambda item: precision_order(item[0])):
        curve = rows[(_precisions(rows) == bits) & (rows["setting"] == setting)]
        detail = setting.removeprefix(prefix).strip() if prefix else setting
        color, style = precision_style(bits)
        ax.plot(curve["total_model_bits"], curve["value"], f"o{style}", color=color,
                label=curve_label(bits, detail))  # fmt: skip
        line = _fit_line(accepted.get(setting), precision_name(bits), curve)  # the fit's a_<precision>
        if line is not None:
            ax.plot(*line, "--", color=color, linewidth=0.9, alpha=0.8)
    if not baseline.empty:
        ax.plot(baseline["total_model_bits"], baseline["value"], "o-", color=bits_color(16), label="16-bit")
    bits_axis(ax)
    ax.legend(loc="best")


def _accepted_fits(fit: FitResult | None, family: str) -> dict[str, dict[str, float]]:
    """Per setting of `family`, the parameter estimates of its fit, where `fit_verdicts` accepts it."""
    if fit is None or fit.params.empty or fit.quality.empty:
        return {}
    quality = fit.quality[fit.quality["model_family"] == family]
    ok = set(quality.loc[fit_verdicts(quality) == VERDICT_OK, "setting"])
    params = fit.params[(fit.params["model_family"] == family) & fit.params["setting"].isin(ok)]
    return {
        str(setting): dict(zip(group["param"], group["estimate"], strict=True))
        for setting, group in params.groupby("setting")
    }


def _fit_line(
    est: dict[str, float] | None, bits: str, curve: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray] | None:
    if est is None or f"a_{bits}" not in est or "b" not in est or curve.empty:
        return None
    x = np.geomspace(curve["total_model_bits"].min(), curve["total_model_bits"].max(), 20)
    return x, est[f"a_{bits}"] + est["b"] * np.log2(x)


def min_points(law: str, n_fit_params: int) -> int:
    """Points a fit needs: its parameters plus one (leave-one-out: the neighbours' line, plus one)."""
    return (LOO_LINE_PARAMS if law == "interpolation" else int(n_fit_params)) + 1


def fit_verdicts(quality: pd.DataFrame) -> pd.Series:
    """Per row of a fit-quality table (`FitResult.quality`): 'ok', or why its R² is not a statistic:
    fewer points than parameters plus one, R² below 0 (a failed fit: worse than the points' mean), or
    no R² (the points do not vary)."""

    def verdict(row: pd.Series) -> str:
        needed = min_points(str(row["law"]), int(row["n_fit_params"]))
        if row["n_points"] < needed:
            return f"not fit: {int(row['n_points'])} points, needs >= {needed}"
        if pd.isna(row["r2"]):
            return "no R²: the points do not vary"
        return "failed fit (R² < 0)" if row["r2"] < 0 else VERDICT_OK

    if quality.empty:
        return pd.Series(dtype=object, index=quality.index)
    return quality.apply(verdict, axis=1).astype(object)


def fit_quality_table(fit: FitResult) -> pd.DataFrame:
    """The goodness-of-fit table with a `verdict` column; R² and RMSE only where the verdict is 'ok'
    (RMSE also for a failed fit: its size is what failed), blank elsewhere."""
    quality = fit.quality.copy()
    verdicts = fit_verdicts(quality)
    quality["verdict"] = verdicts
    quality["r2"] = quality["r2"].where(verdicts == VERDICT_OK)
    failed = verdicts.str.startswith("failed").fillna(False).astype(bool)
    quality["rmse"] = quality["rmse"].where((verdicts == VERDICT_OK) | failed)
    return quality


@styled
def plot_fit_quality(fit: FitResult, metric_label: str, title: str) -> Figure:
    """Goodness of fit: observed vs predicted (identity line) and residuals vs total model bits, for the
    fits `fit_verdicts` accepts; the title counts the failed fits and those with too few points."""
    if fit.predictions.empty:
        raise AnalysisError(f"{title}: no fitted group to plot")
    verdicts = fit_verdicts(fit.quality)
    ok = fit.quality.loc[verdicts == VERDICT_OK, ["model_family", "setting"]]
    pred = fit.predictions.merge(ok, on=["model_family", "setting"])
    fig, (obs_ax, res_ax) = new_figure(2)
    keys = _precisions(pred)
    for bits in sorted(keys.unique(), key=precision_order):
        rows = pred[keys == bits]
        color = precision_style(bits)[0]
        obs_ax.scatter(rows["predicted"], rows["value"], s=14, color=color, label=precision_label(bits))
        res_ax.scatter(rows["total_model_bits"], rows["residual"], s=14, color=color)
    if pred.empty:
        for ax in (obs_ax, res_ax):
            ax.text(
                0.5, 0.5, "no fit passed (see the table)", ha="center", va="center", transform=ax.transAxes
            )
    else:
        values = pred[["predicted", "value"]].to_numpy(float)
        low, high = np.nanmin(values), np.nanmax(values)
        obs_ax.plot([low, high], [low, high], color="#555555", linewidth=0.8)
        obs_ax.legend(loc="lower right")
        bits_axis(res_ax)
    obs_ax.set_xlabel("predicted")
    obs_ax.set_ylabel("observed")
    set_title(obs_ax, _quality_summary(fit.quality, verdicts))
    res_ax.axhline(0.0, color="#555555", linewidth=0.8)
    res_ax.set_ylabel("residual (observed − predicted)")
    set_title(res_ax, "residuals of the fits shown")
    set_suptitle(fig, f"{title}\n{metric_label}")
    return fig


def _quality_summary(quality: pd.DataFrame, verdicts: pd.Series) -> str:
    """'R² median 0.97 (min 0.91) over 12 fits; 3 failed (R² < 0); 2 not fit (too few points)'."""
    r2 = quality.loc[verdicts == VERDICT_OK, "r2"]
    parts = [
        f"R² median {r2.median():.3f} (min {r2.min():.3f}) over {len(r2)} fits"
        if len(r2)
        else "no fit passed"
    ]
    failed = int(verdicts.str.startswith("failed").sum())
    few = int(verdicts.str.startswith("not fit").sum())
    flat = int(verdicts.str.startswith("no R²").sum())
    parts += [f"{failed} failed (R² < 0)"] if failed else []
    parts += [f"{few} not fit (too few points)"] if few else []
    parts += [f"{flat} without R² (flat)"] if flat else []
    return "; ".join(parts)


@styled
def plot_bit_optimality(
    best: pd.DataFrame, optimality: pd.DataFrame, metric_label: str, family: str
) -> Figure:
    """Top: each precision's best interpolated metric vs budget (`precision_style`: a mixed one
    dash-dotted), winners marked. Bottom: margin + CI."""
    fam_best = best[best["model_family"] == family]
    fam_opt = optimality[optimality["model_family"] == family] if not optimality.empty else optimality
    if fam_best.empty:
        raise AnalysisError(f"no interpolated curves for family {family!r}")
    fig, (top, bottom) = new_figure(2, max_cols=2)
    for bits in sorted(fam_best["bits"].unique(), key=precision_order):
        rows = fam_best[fam_best["bits"] == bits]
        color, style = precision_style(bits)
        top.plot(
            rows["budget_bits"], rows["value"], style, color=color, label=f"best {precision_label(bits)}"
        )
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
                color=precision_style(bits)[0],
                edgecolor="black",
                linewidth=0.5,
                zorder=3,
            )
        _draw_margins(bottom, fam_opt)
    bits_axis(top, "memory budget (total model bits)")
    top.set_ylabel(metric_label)
    top.legend(loc="best")
    band = "paired 95% band" if fam_best["ci_low"].notna().any() else "no CI"
    top.set_title(f"best per bit width, {band}; stars: best")
    fig.suptitle(f"{family}: bit-optimal precision per memory budget")
    return fig


def _draw_margins(ax: Axes, opt: pd.DataFrame) -> None:
    """Margins over the runner-up with their paired CIs; without CIs, the margins alone (no verdict)."""
    verdict = opt["decisive"].map(lambda d: "none" if d is None or pd.isna(d) else "yes" if d else "no")
    styles = {"yes": ("#1f77b4", "CI excludes 0"), "no": ("#aaaaaa", "within paired CI"),
              "none": ("#d62728", "no paired CI available")}  # fmt: skip
    for key, rows in opt.assign(verdict=verdict).groupby("verdict"):
        color, label = styles[str(key)]
        ax.plot(rows["budget_bits"], rows["margin"], "o", color=color, label=label)
        if key != "none":  # the interval as drawn lines: a bootstrap CI need not contain its estimate
            ax.vlines(rows["budget_bits"], rows["margin_ci_low"], rows["margin_ci_high"], color=color)
    ax.axhline(0.0, color="#555555", linewidth=0.8)
    bits_axis(ax, "memory budget (total model bits)")
    ax.set_ylabel("margin over runner-up")
    ax.set_title("margin, paired 95% CI")
    ax.legend(loc="best")
