"""Workers that come back: real Ray on CPU, real worker processes killed, a tiny model, real Parquet.

A worker killed mid-job (os.kill of the pid the actor reports) is restarted by Ray and used again;
a job that kills its worker every time is recorded as failed after `max_attempts` deaths while the
rest finish; when every worker is gone for good, new ones are started up to a limit, and past it
the run stops with the rest not run. No clock is asserted: the tests wait on files the workers
write; the 15-minute bounds only keep a broken restart from hanging CI for ever.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from ray.exceptions import OutOfMemoryError

from pipeline.cluster import WorkerPlan, start_workers
from pipeline.dispatch import run_jobs
from pipeline.pool import death_error
from pipeline.progress import Progress
from pipeline.results import STATUS_FAILED, STATUS_OK, load_results
from pipeline.run import execute, plan_run
from pipeline.worker import ModelWorker

pytestmark = pytest.mark.slow  # each test starts several worker processes (torch import each)

EVAL = [
    "eval.perplexity=[{name:wikitext2,path:eval/wikitext-2-raw/wiki.test.raw,"
    "context_length:64,stride:64,max_tokens:256}]",
    "eval.tasks=[]",
    "eval.batch_size=4",
]
GRID = ["quant.dtype=int,nf", "quant.bits=3,4", "quant.block_size=64,null"]  # 8 jobs
KILLER = ("nf", 3, 64)  # (dtype, bits, block_size) of the job that kills its worker, where enabled
RUNS, HANG, HUNG, BACK, KILL = "runs.log", ".hang-first", ".hung", ".back", ".kill-nf3"
BOUND_S = 900.0


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + BOUND_S
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


class FaultWorker(ModelWorker):
    """A worker with test hooks, switched on by files in the results root:

    - every job appends "<actor id> <pid> <job key>" to RUNS;
    - with KILL present, the KILLER job kills its own process (SIGKILL), every time;
    - with HANG present, the first job any worker starts writes HUNG ("<pid> <actor id>") and waits
      (the test kills it); another actor's jobs then wait until the killed actor is back and has
      started a job (BACK), so the restarted actor is sure to get work.
    """

    def pid(self) -> int:
        return os.getpid()

    def run(self, job):
        import ray

        root, me = self._results_root, str(ray.get_runtime_context().get_actor_id())
        with open(root / RUNS, "a") as log:
            log.write(f"{me} {os.getpid()} {job.key}\n")
        if (root / KILL).exists() and (job.recipe.dtype, job.recipe.bits, job.recipe.block_size) == KILLER:
            os.kill(os.getpid(), signal.SIGKILL)
        if (root / HANG).exists():
            self._hang_hooks(root, me)
        return super().run(job)

    def _hang_hooks(self, root: Path, me: str) -> None:
        # HUNG appears whole or not at all: written aside, then linked into place (exclusive, atomic).
        # Created empty and written after, another worker or the killer could read it empty.
        mine = root / f"{HUNG}.{os.getpid()}"
        mine.write_text(f"{os.getpid()} {me}")
        try:
            os.link(mine, root / HUNG)
        except FileExistsError:
            hung_pid, hung_actor = (root / HUNG).read_text().split()
            if me != hung_actor:
                _wait_for(root / BACK)
            elif int(hung_pid) != os.getpid():
                (root / BACK).touch()
            return
        finally:
            mine.unlink()
        _wait_for(root / BACK)  # killed long before


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def runs(root: Path) -> list[tuple[str, int, str]]:
    """(actor id, pid, job key) of every job a worker started, in order."""
    lines = (root / RUNS).read_text().split("\n")
    return [(actor, int(pid), key) for actor, pid, key in (line.split() for line in lines if line)]


def plan(model_dir: Path, root: Path, *extra: str):
    model = f"model.name_or_path={model_dir}"
    return plan_run([*EVAL, *GRID, model, f"results_root={root}", "study=r", *extra])


def assert_each_job_once(root: Path, keys: set[str]) -> None:
    rows = load_results(root / "r")
    assert set(rows.job_key) == keys and len(list((root / "r").glob("*.parquet"))) == len(keys)
    assert not rows.duplicated(["job_key", "task", "metric"]).any()


def test_a_killed_worker_is_restarted_and_used_again(ray_cluster, tiny_model_dir, tmp_path):
    (tmp_path / HANG).touch()
    jobs = plan(tiny_model_dir, tmp_path).to_run
    workers = start_workers(WorkerPlan(2, {"num_cpus": 1, "num_gpus": 0}, 1), tmp_path, 3, FaultWorker)
    pids = set(ray_cluster.get([w.pid.remote() for w in workers]))
    killed: list[int] = []

    def kill_the_hung_worker() -> None:
        _wait_for(tmp_path / HUNG)
        pid = int((tmp_path / HUNG).read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_the_hung_worker, daemon=True)
    killer.start()
    progress = Progress(total=len(jobs))
    try:
        assert run_jobs(jobs, workers, progress, tmp_path, max_attempts=3)
    finally:
        for worker in workers:
            ray_cluster.kill(worker)
    killer.join()
    assert killed and killed[0] in pids  # the pid the actor reported
    assert progress.done == len(jobs) and progress.failed == 0 and progress.retried >= 1, progress.errors
    assert_each_job_once(tmp_path, {job.key for job in jobs})
    hung_actor = (tmp_path / HUNG).read_text().split()[1]
    again = [pid for actor, pid, _ in runs(tmp_path) if actor == hung_actor and pid != killed[0]]
    assert again, "the restarted actor ran no job"


def test_a_job_that_kills_its_worker_fails_and_the_rest_finish(ray_cluster, tiny_model_dir, tmp_path):
    (tmp_path / KILL).touch()
    the_plan = plan(tiny_model_dir, tmp_path, "ray.max_attempts=2")
    progress = execute(the_plan, worker_cls=FaultWorker)
    assert progress.done == len(the_plan.to_run) and progress.failed == 1
    assert_each_job_once(tmp_path, {job.key for job in the_plan.to_run})
    rows = load_results(tmp_path / "r")
    failed = rows[rows.status == STATUS_FAILED]
    row = failed.iloc[0]
    assert len(failed) == 1 and (row["dtype"], row["bits"], row["block_size"]) == KILLER
    assert row["error"].startswith("WorkerDied: the worker died 2 times running this job")
    assert set(rows[rows.status != STATUS_FAILED].status) == {STATUS_OK}
    killer_runs = [key for _, _, key in runs(tmp_path) if key == row["job_key"]]
    assert len(killer_runs) == 2  # two deaths, no third attempt


def new_workers_run(root: Path, model_dir: Path, spare: int) -> tuple[Progress, list, bool]:
    """One worker that Ray never restarts, new ones up to `spare`; the KILLER job kills each it meets."""
    (root / KILL).touch()
    jobs = plan(model_dir, root).to_run
    one = WorkerPlan(1, {"num_cpus": 1, "num_gpus": 0}, 1)
    workers = start_workers(one, root, 0, FaultWorker)
    progress = Progress(total=len(jobs))
    try:
        finished = run_jobs(
            jobs, workers, progress, root, 3, spawn=lambda: start_workers(one, root, 0, FaultWorker)[0],
            max_new_workers=spare,
        )  # fmt: skip
    finally:
        for worker in workers:
            import ray

            ray.kill(worker)
    return progress, list(jobs), finished


def test_workers_lost_for_good_are_replaced_up_to_a_limit(ray_cluster, tiny_model_dir, tmp_path):
    progress, jobs, finished = new_workers_run(tmp_path, tiny_model_dir, spare=3)
    assert finished and not progress.stopped
    assert progress.done == len(jobs) and progress.failed == 1  # three deaths: the killer failed
    assert_each_job_once(tmp_path, {job.key for job in jobs})
    assert len({actor for actor, _, _ in runs(tmp_path)}) == 4  # the first worker and three new ones


def test_past_the_limit_the_run_stops_with_the_rest_not_run(ray_cluster, tiny_model_dir, tmp_path):
    progress, jobs, finished = new_workers_run(tmp_path, tiny_model_dir, spare=1)
    assert finished and "every worker was lost (1 new one(s) started)" in progress.stopped
    assert progress.done < len(jobs) and progress.failed == 0 and progress.exit_code() == 1
    assert "stopped" in progress.summary() and "re-run the same command" in progress.summary()


def test_an_out_of_memory_kill_is_named() -> None:
    oom = OutOfMemoryError("Task was killed due to the node running low on memory.")
    assert death_error(oom, 3).startswith("OutOfMemory: Ray killed the worker for lack of memory 3 times")
    assert death_error(RuntimeError("segfault"), 2).startswith("WorkerDied: the worker died 2 times")
