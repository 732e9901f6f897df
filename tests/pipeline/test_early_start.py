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


def recorded_starts(monkeypatch: pytest.MonkeyPatch) -> list[EarlyStart]:
    """Every `EarlyStart` made from now on (the real ones, kept in a list)."""
    import pipeline.cluster as cluster

    made: list[EarlyStart] = []

    class Recorded(cluster.EarlyStart):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(cluster, "EarlyStart", Recorded)
    return made


def test_bad_input_starts_no_worker_and_stops_ray(tmp_path, capsys, monkeypatch):
    import ray

    from pipeline.run import main

    made = recorded_starts(monkeypatch)
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


def test_the_guess_reads_ray_settings_from_the_arguments_or_declines(monkeypatch):
    from pipeline.cluster import RayStart
    from pipeline.prestart import guess

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("KBIT_EARLY_START", raising=False)
    assert guess([]) == RayStart()  # the demo study: Ray's own detection
    assert guess(["-m", "quant.bits=3,4", "ray.num_cpus=2", "+ray.num_gpus=null"]) == RayStart(num_cpus=2)
    assert guess(["ray.num_gpus=1", "dry_run=false"]) == RayStart(num_gpus=1)
    for declined in (
        ["-m", "dry_run=true"], ["--cfg"], ["--help"], ["ray.address=auto"], ["ray=cluster"],
        ["ray.num_cpus=1,2"], ["ray.num_gpus=two"], ["--bogus"],
    ):  # fmt: skip
        assert guess(declined) is None, declined
    monkeypatch.setenv("KBIT_EARLY_START", "0")
    assert guess([]) is None
    monkeypatch.setenv("KBIT_EARLY_START", "1")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # ray.init would join that cluster
    assert guess([]) is None


@pytest.mark.slow
def test_a_start_on_a_guess_is_adopted_when_it_asks_for_the_same_ray(tmp_path, monkeypatch):
    import ray

    from pipeline import prestart
    from pipeline.run import start_early
    from pipeline.sweep import expand, plan_sweep

    monkeypatch.delenv("KBIT_EARLY_START", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    argv = [f"results_root={tmp_path}", "eval.tasks=[]", "ray.num_cpus=1", "ray.max_workers=1"]
    prestart.prestart(["-m", *argv])
    guessed = prestart._PENDING[0]
    early = start_early(expand(plan_sweep(argv, True)))
    assert early is guessed and prestart.take() is None  # adopted: one Ray start, not two
    assert early.cfg.max_workers == 1  # the workers follow the composed config
    early.proceed()
    early.wait()
    assert early.started and len(early.workers) == 1
    early.cancel()
    assert not ray.is_initialized()


def test_a_wrong_guess_is_cancelled_and_bad_input_still_stops_ray(tmp_path, capsys, monkeypatch):
    import ray

    import pipeline.cluster as cluster
    from pipeline import prestart
    from pipeline.run import main

    made = recorded_starts(monkeypatch)
    monkeypatch.delenv("KBIT_EARLY_START", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    prestart.prestart(["-m", "ray.num_cpus=2"])  # the config below asks for one CPU (a sweep file, say)
    argv = ["-m", f"results_root={tmp_path}", "eval.tasks=[]", "ray.num_cpus=1", "quant.bits=1"]
    assert main(argv) == 2 and "bits=1" in capsys.readouterr().err
    assert len(made) == 2 and made[0].cfg == cluster.RayStart(num_cpus=2)  # the guess, then the right one
    assert not any(start.workers or start._thread.is_alive() for start in made)  # both undone
    assert prestart.take() is None and not ray.is_initialized()
    assert list(tmp_path.iterdir()) == []  # nothing written
