"""The per-layer bit map of mixed allocations: which code each layer got, as a table and a figure.

A mixed job's `allocation` column (pipeline/methods/allocation.py `allocation_json`) maps each layer to
a candidate label as `QuantSpec.name` spells it (`nf3-b64`, `int8-b64`, `fp4-e2-b64`, `int4-tensor`)
or `16-bit`; the bit width is the label's leading number.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.errors import AnalysisError
from analysis.style import new_figure, set_title, styled
from analysis.tidy import allocation_fields, allocator_label, is_mixed, method_label

_LABEL_BITS = re.compile(r"^(?:16-bit|[a-z]+(\d+)(?:-.*)?)$")
BIT_MAP_COLUMNS = ["model", "method", "allocator", "target_bits", "row", "layer", "candidate", "bits"]


def candidate_bits(label: str) -> int:
    """The bit width of a candidate label: 'nf3-b64' -> 3, 'fp4-e2-b64' -> 4, '16-bit' -> 16.

    Raises:
        AnalysisError: the label has neither form.
    """
    match = _LABEL_BITS.match(label)
    if match is None:
        raise AnalysisError(
            f"candidate {label!r} is neither '<dtype><bits>-...' (e.g. 'nf3-b64') nor '16-bit'"
        )
    return 16 if match.group(1) is None else int(match.group(1))


def bit_map(tidy: pd.DataFrame, model: str) -> pd.DataFrame:
    """One row per (mixed job of `model`, layer): its candidate and bits, layers as the allocation lists
    them; `row` names the job's allocation ('rtn knapsack 3.25').

    Raises:
        AnalysisError: `model` has no mixed job.
    """
    jobs = tidy[(tidy["model"] == model) & is_mixed(tidy)]
    if jobs.empty:
        raise AnalysisError(f"model {model!r} has no mixed-precision job")
    rows = []
    for _, job in jobs.iterrows():
        alloc = allocation_fields(job)
        assert alloc is not None
        layers = alloc.get("layers", {})
        if not isinstance(layers, dict):
            raise AnalysisError(f"allocation of job {job['job_key']!r} has no layer -> candidate map")
        method = method_label(str(job["method"]))
        target = float(alloc.get("target_bits", np.nan))  # type: ignore[arg-type]
        allocator = allocator_label(alloc)
        name = f"{method} {allocator} {target:g}"
        for layer, cand in layers.items():
            rows.append([model, method, allocator, target, name, layer, cand, candidate_bits(cand)])
    return pd.DataFrame(rows, columns=BIT_MAP_COLUMNS).sort_values(["method", "allocator", "target_bits"],
                                                                   kind="stable")  # fmt: skip


def short_layer_names(layers: list[str]) -> list[str]:
    """Layer names without their common dotted prefix and a '.weight' suffix: 'layers.0.mlp.up_proj'
    -> '0.mlp.up_proj' beside the other layers of 'layers.'."""
    parts = [name.removesuffix(".weight").split(".") for name in layers]
    common = 0
    while len(parts) > 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


@styled
def plot_bit_map(table: pd.DataFrame) -> Figure:
    """Layer x allocation heat map of bits (one row per allocator and target; layers as the allocation
    lists them: sorted by name)."""
    if table.empty:
        raise AnalysisError("no layer to draw in the bit map")
    rows = list(dict.fromkeys(table["row"]))
    layers = list(dict.fromkeys(table["layer"]))
    grid = table.pivot_table(index="row", columns="layer", values="bits", aggfunc="first")
    grid = grid.reindex(index=rows, columns=layers)
    fig, (ax,) = new_figure(1)
    fig.set_size_inches(max(7.0, 0.2 * len(layers) + 4), 0.35 * len(rows) + 4.0)  # room for layer names
    ax.grid(False)
    image = ax.imshow(np.log2(grid.to_numpy(float)), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows)
    step = max(1, len(layers) // 24)
    names = short_layer_names(layers)
    ax.set_xticks(range(0, len(layers), step), [names[i] for i in range(0, len(layers), step)], rotation=90)
    ax.set_xlabel("layer")
    bits = sorted(table["bits"].unique())
    bar = fig.colorbar(image, ax=ax, ticks=np.log2(bits))
    bar.ax.set_yticklabels([f"{b}" for b in bits])
    bar.set_label("bits")
    set_title(ax, f"{table['model'].iloc[0]}: bits per layer of each mixed allocation")
    return fig
