"""Fan jobs out over Ray worker actors with model affinity, retries and progress.

The driver keeps `in_flight_per_worker` calls queued on each actor, so an actor never waits for
the driver; a call carries one job, or a batch of about BATCH_S seconds of work when jobs are short
(Ray's per-call cost, ~1-5 ms, would otherwise dominate). It hands each actor jobs of the model
it already holds, and moves an idle actor to the model with the most pending jobs per actor
already on it. When an actor dies, the jobs of its calls that wrote their result file are done; the
one it was running (the first unfinished job of its oldest call) is charged an attempt and put back,
the others go back uncharged; a job charged `max_attempts` times is recorded as failed, naming an
out-of-memory kill when Ray reports one. Which workers take work, and their restarts and
replacements, is `pipeline.pool`'s concern.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.cluster import EarlyStart, connect, plan_workers, start_workers
from pipeline.config import RayConfig
from pipeline.jobrows import JobResult, WorkerEnv, job_rows
from pipeline.jobs import Job
from pipeline.pool import WorkerLost, WorkerPool, death_error
from pipeline.progress import Progress
from pipeline.results import STATUS_OK, job_outcome, job_path, write_job_rows
from pipeline.specs import ModelRef

log = logging.getLogger(__name__)

BATCH_S = 0.25  # short jobs travel in batches of about this many seconds of work per call
MAX_BATCH = 64  # at most this many jobs per call (all are retried if the worker dies)
NEW_WORKERS_PER_WORKER = 2  # a run may start this many new actors per initial one, for actors lost for good
FRESH_SLACK_S = 1.0  # a result file written this long before its call was sent still counts as its own


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


def resolve_compile(jobs: Sequence[Job], n_workers: int) -> list[Job]:
    """`eval.compile=null` (auto) decided per model from the jobs each worker will run on it (its
    jobs / the workers, rounded up) by `evaluate.compile_pays`: where compiling does not pay, the
    jobs go out with `compile=false`; where it does, null stays (the worker compiles on CUDA when the
    scorer's shapes are planned; never on CPU). Explicit true/false are kept. Not in the job key."""
    from pipeline.evals.evaluate import compile_pays

    per_model: dict[Any, int] = {}
    for job in jobs:
        if job.evals.compile is None:
            per_model[job.model] = per_model.get(job.model, 0) + 1
    pays = {model: compile_pays(-(-count // max(n_workers, 1))) for model, count in per_model.items()}
    for model, count in per_model.items():
        log.info("eval.compile=auto for %s: %d job(s) on %d worker(s) -> %s", model.name_or_path, count,
                 n_workers, "compile where the device allows" if pays[model] else "no compile")  # fmt: skip
    return [
        replace(job, evals=replace(job.evals, compile=False))
        if job.evals.compile is None and not pays[job.model]
        else job
        for job in jobs
    ]


def run_on_ray(
    jobs: Sequence[Job],
    cfg: RayConfig,
    results_root: Path,
    progress: Progress,
    worker_cls: Any = None,
    plugins: Sequence[str] = (),
    early: EarlyStart | None = None,
) -> None:
    """Start (or join) Ray, start the workers, `run_jobs`, and stop the workers (and Ray) again;
    with `early`, the cluster and the workers it started while the driver planned are used."""
    import ray

    if early is not None:
        early.wait()
        started, early.started = early.started, False  # stopped here from now on
    else:
        started = connect(cfg)
    workers: list[Any] = []
    try:
        plan = plan_workers(cfg, ray.cluster_resources(), len(jobs))
        one = replace(plan, count=1)
        if early is not None and early.options == plan.options and len(early.workers) >= plan.count:
            workers = early.take(plan.count)
        else:
            if early is not None:
                early.take(0)
            keep = cfg.keep_workers
            workers = start_workers(plan, results_root, cfg.max_attempts, worker_cls, plugins, keep)
        log.info("%d worker(s), each %s", len(workers), plan.options)
        jobs = resolve_compile(jobs, len(workers))
        run_jobs(
            jobs, workers, progress, results_root, cfg.max_attempts, cfg.in_flight_per_worker,
            spawn=lambda: start_workers(one, results_root, cfg.max_attempts, worker_cls, plugins)[0],
            max_new_workers=NEW_WORKERS_PER_WORKER * len(workers),
        )  # fmt: skip
    finally:
        if cfg.keep_workers and workers:
            log.info("%d worker(s) kept for the next command (python -m pipeline.kept release frees them)",
                     len(workers))  # fmt: skip
        for actor in workers if not cfg.keep_workers else ():
            ray.kill(actor)
        if started:
            ray.shutdown()
        if early is not None:
            early.cancel()  # ends its thread, which Ray's processes lived on


def run_jobs(
    jobs: Sequence[Job],
    workers: Sequence[Any],
    progress: Progress,
    results_root: Path,
    max_attempts: int = 3,
    depth: int = 2,
    spawn: Callable[[], Any] | None = None,
    max_new_workers: int = 0,
) -> bool:
    """Run `jobs` on `workers` until all finish; returns False if interrupted (Ctrl-C, SIGTERM).

    `spawn` starts a new worker actor for one lost for good, at most `max_new_workers` times; when no
    worker is left, the run stops (`progress.stopped` says why) with the rest not run.
    """
    pool = WorkerPool(workers, spawn, max_new_workers)
    state = _Flight(Scheduler(jobs, len(workers)), pool, depth, progress, results_root, max_attempts)
    try:
        while state.scheduler.has_pending() or state.in_flight:
            state.fill()
            stop = _stop_reason(state)
            if stop:
                progress.stopped = f"{stop}; see the Ray logs (e.g. /tmp/ray/session_latest/logs)"
                log.error("%s", progress.stopped)
                break
            for ref in state.wait():
                if ref in pool.probes:
                    pool.settle_probe(ref)
                elif ref in state.in_flight:
                    _settle(ref, state.pop(ref), state)
            pool.tick()
            for worker in pool.lost_workers({call.worker for call in state.in_flight.values()}):
                _on_death(worker, [], WorkerLost("Ray lists it as not alive"), state)
            progress.maybe_log()
    except KeyboardInterrupt as err:
        progress.interrupt(err)
        n_jobs = sum(len(call.jobs) for call in state.in_flight.values())
        log.warning("interrupted: %d jobs in flight are dropped", n_jobs)
        return False
    finally:
        pool.close()
    return True


def _stop_reason(state: _Flight) -> str:
    """Why no job can run any more ("" while one can)."""
    if not state.scheduler.has_pending() or state.in_flight:
        return ""
    if not state.pool.usable():
        return f"every worker was lost ({len(state.pool.spawned)} new one(s) started)"
    if state.pool.no_live_node():
        return "no Ray node is alive (its raylet died), so no worker can start"
    return ""


@dataclass(frozen=True)
class _Call:
    """One run_batch call: its jobs, its worker, its order among calls, and when it was sent."""

    jobs: list[Job]
    worker: int
    seq: int
    sent: float  # time.time(): a result file written since is this call's


class _Flight:
    """The driver's bookkeeping: which calls run on which worker, attempts, and where results go."""

    def __init__(
        self,
        scheduler: Scheduler,
        pool: WorkerPool,
        depth: int,
        progress: Progress,
        results_root: Path,
        max_attempts: int,
    ) -> None:
        self.scheduler, self.pool, self.depth = scheduler, pool, depth
        self.progress, self.results_root, self.max_attempts = progress, results_root, max_attempts
        self.in_flight: dict[Any, _Call] = {}  # call -> what it carries
        self.load = [0] * len(pool.actors)
        self.sent = 0  # calls sent so far (each call's seq)
        self.attempts: Counter[str] = Counter()  # worker deaths charged per job key
        self.job_s: list[float | None] = [None] * len(pool.actors)  # moving average of job seconds

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
        for worker, actor in enumerate(self.pool.actors):
            while self.pool.alive[worker] and self.load[worker] < self.depth:
                batch = self._take(worker, self.batch_of(worker))
                if not batch:
                    break
                self.in_flight[actor.run_batch.remote(batch)] = _Call(batch, worker, self.sent, time.time())
                self.sent += 1
                self.load[worker] += 1

    def pop(self, ref: Any) -> _Call:
        call = self.in_flight.pop(ref)
        self.load[call.worker] -= 1
        return call

    def calls_of(self, worker: int) -> list[tuple[Any, _Call]]:
        """Take every call in flight on `worker` out of the books."""
        refs = [ref for ref, call in self.in_flight.items() if call.worker == worker]
        return [(ref, self.pop(ref)) for ref in refs]

    def _take(self, worker: int, n: int) -> list[Job]:
        batch: list[Job] = []
        while len(batch) < n and (job := self.scheduler.next_for(worker)) is not None:
            batch.append(job)
        return batch

    def wait(self) -> list[Any]:
        import ray

        refs = [*self.in_flight, *self.pool.probes]
        if not refs:  # only probes waiting for their backoff
            time.sleep(0.1)
            return []
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if not ready:
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
        return ready


def _settle(ref: Any, call: _Call, state: _Flight) -> None:
    """Record a finished call; a dead worker's calls go to `_on_death`."""
    import ray

    try:
        results: list[JobResult] = ray.get(ref)
    except ray.exceptions.RayActorError as err:
        _on_death(call.worker, [call], err, state)
        return
    except ray.exceptions.RayError as err:  # the call itself failed (e.g. a Job that cannot unpickle)
        for job in call.jobs:
            _record_failure(job, f"{type(err).__name__}: {str(err).strip().splitlines()[-1]}", state)
        return
    _record_results(call, results, state)


def _record_results(call: _Call, results: list[JobResult], state: _Flight) -> None:
    for job, result in zip(call.jobs, results, strict=True):
        state.observe(call.worker, result.timings.get("job_s", 0.0))
        if result.rows and not job_path(state.results_root / job.study, job.key).exists():  # not our disk
            write_job_rows(state.results_root / job.study, job.key, result.rows)
        state.progress.record(job.key, result.status == "ok", result.error)


def _on_death(worker: int, failed: list[_Call], err: Exception, state: _Flight) -> None:
    """`worker` died or is out of reach: settle its calls that finished, then, in the order they were
    sent, count jobs whose result file was written since as done, charge the first other job (the
    one it was running) an attempt, and put the rest back uncharged."""
    dead = list(failed)
    for ref, call in state.calls_of(worker):
        results = _results_if_ready(ref)
        if results is None:
            dead.append(call)
        else:
            _record_results(call, results, state)
    state.pool.lose(worker)
    charged = False
    for call in sorted(dead, key=lambda c: c.seq):
        for job in call.jobs:
            outcome = _fresh_outcome(job, call.sent, state.results_root)
            if outcome is not None:
                state.progress.record(job.key, outcome[0] == STATUS_OK, outcome[1])
            elif not charged:
                charged = True
                _charge(job, err, state)
            else:
                state.progress.retried += 1
                state.scheduler.requeue(job)


def _results_if_ready(ref: Any) -> list[JobResult] | None:
    """A call's results if it has returned them; None if it failed or is still out (it is cancelled)."""
    import ray

    if not ray.wait([ref], timeout=0)[0]:
        ray.cancel(ref, force=False)
        return None
    try:
        results: list[JobResult] = ray.get(ref)
    except ray.exceptions.RayError:
        return None
    return results


def _fresh_outcome(job: Job, since: float, results_root: Path) -> tuple[str, str | None] | None:
    """(status, error) of the job's result file if it was written since `since` (time.time())."""
    path = job_path(results_root / job.study, job.key)
    try:
        fresh = path.stat().st_mtime >= since - FRESH_SLACK_S
    except FileNotFoundError:
        return None
    return job_outcome(path) if fresh else None


def _charge(job: Job, err: Exception, state: _Flight) -> None:
    """One more death of a worker running `job`: retry it, or after `max_attempts` record it failed."""
    state.attempts[job.key] += 1
    times = state.attempts[job.key]
    if times < state.max_attempts:
        log.warning("job %s: its worker died (%s); retrying (%d of %d)", job.key[:12], type(err).__name__,
                    times + 1, state.max_attempts)  # fmt: skip
        state.progress.retried += 1
        state.scheduler.requeue(job)
        return
    _record_failure(job, death_error(err, times), state)


def _record_failure(job: Job, error: str, state: _Flight) -> None:
    """A failed row written by the driver, for a job no worker could report on."""
    rows = job_rows(job, None, (), {}, WorkerEnv(device="unknown", versions="{}"), job.model_family, error)
    write_job_rows(state.results_root / job.study, job.key, rows)
    state.progress.record(job.key, False, error)
