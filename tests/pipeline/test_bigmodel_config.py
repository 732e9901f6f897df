"""The large-model settings: `model.snapshot` and `ray.gpus_per_worker` validated, planned and dispatched."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.cluster import plan_workers
from pipeline.config import RayConfig, load_config
from pipeline.jobs import build_jobs
from pipeline.memplan import GIB, describe_jobs
from pipeline.preflight import memory_problems, ray_problems


def test_snapshot_is_not_in_the_job_key_but_travels_with_the_model(tiny_model_dir):
    jobs = {
        snap: build_jobs([load_config([f"model.name_or_path={tiny_model_dir}", f"model.snapshot={snap}"])])[0]
        for snap in ("auto", "cpu")
    }
    assert jobs["auto"].key == jobs["cpu"].key  # where the copy lives changes no number
    assert jobs["cpu"].model.snapshot == "cpu" and "snapshot" not in jobs["cpu"].job_json


def test_bad_snapshot_and_gpu_settings_are_refused(tiny_model_dir):
    cells = [load_config([f"model.name_or_path={tiny_model_dir}", "model.snapshot=disk"])]
    assert memory_problems(cells, ()) == [
        "model.snapshot='disk' is not allowed; allowed: ['auto', 'gpu', 'cpu']"
    ]
    assert "ray.gpus_per_worker=0: must be >= 1" in ray_problems(RayConfig(gpus_per_worker=0))
    both = ray_problems(RayConfig(gpus_per_worker=2, workers_per_gpu=2))
    assert any("spans several GPUs or shares one, not both" in p for p in both)
    few = ray_problems(RayConfig(gpus_per_worker=4, num_gpus=2))
    assert any("ray.gpus_per_worker=4 but ray.num_gpus=2" in p for p in few)


def test_a_plan_that_cannot_fit_is_refused_naming_the_fixes(tiny_model_dir):
    overrides = [f"model.name_or_path={tiny_model_dir}", "model.torch_dtype=float32", "eval.batch_size=64"]
    cells = [load_config([*overrides, "model.snapshot=gpu"])]
    assert memory_problems(cells, (80 * GIB,)) == []
    assert memory_problems(cells, ()) == []  # no GPU visible: printed, not enforced
    small_batch = int((GIB + (512 << 20) + (40 << 20)) / 0.95)  # runtime + rtn's group + ~40 MiB of batch
    (problem,) = memory_problems(cells, (small_batch,))
    assert problem.startswith(f"model {str(tiny_model_dir)!r}: needs ")
    assert "model.snapshot=cpu" in problem and "eval.batch_size=" in problem


def test_dry_run_describes_the_memory_plan(tiny_model_dir):
    jobs = build_jobs([load_config([f"model.name_or_path={tiny_model_dir}", "model.snapshot=cpu"])])
    (table,) = describe_jobs(jobs, 1, (80 * GIB,))
    evals = jobs[0].evals
    load = f"batch {evals.batch_size}x{evals.perplexity[0].context_length}, rtn"
    assert table.startswith(f"memory plan of {tiny_model_dir} ({load}) (1 GPU(s), snapshot=cpu)")
    assert "host (pinned)" in table and table.endswith("fits")


def test_workers_span_gpus_per_worker():
    plan = plan_workers(RayConfig(gpus_per_worker=2), {"CPU": 16.0, "GPU": 8.0}, 100)
    assert (plan.count, plan.options, plan.gpus_per_worker) == (4, {"num_gpus": 2, "num_cpus": 0}, 2)
    odd = plan_workers(RayConfig(gpus_per_worker=3), {"CPU": 16.0, "GPU": 8.0}, 100)
    assert odd.count == 2  # whole workers only
    cpu = plan_workers(RayConfig(gpus_per_worker=2), {"CPU": 2.0}, 100)
    assert cpu.gpus_per_worker == 1 and cpu.options["num_gpus"] == 0
