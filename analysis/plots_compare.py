"""Figures comparing configurations: Pareto fronts, data type x block size, proxy quantization, and the
best curves of many model families side by side."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from analysis.errors import AnalysisError
from analysis.plots_curves import best_settings
from analysis.style import bits_axis, bits_color, category_color, new_figure, set_suptitle, set_title, styled
from analysis.tidy import BASELINE_SETTING, method_scope_labels


@styled
def plot_pareto(tidy: pd.DataFrame, front: pd.DataFrame, metric: str, metric_label: str) -> Figure:
    """Every configuration's metric against memory (colour = bit width), the front as a step line."""
    rows = tidy.dropna(subset=[metric, "total_model_bits"])
    families = sorted(rows["model_family"].unique())
    if not families:
        raise AnalysisError(f"no job has a value for {metric!r}")
    fig, axes = new_figure(len(families))
    for ax, family in zip(axes, families, strict=True):
        fam = rows[rows["model_family"] == family]
        for bits, part in fam.groupby("bits"):
            ax.scatter(
                part["total_model_bits"],
                part[metric],
                s=12,
                alpha=0.7,
                color=bits_color(int(bits)),
                label=f"{int(bits)}-bit",
            )
        edge = front[front["model_family"] == family]
        ax.step(
            edge["total_model_bits"], edge[metric], where="post", color="black", linewidth=1.0, label="front"
        )
        bits_axis(ax)
        ax.set_ylabel(metric_label)
        set_title(ax, f"{family}: Pareto front")
        ax.legend(loc="best")
    return fig


@styled
def plot_dtype_block(tidy: pd.DataFrame, metric: str, metric_label: str, bits: int) -> Figure:
    """The paper's Figure 3: at one precision, one panel per data type, one line per block size
    (and per method and scope, where the jobs use several)."""
    rows = tidy[(tidy["bits"] == bits) & (tidy["dtype"] != "none") & tidy[metric].notna()]
    rows = (
        rows[rows["outlier_fraction"].fillna(0) == 0]
        if (rows["outlier_fraction"].fillna(0) == 0).any()
        else rows
    )
    if rows.empty:
        raise AnalysisError(f"no {bits}-bit job has {metric!r}")
    methods = method_scope_labels(rows)
    rows = rows.assign(line_method=methods if methods.nunique() > 1 else "")
    dtypes = sorted(rows["dtype"].unique())
    fig, axes = new_figure(len(dtypes))
    blocks = sorted(rows["block_size"].dropna().unique().tolist())
    lines = [(block, method) for method in sorted(rows["line_method"].unique()) for block in [*blocks, None]]
    for ax, dtype in zip(axes, dtypes, strict=True):
        part = rows[rows["dtype"] == dtype]
        for i, (block, method) in enumerate(lines):
            line = part[part["line_method"] == method]
            line = line[line["block_size"].isna()] if block is None else line[line["block_size"] == block]
            line = line.groupby("n_params")[["total_model_bits", metric]].mean()
            if not line.empty:
                label = _line_label(block, method)
                ax.plot(line["total_model_bits"], line[metric], "o-", color=category_color(i), label=label)
        bits_axis(ax)
        if ax is not axes[0]:
            ax.sharey(axes[0])  # one scale: data types compare across panels
        if ax.get_subplotspec().is_first_col():  # type: ignore[union-attr]
            ax.set_ylabel(metric_label)
        set_title(ax, f"{bits}-bit {dtype}")
        ax.legend(loc="best")
    return fig


def _line_label(block: float | None, method: str) -> str:
    """'B=64', 'per tensor', with the method and scope where lines differ in them: 'B=64 gptq'."""
    label = "per tensor" if block is None else f"B={int(block)}"
    return f"{label} {method}" if method else label


@styled
def plot_proxy_effect(pairs: pd.DataFrame, metric_label: str) -> Figure:
    """Gain of proxy quantization (positive = better) vs model size, one panel per bit width."""
    if pairs.empty:
        raise AnalysisError("no matched proxy / plain pairs to plot")
    widths = sorted(pairs["bits"].unique())
    fig, axes = new_figure(len(widths))
    dtypes = sorted(pairs["dtype"].unique())
    for ax, bits in zip(axes, widths, strict=True):
        part = pairs[pairs["bits"] == bits]
        for i, dtype in enumerate(dtypes):
            rows = part[part["dtype"] == dtype]
            ax.scatter(rows["n_params"], rows["gain"], s=16, color=category_color(i), label=str(dtype))
        ax.axhline(0.0, color="#555555", linewidth=0.8)
        bits_axis(ax, "parameters")
        ax.set_ylabel(f"gain in {metric_label}")
        set_title(ax, f"{int(bits)}-bit: proxy quantization")
        ax.legend(loc="best")
    return fig


@styled
def plot_family_curves(points: pd.DataFrame, metric_label: str, *, higher_is_better: bool = False) -> Figure:
    """Every family's scaling curves in one figure, one small panel per family: each precision's best
    setting (`best_settings`) and the 16-bit baseline, metric vs total model bits; one legend.

    What the report draws instead of one multi-panel figure per family once a study has more families
    than a report can usefully show one by one (`analysis.sections.MAX_FAMILY_FIGURES`).
    """
    families = sorted(points["model_family"].unique())
    if not families:
        raise AnalysisError("no curve points to draw")
    fig, axes = new_figure(len(families), max_cols=4)
    for ax, family in zip(axes, families, strict=True):
        fam = points[points["model_family"] == family]
        quantized = fam[fam["setting"] != BASELINE_SETTING]
        keys = quantized["precision"] if "precision" in quantized else quantized["bits"].astype(int)
        best = best_settings(quantized, higher_is_better)
        for key, setting in sorted(best.items(), key=lambda item: _key_order(item[0])):
            curve = quantized[(keys == key) & (quantized["setting"] == setting)]
            label = key if isinstance(key, str) else f"{key}-bit"
            color = bits_color(int(curve["bits"].iloc[0]))
            ax.plot(curve["total_model_bits"], curve["value"], "o-", color=color, markersize=3, label=label)
        baseline = fam[fam["setting"] == BASELINE_SETTING]
        if not baseline.empty:
            ax.plot(baseline["total_model_bits"], baseline["value"], "o-", color=bits_color(16),
                    markersize=3, label="16-bit")  # fmt: skip
        bits_axis(ax)
        set_title(ax, family)
        if ax.get_subplotspec().is_first_col():  # type: ignore[union-attr]
            ax.set_ylabel(metric_label)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    axes[0].legend(list(handles.values()), list(handles), loc="best", fontsize="small")
    title = f"{metric_label} vs total model bits, best setting per precision, {len(families)} families"
    set_suptitle(fig, title)
    return fig


def _key_order(key: object) -> tuple[int, float, str]:
    """Bit widths in order, then any named precision ('mixed 3.25', ...) by name."""
    return (1, 0.0, str(key)) if isinstance(key, str) else (0, float(key), "")  # type: ignore[arg-type]
