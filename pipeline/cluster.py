"""The Ray cluster and its worker actors: how many (`plan_workers`), starting or joining the cluster
(`connect`), creating the actors (`start_workers`), and doing both on a thread while the driver plans
(`EarlyStart`). `pipeline.dispatch` hands the actors their jobs.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import bytecode
from pipeline.startup import log_phase

if TYPE_CHECKING:  # not at run time: `pipeline.prestart` imports this module before the config's imports
    from pipeline.config import RayConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayStart:
    """What starting or joining Ray takes from the config (`connect`): where, and a local cluster's size."""

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None

    @classmethod
    def of(cls, cfg: RayConfig | RayStart) -> RayStart:
        return cls(cfg.address, cfg.num_cpus, cfg.num_gpus)


@dataclass(frozen=True)
class WorkerPlan:
    """How many worker actors to start and the Ray options of each."""

    count: int
    options: dict[str, Any]
    cpu_threads: int
    gpus_per_worker: int = 1  # >1: each worker shards its model over this many GPUs


def plan_workers(cfg: RayConfig, resources: dict[str, float], n_jobs: int) -> WorkerPlan:
    """Worker actors for the cluster's resources: per GPU (fractional with workers_per_gpu), per
    `gpus_per_worker` GPUs of one node (a sharded model), or per CPUs."""
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if gpus > 0 and cfg.gpus_per_worker > 1:
        count = int(gpus // cfg.gpus_per_worker)
        options: dict[str, Any] = {"num_gpus": cfg.gpus_per_worker, "num_cpus": 0}
    elif gpus > 0:
        count = int(gpus * cfg.workers_per_gpu + 1e-9)
        options = {"num_gpus": 1.0 / cfg.workers_per_gpu, "num_cpus": 0}
    else:
        count = int(cpus // cfg.cpus_per_worker)
        options = {"num_gpus": 0, "num_cpus": cfg.cpus_per_worker}
    count = min(count, cfg.max_workers or count, max(n_jobs, 1))
    if count < 1:
        raise RuntimeError(f"the Ray cluster has no room for a worker (resources: {resources})")
    return WorkerPlan(count, options, cfg.cpus_per_worker, cfg.gpus_per_worker if gpus > 0 else 1)


# Ray starts idle worker processes for tasks when a cluster starts (one per CPU); the workers here are
# actors with their own runtime_env, which never take those, so on a local cluster they only compete
# with the driver and the actors' start for the CPUs (2-core VM: Ray's start 6.0-7.2 -> 4.0-4.9 s, an
# actor's 5.3-5.6 -> 4.1-4.2 s; `docs/benchmarks.md`, start-up).
NO_PRESTART = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}


def connect(cfg: RayConfig | RayStart) -> bool:
    """Start the embedded local cluster (address None) or join one; True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if getattr(cfg, "keep_workers", False):  # kept workers are named in their own namespace
        from pipeline.kept import NAMESPACE

        kwargs["namespace"] = NAMESPACE
    if cfg.address is None:
        kwargs.update(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, _system_config=NO_PRESTART)
    if not os.environ.get("KBIT_VERBOSE"):  # token auth stays on (Ray's default); only its notice goes
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if threading.current_thread() is not threading.main_thread():  # `EarlyStart`: the caller keeps its
        logging.getLogger("ray._private.worker").addFilter(_no_sigterm_notice)  # SIGTERM handler anyway
    sigterm = signal.getsignal(signal.SIGTERM)
    # "local" always starts a new embedded cluster: a bare ray.init() would join any cluster already
    # running on this machine (or RAY_ADDRESS), which is what ray.address=auto is for.
    ray.init(address=cfg.address or "local", **kwargs)
    if threading.current_thread() is threading.main_thread() and sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)  # ray.init's own handler exits at once: keep the caller's
    return True


def _no_sigterm_notice(record: logging.LogRecord) -> bool:
    """Drop Ray's notice that a thread's `ray.init` sets no SIGTERM handler (the driver has its own)."""
    return "SIGTERM handler is not set" not in record.getMessage()


def start_workers(
    plan: WorkerPlan,
    results_root: Path,
    max_restarts: int,
    worker_cls: Any = None,
    plugins: Sequence[str] = (),
    keep: bool = False,
) -> list[Any]:
    """Create the worker actors (default class: `pipeline.worker.ModelWorker`); each imports `plugins`.
    `keep`: named, detached actors that outlive the command, reused when alive (`pipeline.kept`)."""
    import ray

    from pipeline.worker import ModelWorker

    quiet = {  # no progress bars from every worker, unless verbose=true (KBIT_VERBOSE, set by the driver)
        "TQDM_DISABLE": os.environ.get("TQDM_DISABLE", "0" if os.environ.get("KBIT_VERBOSE") else "1"),
        "KBIT_VERBOSE": os.environ.get("KBIT_VERBOSE", ""),
        **bytecode.worker_env(),  # where no bytecode is written, a cache under $KBIT_CACHE (a cluster too)
    }
    cls = worker_cls or ModelWorker
    remote_cls = ray.remote(cls)
    options = {**plan.options, "max_restarts": max_restarts, "runtime_env": {"env_vars": quiet}}
    sharded = {"gpus_per_worker": plan.gpus_per_worker} if plan.gpus_per_worker > 1 else {}
    args = (str(results_root), plan.cpu_threads, list(plugins))
    if keep:
        from pipeline.kept import start_kept

        name = f"{cls.__module__}.{cls.__qualname__}"
        return start_kept(remote_cls, name, options, args, sharded, plan.count, plugins)
    return [remote_cls.options(**options).remote(*args, **sharded) for _ in range(plan.count)]


class EarlyStart:
    """Ray and the worker actors started on a background thread while the driver plans.

    The driver's planning (imports, pre-flight, job keys) and Ray's start (its processes) take seconds
    each and need little of each other: `pipeline.run` starts Ray here as soon as the config is composed
    and its run-wide settings check out, with `workers=False`, and lets the workers follow (`proceed`)
    once pre-flight has passed, so a bad input never starts a worker or touches a GPU (Ray alone is
    stopped again). `run_on_ray` takes the cluster and the actors from it. The actors are created for at
    most `max_jobs` jobs (the cells: a cap, as `plan_workers` applies one), start importing torch and
    querying their device at once, and the surplus is killed once the number of jobs to run is known.
    `cancel` undoes what is left; call it however the run ends.
    The thread stays alive until `cancel`: Ray's processes are started with a parent-death signal,
    which Linux sends when the parent *thread* ends, so they would die with a finished thread.
    A SIGTERM after Ray's start and before `wait` meets Ray's failure handler (the driver aborts; no job
    has run yet, nothing is written); `wait` puts Python's handlers back.
    """

    def __init__(
        self,
        cfg: RayConfig | RayStart,
        max_jobs: int = 0,
        results_root: Path | None = None,
        plugins: Sequence[str] = (),
        workers: bool = True,
    ) -> None:
        self.cfg = cfg  # a bare `RayStart`: a start on a guess, until `adopt` gives it the config
        self.started = False  # whether this start started Ray (then `cancel` stops it)
        self.workers: list[Any] = []
        self.options: dict[str, Any] = {}
        self._plan_args = (max_jobs, results_root, tuple(plugins))
        self._error: BaseException | None = None
        self._ready, self._release, self._go = threading.Event(), threading.Event(), threading.Event()
        self._cancelled = False
        self.connected = threading.Event()  # set once Ray is up (or its start failed)
        if workers:
            self._go.set()
        self._thread = threading.Thread(target=self._start, name="ray-early-start", daemon=True)
        self._thread.start()

    def adopt(self, cfg: RayConfig, max_jobs: int, results_root: Path, plugins: Sequence[str] = ()) -> bool:
        """Take over a start made before the config was composed (`pipeline.prestart`): True when it
        starts the Ray that `cfg` asks for, and then its workers (not started yet) follow `cfg`; False
        (nothing changed) otherwise, and the caller cancels it."""
        if self._go.is_set() or RayStart.of(cfg) != RayStart.of(self.cfg):
            return False
        self.cfg, self._plan_args = cfg, (max_jobs, results_root, tuple(plugins))
        return True

    def _start(self) -> None:
        start = time.perf_counter()
        try:
            import ray

            self.started = connect(self.cfg)
            log_phase("ray_start", time.perf_counter() - start)
            self.connected.set()
            self._go.wait()  # `proceed`: pre-flight passed (or `cancel`)
            max_jobs, results_root, plugins = self._plan_args
            if not self._cancelled and results_root is not None and not isinstance(self.cfg, RayStart):
                created = time.perf_counter()
                plan = plan_workers(self.cfg, ray.cluster_resources(), max_jobs)
                self.options = plan.options
                self.workers = start_workers(plan, results_root, self.cfg.max_attempts, None, plugins)
                log_phase("workers_created", time.perf_counter() - created, workers=len(self.workers))
        except BaseException as err:  # raised again by `wait`, on the driver's thread
            self._error = err
        self.connected.set()
        self._ready.set()
        self._release.wait()  # Ray's processes live as long as this thread (see the class docstring)

    def proceed(self) -> None:
        """Let the workers start (once Ray is up): pre-flight has passed."""
        self._go.set()

    def wait(self) -> None:
        """Block until the start is done; raise what it raised. On the main thread, Python's own SIGTERM
        and SIGINT handlers go back in place: Ray's core worker, started on the thread, installed a
        process-wide failure handler that aborts on SIGTERM (exit −6 instead of the driver's 143)."""
        self._ready.wait()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                handler = signal.getsignal(signum)
                if handler is not None:
                    signal.signal(signum, handler)  # re-installs Python's C-level trampoline
        if self._error is not None:
            raise self._error

    def take(self, count: int) -> list[Any]:
        """The first `count` actors (after `wait`); the others are killed."""
        import ray

        for actor in self.workers[count:]:
            ray.kill(actor)
        taken, self.workers = self.workers[:count], []
        return taken

    def cancel(self) -> None:
        """Kill the actors not taken, stop Ray if this start started it and no one took it over,
        and end the thread (waits for Ray's start to finish, but starts no worker; idempotent)."""
        self._cancelled = True
        self._go.set()
        self._ready.wait()
        if self.started or self.workers:
            import ray

            self.take(0)
            if self.started:
                ray.shutdown()
                self.started = False
        self._release.set()
        self._thread.join()
