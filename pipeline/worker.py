"""The long-lived worker: one per GPU (or CPU slot), one model resident, jobs run back to back.

`ModelWorker` is a plain class; the driver wraps it with `ray.remote` (so importing this module
costs no torch or ray). Per job it restores the pristine weights from the on-device snapshot,
quantizes in place, trains recovery adapters on the quantized model where the job asks
(`pipeline.recovery`; removed again before the job ends, trained or failed), evaluates with an
`Evaluator` built once per (model, eval spec) on the pristine weights (before the first
quantization, so the KL references it keeps are the 16-bit model's), and writes the job's rows
itself with `write_job_rows` (atomic), so nothing finished is lost if the driver dies.
A job that raises becomes one failed row carrying the exception's last traceback line.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.jobrows import JobResult, WorkerEnv, check_finite, error_line, job_rows, versions_json
from pipeline.jobs import Job
from pipeline.recovery import RecoveryReport, with_adapter_bits
from pipeline.results import STATUS_FAILED, STATUS_OK, write_job_rows
from pipeline.specs import EvalSpec, MetricValue, ModelRef, QuantReport
from pipeline.startup import log_phase, process_age

log = logging.getLogger(__name__)


def ray_placement() -> str:
    """Where Ray placed this process, e.g. "@node-1a2b3c4d/gpu0" (GPU ids as Ray assigned them, so
    fractional workers sharing a GPU show the same id); "" outside a Ray worker."""
    ray = sys.modules.get("ray")  # imported in every Ray worker process; never imported here
    if ray is None or not ray.is_initialized():
        return ""
    try:
        node = ray.get_runtime_context().get_node_id()[:8]
        gpus = ",".join(str(g) for g in ray.get_gpu_ids())
    except Exception:  # placement is a label only: never fail a worker for it
        return ""
    return f"@node-{node}" + (f"/gpu{gpus}" if gpus else "")


INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_compile_cache() -> Path:
    """Point inductor's caches (FX graphs, AOT autograd, Triton kernels) at `$KBIT_CACHE/inductor`
    unless the user set TORCHINDUCTOR_CACHE_DIR, so a rerun or a second worker on this machine reuses
    the compiled decoder blocks instead of compiling again; returns the folder used."""
    from pipeline.fingerprint import cache_base

    return Path(os.environ.setdefault(INDUCTOR_CACHE_ENV, str(cache_base() / "inductor")))


def build_facts(evaluator: Any) -> dict[str, str]:
    """An Evaluator's build phases in seconds and its `evalcache` hits, e.g. {"texts": "0.012",
    "tasks": "0.310", "cache": "wikitext2:hit,tasks:hit"}, for its `evaluator_build` line."""
    facts = {name.removesuffix("_s"): f"{s:.3f}" for name, s in evaluator.phases.items()}
    hits = [f"{name}:{'hit' if hit else 'miss'}" for name, hit in evaluator.cache_hits.items()]
    return {**facts, "cache": ",".join(hits) or "-"}


# What a worker's first job would import; imported when the worker starts instead, which (with
# `cluster.EarlyStart`) is while the driver still plans. Not lm_eval.models.huggingface (HFLM, 4.6-6.4 s
# on one H200 host, ninth session): `scorer=auto` takes it only for an architecture the fast scorer
# does not support, and imports it then.
JOB_MODULES = (
    "transformers",
    "pipeline.models",
    "pipeline.snapshot",
    "lm_eval.tasks",
    "pipeline.evals.evaluate",
    "pipeline.evals.lmeval",
    "pipeline.evals.fastscore",
    "pipeline.evals.fastmetrics",
)


def import_job_modules(names: Sequence[str] = JOB_MODULES) -> dict[str, float]:
    """Import the modules a job needs; returns the seconds each took (what an earlier one had already
    imported is not counted again). One that fails is left for the job to import (and to fail as a
    job, with its row), not the worker's start."""
    import importlib

    seconds = {}
    for name in names:
        start = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception as err:  # reported by the job that needs it
            log.warning("could not import %s when the worker started (%s)", name, error_line(err))
        seconds[name] = time.perf_counter() - start
    return seconds


class ModelWorker:
    """Keeps one model resident and runs jobs on it (wrapped as a Ray actor by the driver)."""

    def __init__(
        self, results_root: str, cpu_threads: int = 1, plugins: Sequence[str] = (), gpus_per_worker: int = 1
    ) -> None:
        start = time.perf_counter()
        before = process_age()  # Ray's process start and this module's imports, before the actor began
        use_compile_cache()
        import torch

        from pipeline.config import import_plugins

        import_plugins(plugins)  # methods (or other records) the driver's config named
        imported = time.perf_counter()
        self._results_root = Path(results_root)
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        self._n_gpus = gpus_per_worker if self._device == "cuda" else 0  # >1: the model is sharded
        if self._device == "cpu":
            torch.set_num_threads(max(1, cpu_threads))
        name = torch.cuda.get_device_name() if self._device == "cuda" else f"cpu ({platform.machine()})"
        self._env = WorkerEnv(device=name + ray_placement(), versions=versions_json())
        queried = time.perf_counter()
        self._name = f"{platform.node()}:{id(self):x}"
        self._ref: ModelRef | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._snapshot: Any = None
        self._family: str | None = None
        self._evaluators: dict[EvalSpec, Any] = {}
        self._method_cache: dict[Any, Any] = {}  # per resident model (e.g. Hessians), see QuantizeRequest
        self._calibration: dict[Any, Any] = {}  # CalibrationSpec -> token windows, per resident model
        self._dirty = False
        self._load_errors: dict[ModelRef, str] = {}
        self._first_job_of: ModelRef | None = None  # the model whose first job is still to finish
        modules = import_job_modules()
        slowest = sorted(modules, key=modules.__getitem__, reverse=True)[:3]
        done = time.perf_counter()
        log_phase(
            "worker_init", done - start, device=self._env.device.replace(" ", "_"), process=f"{before:.2f}",
            torch=f"{imported - start:.2f}", device_query=f"{queried - imported:.2f}",
            job_modules=f"{done - queried:.2f}", slowest=",".join(f"{m}:{modules[m]:.2f}" for m in slowest),
        )  # fmt: skip

    def describe(self) -> str:
        """The device this worker runs on (also forces the actor to start)."""
        return self._env.device

    def run_batch(self, jobs: Sequence[Job]) -> list[JobResult]:
        """`run` each job in order (the driver batches short jobs to save Ray's per-call cost)."""
        return [self.run(job) for job in jobs]

    def run(self, job: Job) -> JobResult:
        """Restore, quantize, evaluate and write one job; never raises for a job's own failure."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        report: QuantReport | None = None
        recovery: RecoveryReport | None = None
        try:
            timings["load_s"] = self._ensure_model(job)
            timings["restore_s"] = self._restore()
            evaluator, build_s = self._evaluator(job)  # before quantizing: it keeps 16-bit KL references
            report, timings["quantize_s"] = self._quantize(job)
            with self._adapters(job) as tuner:  # removed again however the block ends
                if tuner is not None:
                    recovery, timings["recover_s"] = self._recover(job)
                    report = with_adapter_bits(report, recovery.adapter_bits)
                metrics, eval_s = self._evaluate(evaluator)
            timings["eval_s"] = build_s + eval_s
            check_finite(metrics)
            family = self._family or job.model_family
            rows = job_rows(
                job, report, metrics, timings, self._env, family, scorer=evaluator.scorer, recovery=recovery
            )
            status, error = STATUS_OK, None
        except Exception as err:  # a job's failure is data: one failed row, the sweep goes on
            error = error_line(err)
            log.warning("job %s failed: %s", job.key[:12], error)
            self._after_failure()
            family = self._family or job.model_family
            rows = job_rows(job, report, (), timings, self._env, family, error=error, recovery=recovery)
            status = STATUS_FAILED
        try:
            write_job_rows(self._results_root / job.study, job.key, rows)
        except OSError as err:  # e.g. no shared disk on this node: the driver writes the rows
            log.warning("job %s: could not write its rows here (%s)", job.key[:12], error_line(err))
        timings["job_s"] = time.perf_counter() - start
        log.info("job %s %s in %.2fs", job.key[:12], status, timings["job_s"])
        if self._first_job_of is not None and self._first_job_of == job.model:
            self._first_job_of = None
            parts = {k.removesuffix("_s"): f"{v:.2f}" for k, v in timings.items() if k != "job_s"}
            log_phase("first_job", timings["job_s"], job=job.key[:12], status=status, **parts)
        return JobResult(job.key, status, error, tuple(rows), timings, self._name)

    def _ensure_model(self, job: Job) -> float:
        """Load `job.model` unless it is resident; returns seconds spent (0 when resident)."""
        if job.model == self._ref and self._model is not None:
            return 0.0
        if job.model in self._load_errors:
            raise RuntimeError(f"model failed to load earlier on this worker: {self._load_errors[job.model]}")
        from pipeline.memplan import job_load
        from pipeline.models import load_model
        from pipeline.models.shard import shard_budgets
        from pipeline.snapshot import place_snapshot

        self._drop_model()
        start = time.perf_counter()
        log.info("job %s loading %s", job.key[:12], job.model.name_or_path)
        try:
            budgets = shard_budgets(self._n_gpus, job.model.snapshot)  # [] unless sharded over GPUs
            self._model, self._tokenizer = load_model(job.model, self._device, budgets)
        except Exception as err:
            self._load_errors[job.model] = error_line(err)
            raise
        loaded = self._sync_elapsed(start)
        log_phase("model_load", loaded, job=job.key[:12])
        self._snapshot = place_snapshot(self._model, job.model.snapshot, job_load(job), max(self._n_gpus, 1))
        log.info("job %s pristine copy on the %s", job.key[:12], self._snapshot.where)
        self._ref = job.model
        self._family = job.model_family or getattr(self._model.config, "model_type", None)
        self._first_job_of = job.model
        elapsed = self._sync_elapsed(start)
        log_phase("snapshot", elapsed - loaded, job=job.key[:12], where=self._snapshot.where)
        return elapsed

    def _restore(self) -> float:
        if not self._dirty:
            return 0.0
        from pipeline.snapshot import restore_

        start = time.perf_counter()
        restore_(self._model, self._snapshot)
        self._dirty = False
        return self._sync_elapsed(start)

    def _quantize(self, job: Job) -> tuple[QuantReport, float]:
        from pipeline.models import quantize_model_

        start = time.perf_counter()
        self._dirty = True  # even a quantization that raises half-way leaves modified weights
        tokens = self._calibration_tokens(job)
        sparse = None
        if job.recover.sparsity:  # SQFT: the base pruned before quantization (`pipeline.sparsity`)
            from pipeline.sparsity import requantized_sparse_, sparsify_for_recovery_

            data_root = Path(job.evals.data_root)
            sparse = sparsify_for_recovery_(self._model, self._tokenizer, job.recipe, job.recover, data_root)
        report = quantize_model_(self._model, job.recipe, self._method_cache, tokens)
        if sparse is not None:
            report = requantized_sparse_(self._model, job.recipe, sparse, report)
        return report, self._sync_elapsed(start)

    @contextmanager
    def _adapters(self, job: Job) -> Iterator[Any]:
        """The job's recovery adapters attached for the block (None: it has none), then removed, so the
        resident model holds its quantized weights again (and restores to pristine) however it ends."""
        if not job.recover.enabled:
            yield None
            return
        from pipeline.recovery import attach_adapters_, detach_adapters_

        tuner = attach_adapters_(self._model, job.recover)
        try:
            yield tuner
        finally:
            detach_adapters_(self._model, tuner)

    def _recover(self, job: Job) -> tuple[RecoveryReport, float]:
        """Train the attached adapters on the job's recovery text."""
        from pipeline.models.loading import config_positions
        from pipeline.recovery import train_recovery_

        start = time.perf_counter()
        positions = config_positions(self._model.config.to_dict())
        data_root = Path(job.evals.data_root)
        recovery = train_recovery_(self._model, self._tokenizer, job.recover, data_root, positions)
        log.info(
            "job %s recovery %s: %d adapter bits", job.key[:12], job.recover.method, recovery.adapter_bits
        )
        return recovery, self._sync_elapsed(start)

    def _calibration_tokens(self, job: Job) -> Any:
        """The calibration windows of a calibrating recipe (tokenized once per model and spec)."""
        spec = job.recipe.calibration
        if spec is None:
            return None
        if spec not in self._calibration:
            from pipeline.calibration import calibration_tokens
            from pipeline.models.loading import config_positions

            positions = config_positions(self._model.config.to_dict())
            self._calibration[spec] = calibration_tokens(
                spec, self._tokenizer, Path(job.evals.data_root), positions
            )
        return self._calibration[spec]

    def _evaluator(self, job: Job) -> tuple[Any, float]:
        """The `Evaluator` of (resident model, job.evals), built on first use; call it on pristine weights."""
        start = time.perf_counter()
        if job.evals not in self._evaluators:
            from pipeline.evals.evaluate import Evaluator

            assert not self._dirty, "an Evaluator keeps the 16-bit model's KL references: build it restored"
            evaluator = self._evaluators[job.evals] = Evaluator(self._model, self._tokenizer, job.evals)
            log_phase(
                "evaluator_build", self._sync_elapsed(start), job=job.key[:12], **build_facts(evaluator)
            )
        return self._evaluators[job.evals], self._sync_elapsed(start)

    def _evaluate(self, evaluator: Any) -> tuple[list[MetricValue], float]:
        start = time.perf_counter()
        metrics = list(evaluator.run())
        return metrics, self._sync_elapsed(start)

    def _sync_elapsed(self, start: float) -> float:
        if self._device == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - start

    def _after_failure(self) -> None:
        """Free what a failed job may have left (CUDA OOM); a failed restore forces a reload."""
        if self._device == "cuda":
            import torch

            torch.cuda.empty_cache()
        if self._dirty and self._model is not None:
            try:
                self._restore()
            except Exception as err:
                log.warning("restore after a failure failed (%s); the model will reload", error_line(err))
                self._drop_model()

    def _drop_model(self) -> None:
        self._ref = self._model = self._tokenizer = self._snapshot = self._family = None
        self._evaluators.clear()
        self._method_cache.clear()
        self._calibration.clear()
        self._dirty = False
