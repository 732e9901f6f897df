"""Jobs: content keys, the 16-bit collapse, dedupe, grouping, scheduling and worker planning (no Ray)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from pipeline.cluster import plan_workers
from pipeline.config import RayConfig, load_config, replace_path
from pipeline.dispatch import Scheduler
from pipeline.jobrows import WorkerEnv, check_finite, error_line, job_rows
from pipeline.jobs import KEY_VERSION, Job, ModelSource, build_jobs, group_by_model
from pipeline.progress import Progress, format_duration
from pipeline.recipe import BASELINE
from pipeline.results import COLUMNS, load_results, write_job_rows
from pipeline.specs import MetricValue, ModelRef, QuantReport
from pipeline.sweep import expand, plan_sweep


def cells(*overrides: str):
    return expand(plan_sweep(list(overrides), multirun=True))


def one_job(*overrides: str) -> Job:
    (job,) = build_jobs(cells(*overrides))
    return job


def test_assembled_json_is_the_canonical_json():
    from pipeline.jobs import _dumps

    grid = cells("model.name_or_path=org/m", "quant.bits=3,16", "quant.dtype=fp,nf", "eval=smoke")
    for job in build_jobs(grid):
        assert job.job_json == _dumps(job.canonical)


def test_key_is_stable_and_content_addressed():
    a = one_job("model.name_or_path=org/m", "quant.bits=4")
    b = one_job("model.name_or_path=org/m", "quant.bits=4")
    assert a.key == b.key and len(a.key) == 64
    assert a.canonical["key_version"] == KEY_VERSION and '"bits":4' in a.job_json
    assert '"method":"rtn"' in a.job_json


@pytest.mark.parametrize(
    "change",
    [
        "quant.bits=5",
        "quant.dtype=nf",
        "quant.block_size=128",
        "quant.centering=true",
        "quant.outlier_fraction=0.02",
        "quant.quantize_embeddings=true",
        "quant.quantize_lm_head=true",
        "model.name_or_path=org/other",
        "model.torch_dtype=float32",
        "eval=smoke",
    ],
)
def test_key_changes_with_what_changes_the_numbers(change: str):
    base = one_job("model.name_or_path=org/m")
    assert one_job("model.name_or_path=org/m", change).key != base.key


def test_key_ignores_study_data_root_and_compile(tmp_path: Path, data_root: Path):
    import shutil

    base = one_job("model.name_or_path=org/m")
    assert one_job("model.name_or_path=org/m", "study=other").key == base.key
    assert one_job("model.name_or_path=org/m", "eval.compile=true").key == base.key
    text = "eval/wikitext-2-raw/wiki.test.raw"  # the same bytes under another root: the same job
    (tmp_path / text).parent.mkdir(parents=True)
    shutil.copy(data_root / text, tmp_path / text)
    assert one_job("model.name_or_path=org/m", f"eval.data_root={tmp_path}").key == base.key


def test_sixteen_bits_collapse_to_one_baseline_per_model_and_eval():
    jobs = build_jobs(
        cells(
            "model.name_or_path=org/a,org/b",
            "quant.dtype=int,fp,nf",
            "quant.block_size=64,null",
            "quant.outlier_fraction=0,0.02",
            "quant.quantize_embeddings=false,true",
            "quant.bits=16",
            "eval=wikitext2,smoke",
        )
    )
    assert len(jobs) == 2 * 2
    assert all(j.recipe == BASELINE and j.recipe.method == "none" and j.bits == 16 for j in jobs)


def test_identical_cells_dedupe_in_first_seen_order():
    grid = cells("model.name_or_path=org/a", "quant.bits=3,4")
    jobs = build_jobs(grid + grid + grid[:1])
    assert [j.bits for j in jobs] == [3, 4]


def test_ladder_resolver_expands_members():
    def resolve(ref: ModelRef):
        return [
            ModelSource(dataclasses.replace(ref, name_or_path=f"/cache/{i}"), f"ladder:t/{i}", "t")
            for i in range(3)
        ]

    jobs = build_jobs(cells("model.name_or_path=ladder:t", "quant.bits=3,4,16"), resolve)
    assert len(jobs) == 9 and {j.model_label for j in jobs} == {f"ladder:t/{i}" for i in range(3)}
    groups = group_by_model(jobs)
    assert [len(g) for g in groups.values()] == [3, 3, 3]
    assert {j.model_family for j in jobs} == {"t"}


def test_scheduler_keeps_workers_on_their_model_and_hands_each_job_once():
    jobs = build_jobs(cells("model.name_or_path=org/a,org/b,org/c", "quant.bits=3,4,5,6"))
    sched = Scheduler(jobs, n_workers=2)
    handed: list[tuple[int, Job]] = []
    worker = 0
    while sched.has_pending():
        job = sched.next_for(worker)
        assert job is not None
        handed.append((worker, job))
        worker = 1 - worker
    assert sorted(j.key for _, j in handed) == sorted(j.key for j in jobs)
    loads = {(w, j.model) for w, j in handed}
    assert len(loads) <= 4  # 3 models over 2 workers: at most one model is shared
    assert sched.next_for(0) is None


def test_scheduler_requeues_at_the_front():
    jobs = build_jobs(cells("model.name_or_path=org/a", "quant.bits=3,4"))
    sched = Scheduler(jobs, 1)
    first = sched.next_for(0)
    assert first is not None
    sched.requeue(first)
    assert sched.next_for(0) == first


@pytest.mark.parametrize(
    ("resources", "cfg", "n_jobs", "count", "options"),
    [
        ({"CPU": 2.0}, RayConfig(), 100, 2, {"num_gpus": 0, "num_cpus": 1}),
        ({"CPU": 16.0}, RayConfig(cpus_per_worker=4), 100, 4, {"num_gpus": 0, "num_cpus": 4}),
        ({"CPU": 16.0, "GPU": 8.0}, RayConfig(), 100, 8, {"num_gpus": 1.0, "num_cpus": 0}),
        ({"CPU": 16.0, "GPU": 1.0}, RayConfig(workers_per_gpu=4), 100, 4, {"num_gpus": 0.25, "num_cpus": 0}),
        ({"CPU": 16.0, "GPU": 3.0}, RayConfig(workers_per_gpu=2, max_workers=5), 100, 5, None),
        ({"CPU": 16.0, "GPU": 8.0}, RayConfig(), 3, 3, None),
    ],
)
def test_plan_workers_any_number_of_gpus_and_fractions(resources, cfg, n_jobs, count, options):
    plan = plan_workers(cfg, resources, n_jobs)
    assert plan.count == count
    if options is not None:
        assert plan.options == options


def test_plan_workers_without_room_fails():
    with pytest.raises(RuntimeError, match="no room"):
        plan_workers(RayConfig(cpus_per_worker=4), {"CPU": 2.0}, 10)


def _report() -> QuantReport:
    return QuantReport(
        n_params=100, n_quantized_params=80, n_kept_params=0, total_model_bits=660, bits_per_param=4.25
    )


def test_job_rows_round_trip_every_column(tmp_path: Path):
    job = one_job("model.name_or_path=org/m", "quant.dtype=fp", "quant.bits=4")
    env = WorkerEnv(device="cpu (x86_64)", versions='{"torch": "x"}')
    timings = {"load_s": 1.0, "restore_s": 0.1, "quantize_s": 0.2, "eval_s": 0.3}
    metrics = [
        MetricValue("wikitext2", "perplexity", 12.5, None, 100),
        MetricValue("piqa", "acc", 0.6, 0.01, 50),
    ]
    rows = job_rows(job, _report(), metrics, timings, env, family="llama")
    write_job_rows(tmp_path / job.study, job.key, rows)
    df = load_results(tmp_path)
    assert list(df.columns) == list(COLUMNS) and len(df) == 2
    row = df.iloc[1]
    assert (row["dtype"], row.bits, row.block_size, row.exponent_bits) == ("fp", 4, 64, 2)
    assert (row.status, row.model_family, row.total_model_bits) == ("ok", "llama", 660)


def test_failed_job_is_one_row_with_its_error(tmp_path: Path):
    job = one_job("model.name_or_path=org/m", "quant.bits=16")
    try:
        check_finite([MetricValue("wikitext2", "perplexity", float("nan"))])
    except FloatingPointError as err:
        error = error_line(err)
    rows = job_rows(job, None, (), {}, WorkerEnv("cpu", "{}"), error=error)
    assert len(rows) == 1 and rows[0]["status"] == "failed" and rows[0]["dtype"] == "none"
    assert error.startswith("FloatingPointError: non-finite metrics: wikitext2/perplexity=nan")


def test_progress_line_and_summary():
    progress = Progress(total=4, skipped=3, label="demo")
    progress.record("a" * 64, True)
    progress.record("b" * 64, False, "ValueError: boom")
    assert "2/4 jobs (1 failed)" in progress.line() and "ETA" in progress.line()
    text = progress.summary()
    assert "1 done, 3 skipped" in text and "ValueError: boom" in text and "2 not run" in text
    assert format_duration(3725) == "1h02m" and format_duration(65) == "1m05s"


def test_a_sigterm_that_ray_turned_into_a_plain_keyboard_interrupt_still_exits_143():
    import os
    import signal
    import time

    from pipeline.progress import Interrupted, interrupt_signal, sigterm_interrupts

    assert interrupt_signal(KeyboardInterrupt()) == signal.SIGINT  # Ctrl-C: 130
    with sigterm_interrupts():
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next bytecode
        progress = Progress(total=2)
        progress.interrupt(KeyboardInterrupt())  # what ray.wait raises instead when the signal lands in it
        assert progress.exit_code() == 128 + signal.SIGTERM
    assert interrupt_signal(KeyboardInterrupt()) == signal.SIGINT  # the block is over: Ctrl-C again


def test_replace_path_fast_path_matches_composition():
    composed = load_config(["quant.bits=5", "quant.block_size=null"])
    fast = replace_path(load_config([]), {"quant.bits": 5, "quant.block_size": None})
    assert composed == fast


def test_ladder_reference_resolves_to_labelled_trained_members(data_root, tmp_path, monkeypatch):
    from pipeline.config import model_ref
    from pipeline.run import resolve_models

    monkeypatch.setenv("KBIT_CACHE", str(tmp_path))
    (cell,) = cells("model.name_or_path=ladder:test/xs")
    (source,) = resolve_models(model_ref(cell.model), data_root)
    assert Path(source.ref.name_or_path).is_dir() and source.family == "test"
    assert source.label.startswith("ladder:test/xs@") and len(source.label) == len("ladder:test/xs@") + 8
    (plain,) = resolve_models(model_ref(cells("model.name_or_path=org/m")[0].model), data_root)
    assert plain.label == "org/m" and plain.family is None


def test_progress_for_logs_is_one_line_per_tenth_and_never_unchanged(caplog):
    progress = Progress(total=100, label="log", tty=False)  # a log file: no clock involved below
    lines = []
    with caplog.at_level(logging.INFO, logger="pipeline.progress"):
        for _ in range(30):
            progress.record("k", ok=True)
            progress.maybe_log()
            progress.maybe_log()  # the same count again: never a second line
            lines.append(len(caplog.records))
    assert [lines[i] for i in (8, 9, 18, 19, 28, 29)] == [0, 1, 1, 2, 2, 3]  # at 10, 20 and 30 jobs
    assert all("log] " in r.getMessage() for r in caplog.records)
