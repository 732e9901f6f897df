"""The training-token figure: quantization degradation against training tokens."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.errors import AnalysisError
from analysis.style import bits_axis, category_color, eng_label, new_figure, set_suptitle, set_title, styled
from analysis.tokens import TOKENS

SETTING_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))  # (line, marker) per setting


@styled
def plot_degradation(deltas: pd.DataFrame, family: str) -> Figure:
    """ΔqLoss against training tokens (log x) for one family: one panel per bit width, one colour per
    model size, one line style per quantization setting (data type, block size); paired 95% CIs as
    error bars where the rows carry per-unit data.

    Raises:
        AnalysisError: no row of `family` has a token count.
    """
    fam = deltas[(deltas["model_family"] == family) & deltas[TOKENS].notna()]
    if fam.empty:
        raise AnalysisError(f"no ΔqLoss with a token count for family {family!r}")
    bits = sorted(int(b) for b in fam["bits"].unique())
    sizes = sorted(fam["n_params"].unique())
    settings = sorted(fam["setting"].unique())
    fig, axes = new_figure(len(bits))
    for ax, k in zip(axes, bits, strict=True):
        panel = fam[fam["bits"] == k]
        for (size, setting), line in panel.groupby(["n_params", "setting"], sort=True):
            style, marker = SETTING_STYLES[settings.index(setting) % len(SETTING_STYLES)]
            line = line.sort_values(TOKENS)
            x, y = line[TOKENS].to_numpy(float), line["delta"].to_numpy(float)
            color = category_color(sizes.index(size))
            label = f"{eng_label(float(size), 1)} {setting.removeprefix(f'{k}-bit ')}"
            ax.plot(x, y, linestyle=style, marker=marker, color=color, label=label)
            low, high = line["delta_ci_low"].to_numpy(float), line["delta_ci_high"].to_numpy(float)
            if np.isfinite(low).all() and np.isfinite(high).all():  # drawn as lines: a bootstrap CI need
                ax.vlines(x, low, high, color=color, linewidth=0.8)  # not contain its estimate
        ax.axhline(0.0, color="#111111", linewidth=0.7)
        bits_axis(ax, "training tokens")  # a log axis with compact labels (2.5M, 10M)
        ax.set_ylabel("ΔqLoss (nats/token)")
        set_title(ax, f"{k}-bit")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper")  # one legend: every panel has the same lines
    set_suptitle(fig, f"{family}: quantization degradation vs training tokens (colour: size; style: setting)")
    return fig
