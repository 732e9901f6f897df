"""Is an accuracy distinguishable from chance? Metrics at chance carry no signal and stay out of the Answer.

A zero-shot task's chance rate is the accuracy of guessing (1 / number of choices; 0 for LAMBADA's
open-ended continuation); a mean accuracy's is the mean of its tasks'. Per model family, each job's
z = (accuracy − chance) / standard error; the metric is distinguishable from chance when the best job
clears the one-sided critical z at `ALPHA`, Bonferroni-corrected for the number of jobs looked at (the
best of many jobs is above chance by luck alone). Without standard errors there is no test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

from analysis.metrics import MEAN_ACC, metric_columns, se_column, split_variant

CHANCE_RATES: dict[str, float] = {
    "lambada_openai": 0.0,
    "piqa": 0.5,
    "hellaswag": 0.25,
    "winogrande": 0.5,
    "arc_easy": 0.25,
    "arc_challenge": 0.25,
}
ALPHA = 0.05
CHANCE_COLUMNS = ["metric", "model_family", "chance", "n_jobs", "best_value", "best_z", "z_critical",
                  "tested", "at_chance"]  # fmt: skip


def chance_rate(metric: str, tasks: Sequence[str]) -> float | None:
    """The chance accuracy of an accuracy column (`mean_acc` over `tasks`, `acc_<task>`); None if the
    column is no accuracy or a task's chance rate is unknown."""
    base = split_variant(metric)[0]
    if base == MEAN_ACC:
        rates = [CHANCE_RATES[t] for t in tasks if t in CHANCE_RATES]
        return float(np.mean(rates)) if rates and len(rates) == len(tasks) else None
    return CHANCE_RATES.get(base[len("acc_") :]) if base.startswith("acc_") else None


def chance_test(tidy: pd.DataFrame, metric: str, tasks: Sequence[str]) -> pd.DataFrame:
    """Per model family, whether `metric` is distinguishable from chance (columns `CHANCE_COLUMNS`);
    empty for a metric without a chance rate."""
    chance = chance_rate(metric, tasks)
    if chance is None or metric not in tidy:
        return pd.DataFrame(columns=CHANCE_COLUMNS)
    rows = []
    for family, jobs in tidy[tidy[metric].notna()].groupby("model_family", sort=True):
        value = jobs[metric].to_numpy(float)
        se = jobs[se_column(metric)] if se_column(metric) in jobs else pd.Series(np.nan, index=jobs.index)
        se = se.to_numpy(float)
        z = _z_scores(value, se, chance)
        tested = bool(np.isfinite(se).any())
        z_critical = float(norm.isf(ALPHA / len(jobs)))
        best = int(np.nanargmax(np.where(np.isnan(z), -np.inf, z))) if tested else int(np.argmax(value))
        rows.append({
            "metric": metric, "model_family": family, "chance": chance, "n_jobs": len(jobs),
            "best_value": float(value[best]), "best_z": float(z[best]) if tested else np.nan,
            "z_critical": z_critical, "tested": tested, "at_chance": tested and not z[best] > z_critical,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=CHANCE_COLUMNS)


def _z_scores(value: np.ndarray, se: np.ndarray, chance: float) -> np.ndarray:
    """(value − chance) / se; ±inf where se is 0 and the value is off chance, NaN where se is unknown."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (value - chance) / se
    return np.where(se == 0, np.where(value > chance, np.inf, -np.inf), z)


def accuracy_chance_table(tidy: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """`chance_test` of every accuracy column of a tidy table (mean and per task)."""
    tables = [chance_test(tidy, c, tasks) for c in metric_columns(tidy) if chance_rate(c, tasks) is not None]
    tables = [t for t in tables if not t.empty]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=CHANCE_COLUMNS)


def at_chance_families(tidy: pd.DataFrame, metric: str, tasks: Sequence[str]) -> set[str]:
    """The model families in which `metric` was tested and is not distinguishable from chance."""
    table = chance_test(tidy, metric, tasks)
    return set(table.loc[table["at_chance"].astype(bool), "model_family"])
