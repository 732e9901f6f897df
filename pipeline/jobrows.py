"""What a job's result looks like: its rows (one per metric, or one failed row) with the columns every row
of the job shares, the evaluation settings behind each metric, and what a worker sends back
(`JobResult`). The driver builds the failed rows of jobs that never reached a worker with the same
code the workers use (`pipeline.dispatch`).
"""

from __future__ import annotations

import json
import math
import platform
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.jobs import Job
from pipeline.ladders.train import member_train_tokens
from pipeline.recovery import RecoveryReport
from pipeline.results import STATUS_FAILED, STATUS_OK
from pipeline.specs import EvalSpec, MetricValue, QuantReport


@dataclass(frozen=True)
class JobResult:
    """What a worker sends back: small, plus the rows so a driver without the worker's disk can write them."""

    key: str
    status: str
    error: str | None
    rows: tuple[Mapping[str, Any], ...]
    timings: Mapping[str, float] = field(default_factory=dict)  # load_s, restore_s, quantize_s, eval_s, job_s
    worker: str = ""


@dataclass(frozen=True)
class WorkerEnv:
    """Facts about the worker that go into every row."""

    device: str
    versions: str  # JSON


def error_line(err: BaseException) -> str:
    """The last line of the exception's traceback, e.g. "ValueError: bits must be in 3..16"."""
    return traceback.format_exception_only(type(err), err)[-1].strip()


def job_columns(
    job: Job, report: QuantReport | None, family: str | None, recovery: RecoveryReport | None = None
) -> dict[str, Any]:
    """The columns a job's rows share (what was run and how many bits it cost, adapters included)."""
    recipe = job.recipe
    spec = recipe.spec
    return {
        "job_key": job.key,
        "study": job.study,
        "model": job.model_label or job.model.name_or_path,
        "model_family": family,
        "n_params": report.n_params if report else None,
        "train_tokens": member_train_tokens(job.model.name_or_path),  # None unless a ladder member
        "n_quantized_params": report.n_quantized_params if report else None,
        "n_kept_params": report.n_kept_params if report else None,
        "method": recipe.method,
        "method_params": recipe.params_json,
        "dtype": recipe.dtype,
        "bits": recipe.bits,
        "block_size": recipe.block_size,
        "exponent_bits": None if spec is None else spec.resolved_exponent_bits,  # None unless fp
        "outlier_fraction": recipe.outlier_fraction,
        "centering": recipe.centering,
        "quantize_embeddings": recipe.quantize_embeddings,
        "quantize_lm_head": recipe.quantize_lm_head,
        "calibration": None if report is None else report.calibration,
        "allocation": None if report is None else report.allocation,
        "bits_per_param": report.bits_per_param if report else None,
        "total_model_bits": report.total_model_bits if report else None,
        "recover": job.recover.method,
        "recover_params": None if recovery is None else recovery.recover_json(job.recover),
        "adapter_bits": 0 if not job.recover.enabled else (recovery.adapter_bits if recovery else None),
        "job_json": job.job_json,
    }


def job_rows(
    job: Job,
    report: QuantReport | None,
    metrics: Sequence[MetricValue],
    timings: Mapping[str, float],
    env: WorkerEnv,
    family: str | None = None,
    error: str | None = None,
    scorer: str | None = None,
    recovery: RecoveryReport | None = None,
) -> list[dict[str, Any]]:
    """One row per metric (status ok), or a single failed row when `error` is set; `scorer` is the one
    the Evaluator used on lm-eval task rows (None: `job.evals.scorer`)."""
    shared = {
        **job_columns(job, report, family, recovery),
        **{k: timings.get(k) for k in ("load_s", "restore_s", "quantize_s", "recover_s", "eval_s")},
        "device": env.device,
        "versions": env.versions,
        "created_at": datetime.now(UTC),
    }
    if error is not None:
        return [{**shared, "status": STATUS_FAILED, "error": error}]
    return [
        {
            **shared,
            **eval_columns(job.evals, m.task, scorer),
            "task": m.task,
            "metric": m.metric,
            "value": m.value,
            "stderr": m.stderr,
            "n_examples": m.n_examples,
            "unit_sums": None if m.unit_sums is None else list(m.unit_sums),
            "unit_counts": None if m.unit_counts is None else list(m.unit_counts),
            "status": STATUS_OK,
            "error": None,
        }
        for m in metrics
    ]


def eval_columns(evals: EvalSpec, task: str, scorer: str | None = None) -> dict[str, Any]:
    """The evaluation settings behind one task's numbers: window settings on a perplexity set's rows,
    the scorer used (`scorer`, else `evals.scorer`) and example limit on an lm-eval task's rows (the
    others null)."""
    for ppl in evals.perplexity:
        if ppl.name == task:
            return {"context_length": ppl.context_length, "stride": ppl.stride, "max_tokens": ppl.max_tokens}
    return {"scorer": scorer or evals.scorer, "eval_limit": evals.limit}


def check_finite(metrics: Sequence[MetricValue]) -> None:
    """Raise FloatingPointError on NaN/inf metrics (a diverged or corrupt model is a failed job)."""
    bad = [f"{m.task}/{m.metric}={m.value}" for m in metrics if not math.isfinite(m.value)]
    if bad:
        raise FloatingPointError(f"non-finite metrics: {', '.join(bad)}")


def versions_json() -> str:
    """Package versions of this process, as sorted JSON."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {"python": platform.python_version()}
    for name in ("kbitscale", "torch", "transformers", "lm_eval", "ray"):
        try:
            found[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            found[name] = "unknown"
    return json.dumps(found, sort_keys=True)
