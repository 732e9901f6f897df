"""The report's sections at equal total bits: binary codes, mixed precision and recovery, each against
the uniform frontier of `analysis.frontier` (shown only where the study has such rows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pandas as pd

from analysis.answer import optimality_table
from analysis.errors import AnalysisError
from analysis.frontier import FrontierGains, frontier_gains, frontier_summary
from analysis.metrics import metric_label
from analysis.plots_methods import bit_map, plot_bit_map
from analysis.render import Block, Section
from analysis.sections import Study, paired_note, slug, study_draws
from analysis.tidy import allocation_fields, allocator_label, is_mixed, is_recovered

BINARY_TITLE = "Binary codes at equal bits"
MIXED_TITLE = "Mixed vs uniform at equal bits"
RECOVERY_TITLE = "Recovery at equal total bits"
BINARY_METHODS, BINARY_DTYPES = ("bcq", "shiftadd"), ("bcq",)
BASE_METHODS, BASE_DTYPES = ("rtn", "gptq"), ("int", "nf")
FRONTIER_TEXT = (
    "Frontier: per model, the envelope of {base} (the jobs no other of them beats at fewer or equal total "
    "bits), interpolated linearly in log2 total model bits at each variant's exact total bits (block "
    "constants and adapters counted); never extrapolated: a variant beyond the frontier's range is "
    "'outside' and gets no gain. gain: frontier minus variant for a loss (variant minus frontier for an "
    "accuracy): positive means the variant beats uniform codes at its memory. Per group, each model "
    "counts once (its variants averaged first); the mean over models carries their paired replicates. "
)
WINNER_COLUMNS = ["subset", "model_family", "budget_bits", "winner", "runner_up", "margin", "decisive",
                  "tied_bits"]  # fmt: skip


def _metric(study: Study) -> str:
    """The loss where the study has one (the issues ask at equal bits of loss), else the headline metric."""
    metric = study.loss or study.metric
    if metric is None:
        raise AnalysisError("no finished job with a metric value")
    return metric


def uniform_plain(tidy: pd.DataFrame) -> pd.Series:
    """Quantized jobs with one code for every layer and no recovery adapters."""
    return (tidy["bits"] < 16) & ~is_mixed(tidy) & ~is_recovered(tidy)


def code_label(row: pd.Series) -> str:
    """A uniform job's codes as a candidate label spells them: 'nf3-b64', 'fp4-e2-b64', '16-bit'."""
    if row["bits"] >= 16:
        return "16-bit"
    e = "" if pd.isna(row["exponent_bits"]) else f"-e{int(row['exponent_bits'])}"
    block = "tensor" if pd.isna(row["block_size"]) else f"b{int(row['block_size'])}"
    return f"{row['dtype']}{int(row['bits'])}{e}-{block}"


def _gains_blocks(gains: FrontierGains, by: list[str], base: str, note: str, name: str) -> list[Block]:
    cols = [c for c in [*by, "model", "total_model_bits", "value", "frontier_value", "position", "gain",
                        "gain_ci_low", "gain_ci_high", "decisive", "frontier_min_bits", "frontier_max_bits"]
            if c in gains.table]  # fmt: skip
    try:
        summary = Block(table=frontier_summary(gains, by), name=f"{name}: mean over models")
    except AnalysisError as err:  # every variant outside: the per-model rows still say where each lies
        summary = Block(gap=f"{name}: {err}")
    return [
        Block(text=FRONTIER_TEXT.format(base=base) + note),
        summary,
        Block(table=gains.table[cols], name=f"{name}: per model"),
    ]


def winners_by_subset(study: Study, subsets: dict[str, pd.Series]) -> pd.DataFrame:
    """The bit-optimality winners per family and budget, for the study's jobs restricted to each subset
    (the 16-bit baseline always kept); a subset without two curves at a budget is left out."""
    tidy = study.require_tidy()
    tables = []
    for name, mask in subsets.items():
        sub = dataclasses.replace(study, tidy=tidy[mask | (tidy["bits"] >= 16)])
        try:
            table = optimality_table(sub)
        except AnalysisError:
            continue
        tables.append(table.assign(subset=name))
    if not tables:
        raise AnalysisError("no subset has a memory budget covered by two or more curves")
    out = pd.concat(tables, ignore_index=True)
    out["tied_bits"] = out["tied_bits"].map(
        lambda t: ", ".join(map(str, t)) if isinstance(t, tuple) else None
    )
    return out[[c for c in WINNER_COLUMNS if c in out]]


def has_binary(study: Study) -> bool:
    """Whether the study holds a binary-code job (bcq or shiftadd)."""
    tidy = study.tidy
    return tidy is not None and bool(_binary(tidy).any())


def _binary(tidy: pd.DataFrame) -> pd.Series:
    return (tidy["method"].isin(BINARY_METHODS) | tidy["dtype"].isin(BINARY_DTYPES)) & uniform_plain(tidy)


def binary_section(study: Study) -> Section:
    """bcq / shiftadd at 2 and 3 bits against the int / nf frontier of rtn and gptq; bit-optimality with
    and without binary codes."""
    tidy = study.require_tidy()
    metric = _metric(study)
    draws = study_draws(study, metric)
    base = uniform_plain(tidy) & tidy["method"].isin(BASE_METHODS) & tidy["dtype"].isin(BASE_DTYPES)
    variants = _binary(tidy) & tidy["bits"].isin([2, 3])
    gains = frontier_gains(tidy, metric, variants, lambda row: base, draws)
    base_text = "rtn and gptq with int and nf codes (uniform)"
    name = f"{metric_label(metric)}: binary codes vs the frontier"
    blocks = _gains_blocks(gains, ["setting", "bits"], base_text, paired_note(draws), name)
    blocks += _winner_blocks(study, {"int and nf": base, "int and nf + binary codes": base | _binary(tidy)})
    return Section(BINARY_TITLE, tuple(blocks))


def _winner_blocks(study: Study, subsets: dict[str, pd.Series]) -> list[Block]:
    try:
        table = winners_by_subset(study, subsets)
    except AnalysisError as err:
        return [Block(gap=f"bit-optimal precision per subset: {err}")]
    return [Block(table=table, name=f"Bit-optimal precision ({metric_label(study.metric or '')}) per subset "
                                    "of jobs: does the winner move?")]  # fmt: skip


def has_mixed(study: Study) -> bool:
    """Whether the study holds a mixed-precision job."""
    return study.tidy is not None and bool(is_mixed(study.tidy).any())


def _mixed_frontier(tidy: pd.DataFrame) -> Callable[[pd.Series], pd.Series]:
    """The uniform jobs of a mixed row's method whose codes are among its candidates (16-bit included)."""
    labels = tidy.apply(code_label, axis=1)
    plain = uniform_plain(tidy) | (tidy["bits"] >= 16)

    def frontier_of(row: pd.Series) -> pd.Series:
        alloc = allocation_fields(row) or {}
        cands = set(alloc.get("candidates", []))  # type: ignore[call-overload]
        same = (tidy["method"] == row["method"]) | (tidy["bits"] >= 16)
        return plain & same & labels.isin(cands)

    return frontier_of


def mixed_section(study: Study) -> Section:
    """Per target, each allocator against the uniform frontier of its candidates and method; bit maps."""
    tidy = study.require_tidy()
    metric = _metric(study)
    draws = study_draws(study, metric)
    mixed = is_mixed(tidy) & ~is_recovered(tidy)
    fields = tidy[mixed].apply(allocation_fields, axis=1)
    tidy = tidy.assign(allocator=fields.map(allocator_label),
                       target_bits=fields.map(lambda a: float(a.get("target_bits", np.nan))))  # fmt: skip
    gains = frontier_gains(tidy, metric, mixed, _mixed_frontier(tidy), draws)
    blocks = _gains_blocks(gains, ["method", "target_bits", "allocator"],
                           "the uniform jobs of the same method at the allocation's candidate codes",
                           paired_note(draws), f"{metric_label(metric)}: mixed vs uniform")  # fmt: skip
    model = tidy[mixed].sort_values("n_params")["model"].iloc[-1]  # the largest model with mixed jobs
    blocks.append(Block(figure=plot_bit_map(bit_map(tidy, model)), name=f"bit-map-{slug(model)}"))
    return Section(MIXED_TITLE, tuple(blocks))


def has_recovery(study: Study) -> bool:
    """Whether the study holds a job with recovery adapters."""
    return study.tidy is not None and bool(is_recovered(study.tidy).any())


def recovery_section(study: Study) -> Section:
    """Recovered jobs against the frontier of the same method without recovery (adapter bits counted),
    and the bit-optimal precision per recover method."""
    tidy = study.require_tidy()
    metric = _metric(study)
    draws = study_draws(study, metric)
    variants = is_recovered(tidy) & ~is_mixed(tidy)
    plain = uniform_plain(tidy)
    gains = frontier_gains(
        tidy, metric, variants, lambda row: plain & (tidy["method"] == row["method"]), draws
    )
    base_text = "the same method's uniform jobs without recovery"
    name = f"{metric_label(metric)}: recovered vs the frontier"
    blocks = _gains_blocks(gains, ["recover", "setting"], base_text, paired_note(draws), name)
    recover = tidy["recover"].fillna("none")
    subsets = {str(r): (recover == r) & ~is_mixed(tidy) for r in sorted(recover[tidy["bits"] < 16].unique())}
    blocks += _winner_blocks(study, subsets)
    return Section(RECOVERY_TITLE, tuple(blocks))
