"""The study's answer in words, from the bit-optimality table.

A precision is worded from its key (`analysis.tidy.precision_key`): '4-bit', 'mixed 3.25-bit
(knapsack)' with the allocators of its winning curves, '4-bit +lora'; sentences of uniform studies read
as they always did.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from analysis.tidy import (
    DEFAULT_METHOD,
    NO_RECOVER,
    Precision,
    allocation_fields,
    allocator_label,
    method_label,
    precision_keys,
    precision_label,
    with_method,
)

SCOPE_WORDS = {"quantize_embeddings": "embeddings", "quantize_lm_head": "LM head"}


def format_bits(bits: float) -> str:
    """'3.1e+07 bits (3.9 MB)': total model bits with the memory it takes (1 MB = 10^6 bytes)."""
    size = bits / 8
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{bits:.2g} bits ({size / scale:.3g} {unit})"
    return f"{bits:.2g} bits ({size:.3g} B)"


def describe_curve(curve: str, info: pd.DataFrame) -> str:
    """'4-bit with dtype fp (2 exponent bits), block 64' from a curve label and the jobs' attributes;
    a method other than round-to-nearest, and a wider scope, are named ('4-bit gptq with ...'); a mixed
    allocation by its target, allocator and candidates; recovery adapters by their method."""
    rows = info[info["curve"] == curve]
    if rows.empty:
        return curve
    job = with_method(rows.iloc[:1]).iloc[0]
    if job["dtype"] == "none":
        return "the 16-bit baseline"
    alloc = allocation_fields(job)
    if alloc is not None:
        return ", ".join([_mixed_words(job, alloc), *_extras(job)])
    method = method_label(job["method"], job["method_params"])
    named = "" if method == DEFAULT_METHOD else f" {method}"
    parts = [f"{int(job['bits'])}-bit{named} with dtype {job['dtype']}"]
    if not pd.isna(job["exponent_bits"]):
        parts[0] += f" ({int(job['exponent_bits'])} exponent bits)"
    parts.append("one absmax per tensor" if pd.isna(job["block_size"]) else f"block {int(job['block_size'])}")
    return ", ".join([*parts, *_extras(job)])


def _mixed_words(job: pd.Series, alloc: dict[str, object]) -> str:
    """'mixed 3.25-bit (knapsack allocation over nf2-b64, nf4-b64) with gptq'."""
    cands = ", ".join(str(c) for c in alloc.get("candidates", []))  # type: ignore[attr-defined]
    method = "" if job["method"] == DEFAULT_METHOD else f" with {job['method']}"
    target = alloc.get("target_bits")
    bits = f"{target:g}" if isinstance(target, float | int) else "?"
    return f"mixed {bits}-bit ({allocator_label(alloc)} allocation over {cands}){method}"


def _extras(job: pd.Series) -> list[str]:
    """Proxy quantization, centering, a wider scope and recovery adapters, where a job has them."""
    parts = []
    if not pd.isna(job["outlier_fraction"]) and job["outlier_fraction"] > 0:
        parts.append(f"proxy quantization of {job['outlier_fraction'] * 100:g}% of columns")
    if bool(job["centering"]) if not pd.isna(job["centering"]) else False:
        parts.append("centering")
    parts += [f"{what} quantized too" for col, what in SCOPE_WORDS.items() if job[col]]
    recover = job.get("recover")
    if isinstance(recover, str) and recover != NO_RECOVER:
        parts.append(f"{recover} recovery adapters")
    return parts


def precision_words(key: Precision, curves: Iterable[str] = (), info: pd.DataFrame | None = None) -> str:
    """A precision in words: '4-bit'; a mixed one with the allocators of `curves` (its winning curves,
    labels of `info`): 'mixed 3.25-bit (knapsack)'; '4-bit +lora'."""
    label = precision_label(key)
    if not isinstance(key, str) or info is None:
        return label
    rows = info[info["curve"].isin(list(curves))]
    fields = [f for f in (allocation_fields(r) for _, r in rows.iterrows()) if f is not None]
    allocators = sorted({allocator_label(f) for f in fields})
    return f"{label} ({'/'.join(allocators)})" if allocators else label


def headline(optimality: pd.DataFrame, info: pd.DataFrame, metric_label: str, unit: str = "") -> list[str]:
    """One sentence per model family: what the paired test decides about the bit-optimal precision.

    A single bit width is named bit-optimal only where the paired test says its margin over every
    other bit width is decisive; otherwise the sentence names the tie set (the bit widths within the
    CI of the best). Without per-unit data it says that no paired CI is available and gives point
    estimates only. `info` maps curve labels to job attributes (the tidy table); `unit`: 'nats' or ''.
    """
    return [
        _family_headline(str(family), opt, info, metric_label, unit)
        for family, opt in optimality.groupby("model_family")
    ]


def _family_headline(family: str, opt: pd.DataFrame, info: pd.DataFrame, label: str, unit: str) -> str:
    span = (f"{family}, {label}, {len(opt)} budgets from {format_bits(opt['budget_bits'].min())} to "
            f"{format_bits(opt['budget_bits'].max())}")  # fmt: skip
    if "paired_ci" not in opt or not opt["paired_ci"].fillna(False).astype(bool).all():
        return f"{span}: {_unpaired(opt, info, unit)}"
    ties = opt["tied_bits"].map(tuple)
    alone = ties.map(len) == 1
    if alone.all() and ties.nunique() == 1:
        bits = ties.iloc[0][0]
        least = _amount(opt["other_bits_margin"].min(), unit)
        answer = (
            f"{_words(bits, opt, info)} is bit-optimal at every budget, decisively by the paired test: its "
            f"margin over the best other bit width is at least {least} ({_top_setting(opt, info)})."
        )
    else:
        parts = [_tie_phrase(t, group, info, unit) for t, group in opt.groupby(ties, sort=False)]
        answer = "no single bit width is decisively bit-optimal everywhere by the paired test: "
        answer += f"{'; '.join(parts)}."
    return f"{span}: {answer}{_baseline_phrase(opt)}"


def _words(key: Precision, opt: pd.DataFrame, info: pd.DataFrame) -> str:
    """`precision_words` of `key`, a mixed one with the allocators of its curves that win in `opt`, or
    where none wins, of its best curves there (the runner-up or the best of another bit width)."""
    curves = opt.loc[opt["winner_bits"] == key, "winner"].tolist()
    if not curves and isinstance(key, str):
        rivals = set(opt["runner_up"]) | set(opt["other_bits"].dropna())
        rows = info[info["curve"].isin(rivals)].drop_duplicates("curve")
        curves = rows.loc[(precision_keys(rows) == key).to_numpy(bool), "curve"].tolist()
    return precision_words(key, curves, info)


def _tie_phrase(tied: tuple[Precision, ...], rows: pd.DataFrame, info: pd.DataFrame, unit: str) -> str:
    where = f"{len(rows)} budget{'s' if len(rows) > 1 else ''}"
    if len(tied) == 1:
        return f"{_words(tied[0], rows, info)} alone (decisive) at {where}"
    within = _amount(rows["tie_within"].max(), unit)
    if all(not isinstance(b, str) for b in tied):  # bit widths alone: '2, 3 and 4 bits'
        return f"{_and([str(b) for b in tied])} bits tie within {within} at {where}"
    return f"{_and([_words(b, rows, info) for b in tied])} tie within {within} at {where}"


def _baseline_phrase(opt: pd.DataFrame) -> str:
    measured = opt["baseline_dominated"].dropna()
    if measured.empty:
        return ""
    dominated = int(measured.astype(bool).sum())
    if dominated == len(measured):
        return f" 16-bit dominated at every budget where it is measured ({len(measured)} of {len(opt)})."
    return (
        f" 16-bit not decisively worse at {len(measured) - dominated} of the {len(measured)} budgets "
        "where it is measured."
    )


def _unpaired(opt: pd.DataFrame, info: pd.DataFrame, unit: str) -> str:
    """The no-CI sentence: point estimates only, no winner named."""
    wins = opt["winner_bits"].value_counts()
    counts = ", ".join(f"{_words(b, opt, info)} at {n}" for b, n in wins.items())
    others = opt["other_bits_margin"].dropna() if "other_bits_margin" in opt else pd.Series(dtype=float)
    spread = (f"; the best curve of another bit width is within {_amount(others.max(), unit)} of it at each "
              f"of the {len(others)} budgets where one is measured (median {_amount(others.median(), unit)})"
              if len(others) else "")  # fmt: skip
    return (
        "no paired CI is available (these results carry no per-chunk or per-document scores), so no bit "
        f"width is named bit-optimal. Point estimates only: the best curve is {counts}{spread}."
    )


def _top_setting(opt: pd.DataFrame, info: pd.DataFrame) -> str:
    top = opt["winner"].value_counts().idxmax()
    wins = opt[opt["winner"] == top]
    decisive = int(wins["decisive"].fillna(False).astype(bool).sum())
    return (f"best setting: {describe_curve(top, info)} at {len(wins)} of {len(opt)} budgets, decisively "
            f"over every other setting at {decisive} of those")  # fmt: skip


def _amount(value: float, unit: str) -> str:
    return f"{value:.2g} {unit}".rstrip() if pd.notna(value) else "–"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def overall_line(optimality: pd.DataFrame) -> str:
    """Across all families: how many budgets each bit width has the best point estimate at, most first."""
    wins = optimality["winner_bits"].value_counts()
    parts = ", ".join(f"{precision_label(bits)} {n}" for bits, n in wins.items())
    families = optimality["model_family"].nunique()
    return (f"Across {families} model families and {len(optimality)} budgets, best point estimate per bit "
            f"width (not a test): {parts}.")  # fmt: skip
