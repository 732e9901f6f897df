"""Fan jobs out over Ray worker actors with model affinity, retries and progress.

The driver keeps `in_flight_per_worker` calls queued on each actor, so an actor never waits for
the driver; a call carries one job, or a batch of about BATCH_S seconds of work when jobs are short
(Ray's per-call cost, ~1-5 ms, would otherwise dominate). It hands each actor jobs of the model
it already holds, and moves an idle actor to the model with the most pending jobs per actor
already on it. A job whose actor dies is put back and runs elsewhere (or on the restarted actor);
after `max_attempts` deaths it is recorded as failed. A dead actor gets no work until a `describe`
probe answers (Ray restarted it); the probe never blocks the loop, so a lost node (whose actors
cannot be placed again while the other nodes' GPUs are taken) costs no time: the others go on.
Calls to an actor that Ray lists as not alive (its node died) may never return, so every HEALTH_S
the driver reads Ray's actor table and treats such an actor's calls as failed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import RayConfig
from pipeline.jobs import Job
from pipeline.progress import Progress
from pipeline.results import job_path, write_job_rows
from pipeline.specs import ModelRef
from pipeline.worker import JobResult, WorkerEnv, job_rows

log = logging.getLogger(__name__)

BATCH_S = 0.25  # short jobs travel in batches of about this many seconds of work per call
MAX_BATCH = 64  # at most this many jobs per call (all are retried if the worker dies)
HEALTH_S = 5.0  # how often the driver asks Ray's actor table whether busy actors are still alive
PROBE_S = 120.0  # a dead actor that does not answer within this long (restarts re-import torch) stays dead


class Scheduler:
    """Which job each worker runs next: stay on the resident model, else join the busiest model."""

    def __init__(self, jobs: Sequence[Job], n_workers: int) -> None:
        self.pending: dict[ModelRef, deque[Job]] = {}
        for job in jobs:
            self.pending.setdefault(job.model, deque()).append(job)
        self.model_of: list[ModelRef | None] = [None] * n_workers
        self.workers_on: Counter[ModelRef] = Counter()

    def has_pending(self) -> bool:
        return any(self.pending.values())

    def next_for(self, worker: int) -> Job | None:
        """The next job for `worker`, or None when nothing is pending."""
        current = self.model_of[worker]
        if current is None or not self.pending.get(current):
            target = self._busiest_model()
            if target is None:
                return None
            if current is not None:
                self.workers_on[current] -= 1
            self.workers_on[target] += 1
            self.model_of[worker] = current = target
        return self.pending[current].popleft()

    def requeue(self, job: Job) -> None:
        """Put `job` back at the front of its model's queue."""
        self.pending.setdefault(job.model, deque()).appendleft(job)

    def _busiest_model(self) -> ModelRef | None:
        waiting = [(len(q) / (1 + self.workers_on[m]), m) for m, q in self.pending.items() if q]
        return max(waiting, key=lambda pair: pair[0])[1] if waiting else None


@dataclass(frozen=True)
class WorkerPlan:
    """How many worker actors to start and the Ray options of each."""

    count: int
    options: dict[str, Any]
    cpu_threads: int


def plan_workers(cfg: RayConfig, resources: dict[str, float], n_jobs: int) -> WorkerPlan:
    """Worker actors for the cluster's resources: per GPU (fractional with workers_per_gpu) or per CPUs."""
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if gpus > 0:
        count = int(gpus * cfg.workers_per_gpu + 1e-9)
        options: dict[str, Any] = {"num_gpus": 1.0 / cfg.workers_per_gpu, "num_cpus": 0}
    else:
        count = int(cpus // cfg.cpus_per_worker)
        options = {"num_gpus": 0, "num_cpus": cfg.cpus_per_worker}
    count = min(count, cfg.max_workers or count, max(n_jobs, 1))
    if count < 1:
        raise RuntimeError(f"the Ray cluster has no room for a worker (resources: {resources})")
    return WorkerPlan(count, options, cfg.cpus_per_worker)


def connect(cfg: RayConfig) -> bool:
    """Start the embedded local cluster (address None) or join one; True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if cfg.address is None:
        kwargs.update(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    # "local" always starts a new embedded cluster: a bare ray.init() would join any cluster already
    # running on this machine (or RAY_ADDRESS), which is what ray.address=auto is for.
    ray.init(address=cfg.address or "local", **kwargs)
    return True


def start_workers(
    plan: WorkerPlan,
    results_root: Path,
    max_restarts: int,
    worker_cls: Any = None,
    plugins: Sequence[str] = (),
) -> list[Any]:
    """Create the worker actors (default class: `pipeline.worker.ModelWorker`); each imports `plugins`."""
    import ray

    from pipeline.worker import ModelWorker

    quiet = {"TQDM_DISABLE": os.environ.get("TQDM_DISABLE", "1")}  # no progress bars from every worker
    actor = ray.remote(worker_cls or ModelWorker).options(
        **plan.options, max_restarts=max_restarts, runtime_env={"env_vars": quiet}
    )
    return [actor.remote(str(results_root), plan.cpu_threads, list(plugins)) for _ in range(plan.count)]


def run_jobs(
    jobs: Sequence[Job],
    workers: Sequence[Any],
    progress: Progress,
    results_root: Path,
    max_attempts: int = 3,
    depth: int = 2,
) -> bool:
    """Run `jobs` on `workers` until all finish; returns False if interrupted (Ctrl-C)."""
    import ray

    state = _Flight(Scheduler(jobs, len(workers)), workers, depth)
    try:
        while state.scheduler.has_pending() or state.in_flight:
            state.fill()
            for ref in state.wait():
                if ref in state.probes:
                    state.settle_probe(ref)
                    continue
                batch, worker = state.in_flight.pop(ref)
                state.load[worker] -= 1
                _settle(ref, batch, worker, state, progress, results_root, max_attempts, ray)
            state.expire_probes()
            for worker in state.lost_workers():
                for ref in [r for r, (_, w) in state.in_flight.items() if w == worker]:
                    batch, _ = state.in_flight.pop(ref)
                    state.load[worker] -= 1
                    ray.cancel(ref, force=False)
                    for job in batch:
                        _on_worker_death(job, state, progress, results_root, max_attempts, RuntimeError())
                state.on_death(worker)
            progress.maybe_log()
    except KeyboardInterrupt:
        n_jobs = sum(len(batch) for batch, _ in state.in_flight.values())
        log.warning("interrupted: %d jobs in flight are dropped", n_jobs)
        return False
    return True


class _Flight:
    """The driver's bookkeeping: which jobs run on which worker, and which workers are alive."""

    def __init__(self, scheduler: Scheduler, workers: Sequence[Any], depth: int) -> None:
        self.scheduler, self.workers, self.depth = scheduler, list(workers), depth
        self.in_flight: dict[Any, tuple[list[Job], int]] = {}  # call -> (its jobs, worker index)
        self.load = [0] * len(workers)
        self.alive = [True] * len(workers)
        self.probes: dict[Any, tuple[int, float]] = {}  # describe() call -> (dead worker, deadline)
        self.next_health = time.monotonic() + HEALTH_S
        self.attempts: Counter[str] = Counter()  # worker deaths per job key
        self.job_s: list[float | None] = [None] * len(workers)  # moving average of job seconds

    def batch_of(self, worker: int) -> int:
        """Jobs per call: 1, or about BATCH_S seconds of work when jobs are short (no-ops, tiny models)."""
        job_s = self.job_s[worker]
        if job_s is None:
            return 1
        return max(1, min(MAX_BATCH, math.floor(BATCH_S / max(job_s, 1e-4))))

    def observe(self, worker: int, job_s: float) -> None:
        last = self.job_s[worker]
        self.job_s[worker] = job_s if last is None else 0.8 * last + 0.2 * job_s

    def fill(self) -> None:
        for worker, actor in enumerate(self.workers):
            while self.alive[worker] and self.load[worker] < self.depth:
                batch = self._take(worker, self.batch_of(worker))
                if not batch:
                    break
                self.in_flight[actor.run_batch.remote(batch)] = (batch, worker)
                self.load[worker] += 1
        if self.scheduler.has_pending() and not any(self.alive) and not self.probes:
            raise RuntimeError("every worker actor died; see the Ray logs (e.g. /tmp/ray/session_latest)")

    def _take(self, worker: int, n: int) -> list[Job]:
        batch: list[Job] = []
        while len(batch) < n and (job := self.scheduler.next_for(worker)) is not None:
            batch.append(job)
        return batch

    def on_death(self, worker: int) -> None:
        """Stop feeding `worker` and probe it (once) to learn whether Ray restarted it."""
        if self.alive[worker]:
            self.alive[worker] = False
            self.probes[self.workers[worker].describe.remote()] = (worker, time.monotonic() + PROBE_S)

    def lost_workers(self) -> list[int]:
        """Workers with calls in flight that Ray's actor table lists as RESTARTING or DEAD (each HEALTH_S)."""
        now = time.monotonic()
        if now < self.next_health:
            return []
        self.next_health = now + HEALTH_S
        busy = {w for _, w in self.in_flight.values()}
        if not busy:
            return []
        try:  # a private Ray API (no dashboard needed); if it changes, the check is off, nothing breaks
            from ray._private.state import actors

            table = actors()
            ids = {w: self.workers[w]._actor_id.hex() for w in busy}
        except Exception:
            return []
        lost = [w for w, i in ids.items() if table.get(i, {}).get("State") in ("RESTARTING", "DEAD")]
        for worker in lost:
            log.warning("worker %d is %s; its calls go elsewhere", worker, table[ids[worker]]["State"])
        return lost

    def settle_probe(self, ref: Any) -> None:
        import ray

        worker, _ = self.probes.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as err:
            log.warning("worker %d is gone for good (%s)", worker, type(err).__name__)
            return
        log.info("worker %d is back (restarted)", worker)
        self.alive[worker] = True

    def expire_probes(self) -> None:
        now = time.monotonic()
        for ref, (worker, deadline) in list(self.probes.items()):
            if now > deadline:
                log.warning("worker %d did not come back in %.0f s; going on without it", worker, PROBE_S)
                del self.probes[ref]

    def wait(self) -> list[Any]:
        import ray

        refs = [*self.in_flight, *self.probes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if not ready:
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
        return ready


def _settle(
    ref: Any,
    batch: list[Job],
    worker: int,
    state: _Flight,
    progress: Progress,
    results_root: Path,
    max_attempts: int,
    ray: Any,
) -> None:
    """Record a finished call; a dead worker's jobs go back in the queue (or fail for good)."""
    try:
        results: list[JobResult] = ray.get(ref)
    except ray.exceptions.RayActorError as err:
        state.on_death(worker)
        for job in batch:
            _on_worker_death(job, state, progress, results_root, max_attempts, err)
        return
    except ray.exceptions.RayError as err:  # the call itself failed (e.g. a Job that cannot unpickle)
        for job in batch:
            _record_failure(
                job, f"{type(err).__name__}: {str(err).strip().splitlines()[-1]}", progress, results_root
            )
        return
    for job, result in zip(batch, results, strict=True):
        state.observe(worker, result.timings.get("job_s", 0.0))
        if result.rows and not job_path(results_root / job.study, job.key).exists():  # not our disk
            write_job_rows(results_root / job.study, job.key, result.rows)
        progress.record(job.key, result.status == "ok", result.error)


def _on_worker_death(
    job: Job,
    state: _Flight,
    progress: Progress,
    results_root: Path,
    max_attempts: int,
    err: Exception,
) -> None:
    attempts = state.attempts
    attempts[job.key] += 1
    if attempts[job.key] < max_attempts:
        log.warning("job %s: worker died (%s); retrying elsewhere", job.key[:12], type(err).__name__)
        progress.retried += 1
        state.scheduler.requeue(job)
        return
    error = f"WorkerDied: the worker died {attempts[job.key]} times running this job ({type(err).__name__})"
    _record_failure(job, error, progress, results_root)


def _record_failure(job: Job, error: str, progress: Progress, results_root: Path) -> None:
    """A failed row written by the driver, for a job no worker could report on."""
    rows = job_rows(job, None, (), {}, WorkerEnv(device="unknown", versions="{}"), job.model_family, error)
    write_job_rows(results_root / job.study, job.key, rows)
    progress.record(job.key, False, error)
