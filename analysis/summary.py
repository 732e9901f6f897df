"""The study's answer in words, from the bit-optimality table."""

from __future__ import annotations

import pandas as pd

from analysis.tidy import DEFAULT_METHOD, method_label, with_method

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
    a method other than round-to-nearest, and a wider scope, are named ('4-bit gptq with ...')."""
    rows = info[info["curve"] == curve]
    if rows.empty:
        return curve
    job = with_method(rows.iloc[:1]).iloc[0]
    if job["dtype"] == "none":
        return "the 16-bit baseline"
    method = method_label(job["method"], job["method_params"])
    named = "" if method == DEFAULT_METHOD else f" {method}"
    parts = [f"{int(job['bits'])}-bit{named} with dtype {job['dtype']}"]
    if not pd.isna(job["exponent_bits"]):
        parts[0] += f" ({int(job['exponent_bits'])} exponent bits)"
    parts.append("one absmax per tensor" if pd.isna(job["block_size"]) else f"block {int(job['block_size'])}")
    if not pd.isna(job["outlier_fraction"]) and job["outlier_fraction"] > 0:
        parts.append(f"proxy quantization of {job['outlier_fraction'] * 100:g}% of columns")
    if bool(job["centering"]) if not pd.isna(job["centering"]) else False:
        parts.append("centering")
    parts += [f"{what} quantized too" for col, what in SCOPE_WORDS.items() if job[col]]
    return ", ".join(parts)


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
        return f"{span}: {_unpaired(opt, unit)}"
    ties = opt["tied_bits"].map(tuple)
    alone = ties.map(len) == 1
    if alone.all() and ties.nunique() == 1:
        bits = ties.iloc[0][0]
        least = _amount(opt["other_bits_margin"].min(), unit)
        answer = (
            f"{bits}-bit is bit-optimal at every budget, decisively by the paired test: its margin "
            f"over the best other bit width is at least {least} ({_top_setting(opt, info)})."
        )
    else:
        parts = [_tie_phrase(t, group, unit) for t, group in opt.groupby(ties, sort=False)]
        answer = "no single bit width is decisively bit-optimal everywhere by the paired test: "
        answer += f"{'; '.join(parts)}."
    return f"{span}: {answer}{_baseline_phrase(opt)}"


def _tie_phrase(tied: tuple[int, ...], rows: pd.DataFrame, unit: str) -> str:
    where = f"{len(rows)} budget{'s' if len(rows) > 1 else ''}"
    if len(tied) == 1:
        return f"{tied[0]}-bit alone (decisive) at {where}"
    within = _amount(rows["tie_within"].max(), unit)
    return f"{_and([str(b) for b in tied])} bits tie within {within} at {where}"


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


def _unpaired(opt: pd.DataFrame, unit: str) -> str:
    """The no-CI sentence: point estimates only, no winner named."""
    wins = opt["winner_bits"].value_counts()
    counts = ", ".join(f"{int(b)}-bit at {n}" for b, n in wins.items())
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
    parts = ", ".join(f"{int(bits)}-bit {n}" for bits, n in wins.items())
    families = optimality["model_family"].nunique()
    return (f"Across {families} model families and {len(optimality)} budgets, best point estimate per bit "
            f"width (not a test): {parts}.")  # fmt: skip
