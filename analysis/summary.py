"""The study's answer in words, from the bit-optimality table."""

from __future__ import annotations

import pandas as pd

from analysis.optimality import CI_LEVEL
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


def headline(optimality: pd.DataFrame, info: pd.DataFrame, metric_label: str) -> list[str]:
    """One sentence per model family: the bit-optimal configuration, how often, and how sure.

    `info` maps curve labels to job attributes (columns curve, dtype, bits, exponent_bits,
    block_size, outlier_fraction, centering), e.g. the tidy table.
    """
    return [
        _family_headline(family, opt, info, metric_label)
        for family, opt in optimality.groupby("model_family")
    ]


def _family_headline(family: str, opt: pd.DataFrame, info: pd.DataFrame, metric_label: str) -> str:
    n_budgets = len(opt)
    top_curve = opt["winner"].value_counts().idxmax()
    wins = opt[opt["winner"] == top_curve]
    top_bits = int(wins["winner_bits"].iloc[0])
    bits_wins = int((opt["winner_bits"] == top_bits).sum())
    answer = (
        f"{family}: at budgets from {format_bits(opt['budget_bits'].min())} to "
        f"{format_bits(opt['budget_bits'].max())}, {describe_curve(top_curve, info)} is bit-optimal for "
        f"{metric_label} in {len(wins)} of {n_budgets} budgets ({top_bits}-bit with any setting: "
        f"{bits_wins} of {n_budgets})."
    )
    return f"{answer} {_certainty(wins)}"


def _certainty(wins: pd.DataFrame) -> str:
    """How often the winner's margin is clear of the bootstrap CI, against any rival and other widths."""
    half_width = ((wins["margin_ci_high"] - wins["margin_ci_low"]) / 2).median()
    if pd.isna(half_width):
        return f"Margins have no CI (no bootstrap draws); median margin {wins['margin'].median():.3g}."
    decisive = int(wins["decisive"].sum())
    other = wins["other_bits_decisive"] if "other_bits_decisive" in wins else pd.Series(dtype=bool)
    decisive_bits = int(other.fillna(False).astype(bool).sum())
    return (
        f"Its margin over the runner-up is clear of the bootstrap {CI_LEVEL:.0%} CI in {decisive} of those "
        f"{len(wins)} (median margin {wins['margin'].median():.3g}, median CI half-width {half_width:.3g}); "
        f"over the best other bit width, in {decisive_bits} of {len(wins)}."
    )


def overall_line(optimality: pd.DataFrame) -> str:
    """Across all families: how many budgets each bit width wins, most first."""
    wins = optimality["winner_bits"].value_counts()
    parts = ", ".join(f"{int(bits)}-bit {n}" for bits, n in wins.items())
    families = optimality["model_family"].nunique()
    return f"Across {families} model families and {len(optimality)} budgets, wins per bit width: {parts}."
