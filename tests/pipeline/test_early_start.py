"""`cluster.EarlyStart`: Ray and the workers started on a thread while the driver plans, and undone;
the workers only once pre-flight has passed."""

from __future__ import annotations

import pytest

from pipeline.cluster import EarlyStart
from pipeline.config import RayConfig


@pytest.mark.slow
def test_early_start_starts_ray_and_a_worker_and_cancel_stops_both(tmp_path):
    import ray

    if ray.is_initialized():  # a Ray left by an earlier module would be joined instead
        ray.shutdown()
    early = EarlyStart(RayConfig(num_cpus=1), max_jobs=3, results_root=tmp_path)
    early.wait()
    assert early.started and ray.is_initialized()
    assert len(early.workers) == 1  # one CPU: one worker, however many jobs
    assert ray.get(early.workers[0].describe.remote(), timeout=120).startswith("cpu")
    early.cancel()
    early.cancel()  # idempotent
    assert not ray.is_initialized() and not early.workers


def test_a_run_that_needs_no_ray_starts_none(tmp_path):
    from pipeline.run import start_early
    from pipeline.sweep import expand, plan_sweep

    def cells(*extra: str):
        return expand(plan_sweep([f"results_root={tmp_path}", "eval.tasks=[]", *extra], True))

    assert start_early(cells("dry_run=true")) is None
    assert start_early(cells("ray.address=auto")) is None  # a cluster joined by address: after planning
    assert start_early(cells("ray.max_workers=0")) is None  # pre-flight refuses it: no Ray first
    (tmp_path / "file").write_text("")
    assert start_early(cells(f"results_root={tmp_path / 'file'}")) is None


def test_bad_input_starts_no_worker_and_stops_ray(tmp_path, capsys, monkeypatch):
    import ray

    import pipeline.cluster as cluster
    from pipeline.run import main

    made: list[cluster.EarlyStart] = []

    class Recorded(cluster.EarlyStart):  # the real start, kept
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(cluster, "EarlyStart", Recorded)
    if ray.is_initialized():
        ray.shutdown()
    code = main(["-m", f"results_root={tmp_path}", "eval.tasks=[]", "quant.dtype=int", "quant.bits=1"])
    assert code == 2 and "bits=1" in capsys.readouterr().err
    assert len(made) == 1 and made[0].options == {}  # Ray started during pre-flight, no worker planned
    assert not made[0].workers and not ray.is_initialized()  # and Ray is stopped again
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_workers_wait_for_proceed(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    early = EarlyStart(RayConfig(num_cpus=1), max_jobs=2, results_root=tmp_path, workers=False)
    assert early.connected.wait(timeout=120) and ray.is_initialized()
    assert not early.workers and early.options == {}  # Ray is up; the thread waits for `proceed`
    early.proceed()
    early.wait()
    assert early.started and len(early.workers) == 1
    early.cancel()
    assert not ray.is_initialized() and not early.workers
