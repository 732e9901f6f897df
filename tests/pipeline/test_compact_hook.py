"""The start and end of a sweep (issue 17): `eval.compile=null` decided per model by the driver from
the jobs per worker, and the compaction hook (`compact` decides, the driver compacts under its lock,
and the rows read back are the rows the workers wrote)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.compact import AUTO_MIN_JOB_FILES, compact_after_sweep, compact_problems, should_compact
from pipeline.resultlayout import compact_seq, is_job_file
from pipeline.results import load_results, study_files, write_job_rows
from pipeline.run import execute, plan_run
from pipeline.sweep import ConfigError

EVAL = [
    "eval.perplexity=[{name:wikitext2,path:eval/wikitext-2-raw/wiki.test.raw,"
    "context_length:64,stride:64,max_tokens:256}]",
    "eval.tasks=[]",
    "eval.batch_size=4",
]


def test_the_rule() -> None:
    assert not should_compact("auto", AUTO_MIN_JOB_FILES)
    assert should_compact("auto", AUTO_MIN_JOB_FILES + 1)
    assert should_compact("always", 1) and not should_compact("never", 10**6)
    assert should_compact("auto", 3, threshold=2) and not should_compact("auto", 2, threshold=2)
    assert compact_problems("auto") == []
    with pytest.raises(ValueError, match=r"compact='sometimes'.*auto, always, never"):
        should_compact("sometimes", 5)


def test_auto_compacts_only_past_the_threshold(tmp_path: Path) -> None:
    study = tmp_path / "s"
    for i in range(3):
        write_job_rows(study, f"{i:064x}", [{"job_key": f"{i:064x}", "study": "s", "status": "ok"}])
    before = load_results(study)
    assert compact_after_sweep(study, "auto", threshold=3) is None
    assert len(study_files(study)) == 3
    done = compact_after_sweep(study, "auto", threshold=2)
    assert done is not None and done.job_files == 3
    files = study_files(study)
    assert len(files) == 1 and compact_seq(files[0]) == 1
    pd.testing.assert_frame_equal(load_results(study), before)


def test_bad_setting_is_refused_before_ray(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"compact='sometimes'"):
        plan_run([*EVAL, f"results_root={tmp_path}", f"model.name_or_path={tiny_model_dir}",
                  "compact=sometimes"])  # fmt: skip


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def _key_rows(frame: pd.DataFrame, keys: set[str]) -> pd.DataFrame:
    rows = frame[frame["job_key"].isin(keys)].sort_values(["job_key", "task", "metric"])
    return rows.reset_index(drop=True)


def test_a_sweep_ends_compacted_with_the_same_rows(ray_cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    base = [*EVAL, f"results_root={tmp_path}", "study=hook", f"model.name_or_path={tiny_model_dir}",
            "quant.dtype=int", "quant.block_size=64"]  # fmt: skip
    first = plan_run([*base, "quant.bits=4", "compact=never"])
    assert execute(first).failed == 0
    study = tmp_path / "hook"
    assert [is_job_file(f) for f in study_files(study)] == [True]  # never: left as written
    written = load_results(study)
    second = plan_run([*base, "quant.bits=3,4", "compact=always"])
    assert len(second.to_run) == 1 and execute(second).failed == 0
    files = study_files(study)
    assert len(files) == 1 and compact_seq(files[0]) == 1  # one part, no loose job file
    after = load_results(study)
    assert after["job_key"].nunique() == 2 and set(after["status"]) == {"ok"}
    first_keys = {job.key for job in first.to_run}
    pd.testing.assert_frame_equal(_key_rows(after, first_keys), _key_rows(written, first_keys))


def test_compile_auto_break_even_rule() -> None:
    from pipeline.evals.evaluate import COMPILE_COST_S, COMPILE_SAVING_PER_JOB_S, compile_pays

    break_even = COMPILE_COST_S / COMPILE_SAVING_PER_JOB_S  # ~285 jobs a worker
    assert 250 < break_even < 320
    assert not compile_pays(5) and not compile_pays(int(break_even))
    assert compile_pays(int(break_even) + 1) and compile_pays(1206)


def test_dispatch_decides_compile_per_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from pipeline.dispatch import resolve_compile

    plan = plan_run([*EVAL, f"results_root={tmp_path}", f"model.name_or_path={tiny_model_dir}",
                     "quant.dtype=int,fp", "quant.bits=3,4", "dry_run=true"])  # fmt: skip
    jobs = list(plan.to_run)
    assert len(jobs) == 4 and all(job.evals.compile is None for job in jobs)
    few = resolve_compile(jobs, n_workers=2)  # 2 jobs a worker: compiling does not pay
    assert [job.evals.compile for job in few] == [False] * 4
    assert [job.key for job in few] == [job.key for job in jobs]  # compile is not in the key
    many = [replace(jobs[0], study=f"s{i}") for i in range(300)]  # 300 jobs of one model on 1 worker
    assert {job.evals.compile for job in resolve_compile(many, n_workers=1)} == {None}
    assert {job.evals.compile for job in resolve_compile(many, n_workers=2)} == {False}  # 150 each
    forced = [replace(job, evals=replace(job.evals, compile=True)) for job in jobs]
    assert [job.evals.compile for job in resolve_compile(forced, n_workers=4)] == [True] * 4
