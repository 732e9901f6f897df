"""One look for every figure: rc settings, colours per bit width and per category, figure factory.

Figures are built as `matplotlib.figure.Figure` on the Agg canvas, never through pyplot, so no
global figure state or GUI backend is involved.
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import matplotlib as mpl
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import Formatter, Locator, LogLocator, MaxNLocator, NullFormatter

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
SI_PREFIXES = {-3: "m", 0: "", 3: "k", 6: "M", 9: "G", 12: "T", 15: "P"}  # tick labels of bits axes
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
    """A log-scaled memory axis with compact, distinct labels (900k, 2M, 1.5G): ticks at 1-2-5 x 10^k
    or 10^k by the span shown (`SpanLogLocator`), never two alike (`DistinctEngFormatter`)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(SpanLogLocator())
    ax.xaxis.set_major_formatter(DistinctEngFormatter())
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs="auto"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)


class SpanLogLocator(Locator):
    """Major ticks of a log axis, as many as fit in a panel (about 3-7), chosen by the decades shown:
    1-2-5 x 10^k up to ~2 decades, 10^k (every n-th decade) beyond, and 3-5 evenly spaced round values
    when the axis spans too little for two of those (a sub-decade axis)."""

    MAX_TICKS = 7

    def __call__(self) -> Sequence[float]:
        vmin, vmax = self.axis.get_view_interval() if self.axis is not None else (1.0, 10.0)
        return self.tick_values(vmin, vmax)

    def tick_values(self, vmin: float, vmax: float) -> Sequence[float]:
        low, high = sorted((float(vmin), float(vmax)))
        if not (low > 0 and math.isfinite(high)) or high <= low:
            return LogLocator(base=10).tick_values(max(low, 1e-300), max(high, 1e-300))
        first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
        for subs in ((1.0, 2.0, 5.0), (1.0,)):
            ticks = [m * 10.0**e for e in range(first, last + 1) for m in subs]
            shown = [t for t in ticks if low <= t <= high]
            if len(shown) >= 2 and len(shown) <= self.MAX_TICKS:
                return ticks
        decades = [10.0**e for e in range(first, last + 1)]
        if len([t for t in decades if low <= t <= high]) > self.MAX_TICKS:
            step = math.ceil((last - first) / self.MAX_TICKS)
            return [10.0**e for e in range(first - first % step, last + step, step)]
        if len([t for t in decades if low <= t <= high]) >= 2:
            return decades
        return list(MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high))


class DistinctEngFormatter(Formatter):
    """Engineering labels (k, M, G) with the fewest decimals that keep every tick's label distinct."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return self.format_ticks([x])[0]

    def format_ticks(self, values: Sequence[float]) -> list[str]:
        values = [float(v) for v in values]
        labels = [eng_label(v, 0) for v in values]
        for places in range(1, 4):
            if len(set(labels)) == len(set(values)):
                break
            labels = [eng_label(v, places) for v in values]
        return labels


def eng_label(value: float, places: int) -> str:
    """`value` with an SI prefix and at most `places` decimals, trailing zeros dropped: 1.5M, 200k, 1G."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    exponent = int(math.floor(math.log10(abs(value)) / 3) * 3)
    exponent = min(max(exponent, min(SI_PREFIXES)), max(SI_PREFIXES))
    mantissa = value / 10.0**exponent
    text = f"{mantissa:.{places}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if abs(float(text)) >= 1000 and exponent + 3 in SI_PREFIXES:  # 999.7k -> 1M
        return eng_label(float(text) * 10.0**exponent, places)
    return f"{text}{SI_PREFIXES[exponent]}"


def set_title(ax: Axes, text: str) -> None:
    """An axes title wrapped to the panel's width, so it never runs into a neighbour's title or labels."""
    size = FontProperties(size=mpl.rcParams["axes.titlesize"]).get_size_in_points()
    width_in = ax.get_window_extent().width / ax.figure.dpi  # before layout: the subplot's share
    ax.set_title(wrap(text, width_in, size))


def set_suptitle(fig: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width."""
    size = FontProperties(size=mpl.rcParams["figure.titlesize"]).get_size_in_points()
    fig.suptitle(wrap(text, fig.get_figwidth() * 0.95, size))


def wrap(text: str, width_in: float, fontsize: float) -> str:
    """`text` broken into lines of at most `width_in` inches at `fontsize` points (average glyph ~0.55 em)."""
    chars = max(12, int(width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))
