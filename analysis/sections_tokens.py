"""The report's "Training tokens" section: degradation per token count, its two laws, and the
bit-optimal precision per token budget (`analysis.tokens` holds the analysis itself)."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from analysis.answer import optimality_table
from analysis.errors import AnalysisError
from analysis.plots_tokens import plot_degradation
from analysis.render import Block, Section
from analysis.sections import Study, paired_note, slug, study_draws
from analysis.tidy import tidy_jobs
from analysis.tokens import (
    LAW_TITLES,
    LAWS,
    TOKENS,
    dropped_note,
    fit_token_laws,
    has_token_axis,
    quantization_deltas,
    token_counts,
)

TOKENS_TITLE = "Training tokens"
TOKENS_TEXT = (
    "ΔqLoss: the quantized job's loss minus the loss of the 16-bit baseline of the same ladder member "
    "(same size, same training tokens), in nats per token. Both laws are fit per family and setting in "
    "log space, to the rows with ΔqLoss > 0: Ouyang et al. (2024) ΔqLoss = k·D^β / (N^α·P^γ), and "
    "Kumar et al.'s (2024) post-training term δ_PTQ = C_T·(D^γ_D / N^γ_N)·e^(−P/γ_post); D: training "
    "tokens, N: parameters in quantized matrices (non-embedding), P: bits. Intervals: model-level "
    "bootstrap over sizes ({n_boot} replicates; a size's members are one training run, one cluster); "
    "with fewer than 3 sizes no interval is given. r2_log / rmse_log: fit quality of log ΔqLoss."
)
OPTIMALITY_BY_TOKENS_COLUMNS = [TOKENS, "model_family", "budget_bits", "winner", "margin", "decisive",
                                "tied_bits"]  # fmt: skip


def has_tokens(study: Study) -> bool:
    """Whether the study varies training tokens (only then does the report have this section)."""
    return has_token_axis(study.raw)


def tokens_section(study: Study) -> Section:
    """Degradation vs training tokens (table, figure), both laws' fits, bit-optimality per token count."""
    if study.loss is None:
        raise AnalysisError("no perplexity text set, so no loss in nats to measure degradation with")
    tidy = tidy_jobs(study.raw, study.acc_tasks)  # every member; `study.tidy` keeps the largest only
    deltas = quantization_deltas(tidy, study.loss, study_draws(study, study.loss))
    fits = fit_token_laws(deltas, n_boot=study.n_boot, seed=study.seed)
    blocks = [
        Block(text=TOKENS_TEXT.format(n_boot=study.n_boot)),
        Block(text=paired_note(study_draws(study, study.loss))),
        Block(table=deltas.drop(columns=["job_key", "baseline_keys"]), name="ΔqLoss per job"),
        *(Block(figure=plot_degradation(deltas, f), name=f"tokens-{slug(f)}")
          for f in sorted(deltas["model_family"].unique())),
        Block(text=dropped_note(deltas)),
        *(Block(gap=f"{r.model_family} / {r.setting} / {r.law}: {r.reason}")
          for r in fits.skipped.itertuples()),
    ]  # fmt: skip
    for law in LAWS:
        params = fits.params[fits.params["law"] == law]
        if not params.empty:
            blocks.append(Block(table=params, name=f"{LAW_TITLES[law]}: parameters with 95% CIs"))
            blocks.append(
                Block(table=fits.quality[fits.quality["law"] == law], name=f"{LAW_TITLES[law]}: fit")
            )
    return Section(TOKENS_TITLE, (*blocks, *_optimality_blocks(study, tidy)))


def optimality_by_tokens(study: Study, tidy: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The bit-optimality table of the headline metric for each token count on its own (every size's
    member at that count), and a gap per token count where none could be built."""
    tables, gaps = [], []
    for tokens in token_counts(tidy):
        subset = replace(study, tidy=tidy[tidy[TOKENS] == tokens].reset_index(drop=True))
        try:
            tables.append(optimality_table(subset).assign(**{TOKENS: tokens}))
        except AnalysisError as err:
            gaps.append(f"{tokens:,} tokens: {err}")
    return (pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()), gaps


def wins_per_tokens(table: pd.DataFrame) -> pd.DataFrame:
    """Per (token count, family): how many budgets each bit width wins, and how many decisively."""
    rows = []
    for (tokens, family), part in table.groupby([TOKENS, "model_family"], sort=True):
        wins = part["winner_bits"].astype(int).value_counts().sort_index()
        decisive = part.loc[part["decisive"].eq(True), "winner_bits"].astype(int).value_counts()
        rows.append({TOKENS: tokens, "model_family": family, "budgets": len(part),
                     "most_wins_bits": int(wins.idxmax()),
                     "wins": ", ".join(f"{b}-bit: {n} ({int(decisive.get(b, 0))} decisive)"
                                       for b, n in wins.items())})  # fmt: skip
    return pd.DataFrame(rows)


def _optimality_blocks(study: Study, tidy: pd.DataFrame) -> list[Block]:
    table, gaps = optimality_by_tokens(study, tidy)
    blocks = [Block(gap=g) for g in gaps]
    if table.empty:
        return blocks
    shown = table[OPTIMALITY_BY_TOKENS_COLUMNS].copy()
    shown["tied_bits"] = shown["tied_bits"].map(
        lambda t: ", ".join(map(str, t)) if isinstance(t, tuple) else None
    )
    return [
        *blocks,
        Block(text="Bit-optimal precision per token budget: the bit-optimality analysis of the section "
                   "'Bit-optimal precision per memory budget', run on each token count's members alone."),
        Block(table=wins_per_tokens(table), name="Budgets won per bit width, per training-token count"),
        Block(table=shown, name="Bit-optimality per training-token count"),
    ]  # fmt: skip
