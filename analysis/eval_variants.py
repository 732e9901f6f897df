"""Evaluation variants: how a task was scored, so that differently scored values never mix.

A perplexity row's variant is its (context_length, stride, max_tokens); an lm-eval task row's is
its (scorer, eval_limit). Where a study holds one task under more than one variant, each metric
column of that task gets the suffix `@<variant>` (see `analysis.metrics`); a task with one variant
(every study so far) keeps its plain column names. Results without these columns hold one variant.

Variant names: perplexity 'ctx<context_length>s<stride>' plus '-max<max_tokens>' when the text was
cut (e.g. 'ctx128s128', 'ctx512s256-max100000'); tasks '<scorer>' plus '-limit<eval_limit>' when
limited (e.g. 'hflm', 'fast-limit500'); a variant with none of them known is 'default'.
"""

from __future__ import annotations

import logging

import pandas as pd

from analysis.errors import AnalysisError

log = logging.getLogger(__name__)

TASK_FIELDS: tuple[str, ...] = ("scorer", "eval_limit")
PPL_FIELDS: tuple[str, ...] = ("context_length", "stride", "max_tokens")
EVAL_COLUMNS: tuple[str, ...] = (*TASK_FIELDS, *PPL_FIELDS)

Fields = tuple[str | None, int | None, int | None, int | None, int | None]  # EVAL_COLUMNS' values


def variant_name(fields: Fields) -> str:
    """The short name of one variant, e.g. 'ctx128s128' or 'fast-limit500' (see module doc)."""
    scorer, limit, context, stride, max_tokens = fields
    ppl = ("" if context is None else f"ctx{context}") + ("" if stride is None else f"s{stride}")
    parts = [
        ppl,
        "" if max_tokens is None else f"max{max_tokens}",
        "" if scorer is None else scorer,
        "" if limit is None else f"limit{limit}",
    ]
    return "-".join(p for p in parts if p) or "default"


def row_fields(rows: pd.DataFrame, is_text: pd.Series) -> list[Fields]:
    """Per row, the EVAL_COLUMNS values that define its variant: task fields are blanked on
    perplexity rows, perplexity fields on task rows; None where the results lack a column or value."""
    columns = []
    for name in EVAL_COLUMNS:
        values = rows[name] if name in rows else pd.Series(None, index=rows.index, dtype=object)
        applies = ~is_text if name in TASK_FIELDS else is_text
        convert = str if name == "scorer" else int
        pairs = zip(values, applies, strict=True)
        columns.append([convert(v) if a and not pd.isna(v) else None for v, a in pairs])
    return list(zip(*columns, strict=True))


def variant_suffixes(rows: pd.DataFrame, is_text: pd.Series) -> pd.Series:
    """Per metric row: '' where its task has one evaluation variant in `rows`, else '<variant>'.

    `is_text` marks perplexity rows (the others are lm-eval task rows).

    Raises:
        AnalysisError: two different variants of one task would get the same name.
    """
    keys = row_fields(rows, is_text)
    names = {key: variant_name(key) for key in set(keys)}
    frame = pd.DataFrame(
        {"task": rows["task"].to_numpy(), "key": keys, "name": [names[k] for k in keys]}, index=rows.index
    )
    n_keys = frame.groupby("task")["key"].transform("nunique")
    n_names = frame.groupby("task")["name"].transform("nunique")
    if (n_keys != n_names).any():
        clash = sorted(frame.loc[n_keys != n_names, "task"].unique())
        raise AnalysisError(f"tasks {clash}: two different evaluation variants would get the same name")
    split = n_keys > 1
    for task, part in frame[split].groupby("task"):
        log.info("%s: measured under %d evaluation variants (%s); its metric columns are named "
                 "<metric>@<variant> and never averaged together", task, part["name"].nunique(),
                 ", ".join(sorted(part["name"].unique())))  # fmt: skip
    return frame["name"].where(split, "")
