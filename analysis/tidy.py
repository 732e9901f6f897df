"""Results (one row per job, task and metric) -> one row per job, with labels for curves.

`tidy_jobs` is the table every other analysis step reads: job attributes (model, family, size,
quantization setting, bits per parameter, total model bits), the metric columns named in
`analysis.metrics`, and two labels: `setting` (the quantization setting without the bit width,
e.g. 'fp e2 B64 proxy 2%') and `curve` (bit width + setting, e.g. '4-bit fp e2 B64').
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.metrics import MEAN_ACC, se_column

log = logging.getLogger(__name__)

PAPER_TASKS: tuple[str, ...] = ("lambada_openai", "piqa", "hellaswag", "winogrande")
BASELINE_SETTING = "16-bit"
JOB_COLUMNS: tuple[str, ...] = (
    "job_key", "study", "model", "model_family", "n_params", "n_quantized_params", "n_kept_params",
    "dtype", "bits", "block_size", "exponent_bits", "outlier_fraction", "centering",
    "bits_per_param", "total_model_bits",
)  # fmt: skip
REQUIRED_COLUMNS: tuple[str, ...] = (*JOB_COLUMNS, "task", "metric", "value", "stderr", "status", "error")
PPL_PREFIXES = {"perplexity": "ppl_", "nats_per_token": "ce_", "bits_per_byte": "bpb_"}


def check_results(raw: pd.DataFrame) -> None:
    """Raise `AnalysisError` if `raw` is empty or lacks a column of the results schema."""
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise AnalysisError(
            f"results lack columns {missing}; expected the pipeline.results SCHEMA "
            f"columns {list(REQUIRED_COLUMNS)}"
        )
    if raw.empty:
        raise AnalysisError("results hold no rows")


def failed_jobs(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per failed job (any row with status 'failed'): its attributes and its error."""
    check_results(raw)
    failed = raw[raw["status"] != "ok"]
    cols = ["job_key", "model", "model_family", "dtype", "bits", "block_size", "outlier_fraction", "error"]
    return failed.drop_duplicates("job_key")[cols].sort_values(["model", "bits"]).reset_index(drop=True)


def setting_labels(jobs: pd.DataFrame) -> pd.Series:
    """The quantization setting of each job without its bit width, e.g. 'nf B64 proxy 2%'."""
    return jobs.apply(_setting_label, axis=1).astype(str)


def _setting_label(row: pd.Series) -> str:
    if row["dtype"] == "none" or (not pd.isna(row["bits"]) and int(row["bits"]) >= 16):
        return BASELINE_SETTING
    parts = [str(row["dtype"])]
    if not pd.isna(row["exponent_bits"]):
        parts.append(f"e{int(row['exponent_bits'])}")
    parts.append("per-tensor" if pd.isna(row["block_size"]) else f"B{int(row['block_size'])}")
    if _present(row["outlier_fraction"]) and row["outlier_fraction"] > 0:
        parts.append(f"proxy {row['outlier_fraction'] * 100:g}%")
    if _present(row["centering"]) and bool(row["centering"]):
        parts.append("centered")
    return " ".join(parts)


def _present(value: object) -> bool:
    return not pd.isna(value)


def curve_labels(jobs: pd.DataFrame) -> pd.Series:
    """'<bits>-bit <setting>' per job, or '16-bit' for the baseline."""
    settings = setting_labels(jobs)
    bits = jobs["bits"].astype("Int64").astype(str)
    return pd.Series(
        np.where(settings == BASELINE_SETTING, BASELINE_SETTING, bits + "-bit " + settings), index=jobs.index
    )


def acc_tasks_used(raw: pd.DataFrame, tasks: Sequence[str] = PAPER_TASKS) -> list[str]:
    """The chosen zero-shot tasks that have an 'acc' value in at least one finished job."""
    ok = raw[(raw["status"] == "ok") & (raw["metric"] == "acc")]
    present = set(ok["task"].dropna())
    return [t for t in tasks if t in present]


def tidy_jobs(raw: pd.DataFrame, tasks: Sequence[str] = PAPER_TASKS) -> pd.DataFrame:
    """One row per finished job: attributes, labels and metric columns (see `analysis.metrics`).

    Failed jobs are left out here and listed by `failed_jobs`. `mean_acc` is the mean of 'acc'
    over the chosen `tasks` that the study measured; a job lacking one of them gets NaN.

    Raises:
        AnalysisError: a column is missing, or no job finished.
    """
    check_results(raw)
    failed = set(raw.loc[raw["status"] != "ok", "job_key"])
    ok = raw[~raw["job_key"].isin(failed)]
    if ok.empty:
        raise AnalysisError(f"all {len(failed)} jobs failed; nothing to analyse")
    jobs = ok.drop_duplicates("job_key").set_index("job_key")[list(JOB_COLUMNS[1:])].copy()
    jobs["total_model_bits"] = jobs["total_model_bits"].astype(float)
    metrics = _metric_table(ok)
    jobs = jobs.join(metrics, how="left")
    jobs = _add_mean_acc(jobs, acc_tasks_used(ok, tasks))
    jobs["setting"] = setting_labels(jobs)
    jobs["curve"] = curve_labels(jobs)
    return (
        jobs.reset_index().sort_values(["model_family", "n_params", "bits", "setting"]).reset_index(drop=True)
    )


def _metric_table(ok: pd.DataFrame) -> pd.DataFrame:
    """Pivot metric rows to columns `acc_<task>`, `ppl_<set>`, `ce_<set>`, `bpb_<set>` (+ `_se`)."""
    rows = ok[ok["metric"].notna() & ok["value"].notna()]
    text_sets = set(rows.loc[rows["metric"] == "nats_per_token", "task"])
    is_text = rows["task"].isin(text_sets)
    names = pd.Series(pd.NA, index=rows.index, dtype=object)
    names[(rows["metric"] == "acc") & ~is_text] = "acc_" + rows["task"]
    for metric, prefix in PPL_PREFIXES.items():
        names[(rows["metric"] == metric) & is_text] = prefix + rows["task"]
    rows = rows.assign(column=names).dropna(subset=["column"])
    if rows.empty:
        return pd.DataFrame(index=pd.Index([], name="job_key"))
    values = rows.pivot_table(index="job_key", columns="column", values="value", aggfunc="first")
    stderr = rows.pivot_table(index="job_key", columns="column", values="stderr", aggfunc="first")
    stderr = stderr.reindex(columns=values.columns).rename(columns=se_column)
    return values.join(stderr).rename_axis(columns=None)


def _add_mean_acc(jobs: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    if not tasks:
        return jobs
    cols = [f"acc_{t}" for t in tasks]
    jobs[MEAN_ACC] = jobs[cols].mean(axis=1, skipna=False)
    se_cols = [se_column(c) for c in cols]
    jobs[se_column(MEAN_ACC)] = np.sqrt((jobs[se_cols] ** 2).sum(axis=1, min_count=len(cols))) / len(cols)
    incomplete = int(jobs[MEAN_ACC].isna().sum())
    if incomplete:
        log.warning("%d jobs lack one of the tasks %s: no mean accuracy for them", incomplete, tasks)
    return jobs


def study_grid(raw: pd.DataFrame) -> pd.DataFrame:
    """The study's grid: each axis, its distinct values, and job counts (finished / failed)."""
    check_results(raw)
    jobs = raw.drop_duplicates("job_key")
    status = raw.groupby("job_key")["status"].agg(lambda s: "failed" if (s != "ok").any() else "ok")
    axes = ["model_family", "model", "n_params", "bits", "dtype", "block_size", "exponent_bits",
            "outlier_fraction", "centering"]  # fmt: skip
    rows = [
        {
            "axis": a,
            "values": ", ".join(
                _fmt(v)
                for v in sorted(jobs[a].dropna().unique().tolist()) + ([None] if jobs[a].isna().any() else [])
            ),
        }
        for a in axes
    ]
    rows.append({"axis": "tasks", "values": ", ".join(sorted(raw["task"].dropna().unique()))})
    rows.append({"axis": "jobs finished", "values": str(int((status == "ok").sum()))})
    rows.append({"axis": "jobs failed", "values": str(int((status != "ok").sum()))})
    return pd.DataFrame(rows)


def _fmt(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
