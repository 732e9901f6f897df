"""A variant against the uniform frontier at equal total bits: the machinery of the methods sections.

Per model, a *frontier* is built from a baseline set of jobs (uniform allocation, no recovery: rtn and
gptq with int and nf codes, or the uniform points of a mixed allocation's candidates): their metric
against total model bits, reduced to its envelope (the Pareto-optimal points: no other baseline job is
both smaller and at least as good), then interpolated piecewise-linearly in log2 total model bits, as
the scaling curves are. A variant (a binary code, a mixed allocation, a recovered model) is compared
with the frontier at its *exact* total bits (block constants and adapters counted). Beyond the
frontier's smallest or largest point nothing is extrapolated: such a variant is "outside" and gets no
gain.

gain = sign x (variant − frontier), sign +1 where higher is better: positive means the variant beats
the uniform codes at its memory. Every job of one model is scored on the same chunks, so with per-unit
data (`analysis.units.JobDraws`) the frontier's replicates are the bracketing jobs' replicates
interpolated with the same weights, and the gain's CI is paired; 'decisive' where the 95% CI excludes 0.
Across models (`frontier_summary`) each model counts once (its variants of a group averaged first), and
the mean over models carries the mean of the models' paired replicates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.curves import interpolation_weights
from analysis.errors import AnalysisError
from analysis.metrics import check_metric, higher_is_better
from analysis.paired import interval
from analysis.pareto import pareto_mask
from analysis.units import JobDraws, gain_intervals

INSIDE, OUTSIDE = "inside", "outside"
GAIN_COLUMNS = ["model_family", "model", "n_params", "job_key", "total_model_bits", "value",
                "frontier_value", "position", "gain", "gain_ci_low", "gain_ci_high", "decisive",
                "frontier_jobs", "frontier_min_bits", "frontier_max_bits"]  # fmt: skip


@dataclass(frozen=True)
class Frontier:
    """One model's envelope: job keys and log2 total model bits (strictly increasing) and values."""

    job_keys: tuple[str, ...]
    log2_bits: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class FrontierGains:
    """`table`: one row per variant job (`GAIN_COLUMNS` plus the variant's own columns);
    `replicates`: (rows, 1 + n_boot) paired gain replicates, None without per-unit data."""

    table: pd.DataFrame
    replicates: np.ndarray | None


def envelope(jobs: pd.DataFrame, metric: str, higher: bool) -> Frontier:
    """The Pareto-optimal jobs of `jobs` (one model's baseline) by total model bits, cheapest first;
    flat from the last of them to the costliest baseline job (measured, and no better), so the
    frontier spans every baseline job's bits.

    Raises:
        AnalysisError: no job has a value of `metric`.
    """
    jobs = jobs.dropna(subset=[metric, "total_model_bits"])
    jobs = jobs[jobs["total_model_bits"] > 0]
    if jobs.empty:
        raise AnalysisError(f"no baseline job has a value of {metric!r}: no frontier")
    x, y = jobs["total_model_bits"].to_numpy(float), jobs[metric].to_numpy(float)
    front = jobs[pareto_mask(x, y, higher)].sort_values(
        ["total_model_bits", metric], ascending=[True, not higher]
    )
    front = front.drop_duplicates("total_model_bits")  # the better of two jobs of equal bits
    keys, bits = list(front["job_key"]), list(front["total_model_bits"].astype(float))
    values = list(front[metric].astype(float))
    if x.max() > bits[-1]:  # the best job at or below any larger budget is still the last front job
        keys, bits, values = [*keys, keys[-1]], [*bits, float(x.max())], [*values, values[-1]]
    return Frontier(tuple(keys), np.log2(bits), np.asarray(values))


def frontier_at(frontier: Frontier, total_bits: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(values, weights): the frontier interpolated linearly in log2 bits at `total_bits` (NaN outside
    its range), and the weight matrix (len(total_bits) x frontier jobs) that gives them."""
    weights = interpolation_weights(frontier.log2_bits, np.log2(np.asarray(total_bits, dtype=float)))
    return weights @ frontier.values, weights


def _weighted_draws(draws: JobDraws, keys: tuple[str, ...], weights: np.ndarray) -> np.ndarray:
    """(1 + n_boot,) the weighted sum of the jobs' replicates; NaN if a job with weight lacks units."""
    used = [(k, w) for k, w in zip(keys, weights, strict=True) if w > 0]
    if not used or any(k not in draws.index for k, _ in used):
        return np.full(draws.values.shape[1], np.nan)
    return np.sum([w * draws.values[draws.index[k]] for k, w in used], axis=0)


def frontier_gains(
    tidy: pd.DataFrame,
    metric: str,
    variants: pd.Series,
    frontier_of: Callable[[pd.Series], pd.Series],
    draws: JobDraws | None = None,
) -> FrontierGains:
    """Each variant job (`variants`: a boolean mask of `tidy`) against its model's frontier.

    `frontier_of(row)` gives the boolean mask of `tidy` whose jobs (of any model: the model is matched
    here) make the frontier of that variant row.

    Raises:
        AnalysisError: `metric` has no values, or no variant job has one.
    """
    check_metric(tidy, metric)
    higher = higher_is_better(metric)
    sign = 1.0 if higher else -1.0
    rows = tidy[variants & tidy[metric].notna()]
    if rows.empty:
        raise AnalysisError(f"no variant job has a value of {metric!r}")
    out, reps = [], []
    for _, row in rows.iterrows():
        base = tidy[frontier_of(row) & (tidy["model"] == row["model"]) & ~variants]
        record, rep = _one_gain(row, base, metric, higher, sign, draws)
        out.append(record)
        reps.append(rep)
    table = pd.DataFrame(out, index=rows.index)
    replicates = np.vstack(reps) if draws is not None and draws.n_boot > 0 else None
    ci = gain_intervals(replicates, len(table)).set_index(table.index)
    table = pd.concat([table, ci], axis=1)
    extra = [c for c in rows.columns if c not in GAIN_COLUMNS and c not in ("curve",) and c != metric]
    table = table.join(rows[extra])
    return FrontierGains(table[[*GAIN_COLUMNS, *extra]].reset_index(drop=True), replicates)


def _one_gain(
    row: pd.Series, base: pd.DataFrame, metric: str, higher: bool, sign: float, draws: JobDraws | None
) -> tuple[dict[str, object], np.ndarray]:
    n_rep = draws.values.shape[1] if draws is not None else 1
    record: dict[str, object] = {c: row[c] for c in GAIN_COLUMNS[:5]}
    record.update(value=float(row[metric]), frontier_value=np.nan, position=OUTSIDE, gain=np.nan,
                  frontier_jobs=0, frontier_min_bits=np.nan, frontier_max_bits=np.nan)  # fmt: skip
    rep = np.full(n_rep, np.nan)
    if base[metric].notna().sum() == 0:
        return record, rep
    front = envelope(base, metric, higher)
    values, weights = frontier_at(front, [float(row["total_model_bits"])])
    record.update(frontier_jobs=len(set(front.job_keys)), frontier_min_bits=float(2 ** front.log2_bits[0]),
                  frontier_max_bits=float(2 ** front.log2_bits[-1]))  # fmt: skip
    if np.isnan(values[0]):
        return record, rep
    record.update(
        frontier_value=float(values[0]), position=INSIDE, gain=sign * (float(row[metric]) - values[0])
    )
    if draws is not None and row["job_key"] in draws.index:
        rep = sign * (
            draws.values[draws.index[row["job_key"]]] - _weighted_draws(draws, front.job_keys, weights[0])
        )
    return record, rep


def frontier_summary(gains: FrontierGains, by: Sequence[str]) -> pd.DataFrame:
    """Per group of `by`: the mean over models of the gain (each model's variants in the group averaged
    first, so a model counts once), its paired CI (the models' replicates averaged the same way),
    models won, decisive wins and losses, and variants outside the frontier's range.

    Raises:
        AnalysisError: no variant lies inside its frontier's range.
    """
    table = gains.table
    if table["gain"].notna().sum() == 0:
        raise AnalysisError(
            "every variant lies outside its frontier's range of total bits: nothing to compare"
        )
    rows = []
    for key, group in table.groupby(list(by), dropna=False, sort=True):
        inside = group[group["position"] == INSIDE]
        models = inside.groupby("model")["gain"].mean()
        low = high = np.nan
        if gains.replicates is not None and not inside.empty:
            per_model = [
                np.mean(gains.replicates[np.asarray(rows)], axis=0)  # table rows = replicate rows
                for rows in inside.groupby("model").groups.values()
            ]
            per_model_reps = pd.DataFrame(per_model).mean(axis=0, skipna=False).to_numpy()
            if not np.isnan(per_model_reps).any():
                lo, hi = interval(per_model_reps[None, :])
                low, high = float(lo[0]), float(hi[0])
        decisive = inside["decisive"].dropna().astype(bool)
        wins = int((decisive & (inside.loc[decisive.index, "gain"] > 0)).sum())
        losses = int((decisive & (inside.loc[decisive.index, "gain"] < 0)).sum())
        key = key if isinstance(key, tuple) else (key,)
        rows.append({
            **dict(zip(by, key, strict=True)), "models": len(models),
            "value": inside["value"].mean(), "frontier_value": inside["frontier_value"].mean(),
            "gain": float(models.mean()) if len(models) else np.nan, "gain_ci_low": low, "gain_ci_high": high,
            "models_won": f"{int((models > 0).sum())} of {len(models)}",
            "decisive": f"{wins} wins, {losses} losses of {len(decisive)}" if len(decisive) else "no CI",
            "outside": int((group["position"] == OUTSIDE).sum()),
        })  # fmt: skip
    return pd.DataFrame(rows)
