"""One look for every figure: rc settings, colours per bit width and per category, figure factory.

Figures are built as `matplotlib.figure.Figure` on the Agg canvas, never through pyplot, so no
global figure state or GUI backend is involved.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator

STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 7.5,
    "legend.frameon": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 4.5,
    "savefig.dpi": 150,
    "svg.fonttype": "none",
}
PANEL_SIZE_IN = (3.6, 2.9)
BITS_COLORS = {
    3: "#d62728",
    4: "#1f77b4",
    5: "#2ca02c",
    6: "#9467bd",
    7: "#8c564b",
    8: "#ff7f0e",
    16: "#111111",
}
CATEGORY_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")

P = ParamSpec("P")
R = TypeVar("R")


def styled(func: Callable[P, R]) -> Callable[P, R]:
    """Run a plotting function under `STYLE` (rc settings apply to artists made inside)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with mpl.rc_context(STYLE):  # type: ignore[arg-type]
            return func(*args, **kwargs)

    return wrapper


def new_figure(n_panels: int, max_cols: int = 3) -> tuple[Figure, list[Axes]]:
    """A figure with `n_panels` axes in a grid of at most `max_cols` columns (Agg canvas)."""
    n_panels = max(n_panels, 1)
    cols = min(n_panels, max_cols)
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(PANEL_SIZE_IN[0] * cols, PANEL_SIZE_IN[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    return fig, axes[:n_panels]


def bits_color(bits: int) -> str:
    """The colour of a bit width, the same in every figure."""
    return BITS_COLORS.get(int(bits), "#7f7f7f")


def category_color(index: int) -> str:
    """The i-th categorical colour (data types, block sizes, families)."""
    return CATEGORY_COLORS[index % len(CATEGORY_COLORS)]


def bits_axis(ax: Axes, label: str = "total model bits") -> None:
    """A log-scaled memory axis with compact labels (10M, 200M, 1G); 2x and 5x ticks are labelled
    only where the axis spans under two decades, so labels never collide."""
    ax.set_xscale("log")
    eng = EngFormatter(places=0, sep="")
    ax.xaxis.set_major_formatter(eng)
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: eng(x) if _decades(ax) < 2 else ""))
    ax.set_xlabel(label)


def _decades(ax: Axes) -> float:
    low, high = ax.get_xlim()
    return float(np.log10(high / low)) if low > 0 and high > 0 else 0.0
