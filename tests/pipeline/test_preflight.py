"""The remaining bad inputs: each gets one clear message before anything runs (before a worker starts;
run-wide settings before Ray starts)."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

from pipeline.preflight import address_problem
from pipeline.run import describe_plan, main, plan_run
from pipeline.sweep import ConfigError

WIKITEXT = "eval/wikitext-2-raw/wiki.test.raw"


def _problems(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line[4:] for line in capsys.readouterr().err.splitlines() if line.startswith("  - ")]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_bad_results_root_and_ray_settings_are_refused_before_ray_starts(tiny_model_dir, tmp_path, capsys):
    import ray

    (tmp_path / "file").write_text("not a folder")
    argv = [f"model.name_or_path={tiny_model_dir}", f"results_root={tmp_path / 'file'}"]
    argv += ["ray.num_cpus=0", "ray.max_workers=-1", f"ray.address=127.0.0.1:{_closed_port()}"]
    assert main(argv) == 2
    assert not ray.is_initialized()  # refused before Ray starts (no clock: the probe has its own timeout)
    problems = _problems(capsys)
    file = str(tmp_path / "file")
    assert problems[0] == f"results_root={file!r}: {file!r} is a file, not a folder"
    assert "ray.num_cpus=0: must be >= 1, or null (Ray decides)" in problems
    assert "ray.max_workers=-1: must be >= 1, or null (Ray decides)" in problems
    assert any("no Ray cluster answers at 127.0.0.1" in p and "Connection refused" in p for p in problems)


def test_an_unknown_host_is_refused():
    problem = address_problem("ray://nosuchhost.invalid")
    assert problem is not None and "nosuchhost.invalid:10001" in problem
    assert address_problem(None) is None and address_problem("local") is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any file mode")
def test_a_results_root_that_cannot_be_written_is_refused(tiny_model_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main([f"model.name_or_path={tiny_model_dir}", f"results_root={locked}"]) == 2
    assert _problems(capsys) == [f"results_root={str(locked)!r}: {str(locked)!r} is not writable"]


def test_a_ladder_with_an_impossible_torch_dtype_is_refused(tmp_path, capsys):
    argv = ["model=ladder/tiny", "model.torch_dtype=float8", f"results_root={tmp_path}", "dry_run=true"]
    assert main(argv) == 2
    (problem,) = _problems(capsys)
    assert (
        "unknown torch_dtype 'float8'" in problem and "(allowed: auto, bfloat16, float16, float32)" in problem
    )


def test_a_ladder_to_train_needs_a_corpus_unless_nothing_is_trained(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("KBIT_CACHE", str(tmp_path / "cache"))  # nothing trained
    root = tmp_path / "data"
    (root / WIKITEXT).parent.mkdir(parents=True)
    shutil.copy(data_root / WIKITEXT, root / WIKITEXT)
    argv = ["model.name_or_path=ladder:test/xs", f"eval.data_root={root}", f"results_root={tmp_path / 'r'}"]
    argv += ["eval.perplexity.0.context_length=64", "eval.perplexity.0.stride=64"]
    with pytest.raises(ConfigError) as err:
        plan_run(argv)
    (problem,) = err.value.problems
    assert "ladder:test/xs: xs not trained yet, and no corpus to train them from" in problem
    assert not (tmp_path / "cache").exists()
    assert len(plan_run([*argv, "dry_run=true"]).jobs) == 1  # a dry run trains nothing


def test_indexed_overrides_set_one_list_item(tiny_model_dir, tmp_path, capsys):
    base = [f"model.name_or_path={tiny_model_dir}", f"results_root={tmp_path}", "dry_run=true"]
    plan = plan_run([*base, "eval.perplexity.0.max_tokens=2048,4096", "eval.perplexity.0.stride=256"])
    windows = sorted((j.evals.perplexity[0].max_tokens, j.evals.perplexity[0].stride) for j in plan.jobs)
    assert windows == [(2048, 256), (4096, 256)]
    assert main([*base, "eval.perplexity.2.max_tokens=2048"]) == 2
    (problem,) = _problems(capsys)
    assert problem.startswith(
        "eval.perplexity.2.max_tokens=2048: eval.perplexity has 1 item(s) (indices 0..0)"
    )


def test_a_bad_value_in_every_grid_is_reported_once(capsys):
    assert main(["-m", "+sweep=smoke", "quant.bits=3.5", "dry_run=true"]) == 2
    assert _problems(capsys) == [
        "quant.bits=3.5: Value '3.5' of type 'float' could not be converted to Integer"
    ]


def test_a_rerun_says_how_many_failed_jobs_it_skipped(tiny_model_dir, tmp_path, caplog):
    from pipeline.jobrows import WorkerEnv, job_rows
    from pipeline.results import write_job_rows

    argv = [
        f"model.name_or_path={tiny_model_dir}",
        f"results_root={tmp_path}",
        "dry_run=true",
        "quant.bits=3,4",
    ]
    first = plan_run(argv)
    failed = first.jobs[0]
    rows = job_rows(failed, None, (), {}, WorkerEnv("cpu", "{}"), error="RuntimeError: boom")
    write_job_rows(tmp_path / failed.study, failed.key, rows)
    with caplog.at_level("INFO", logger="pipeline.run"):
        again = plan_run(argv)
    assert (again.skipped, again.skipped_failed, len(again.to_run)) == (1, 1, len(first.jobs) - 1)
    note = "1 failed in an earlier run and skipped (rerun_failed=true runs them again)"
    assert note in caplog.text and note in describe_plan(again)
    assert plan_run([*argv, "rerun_failed=true"]).skipped_failed == 0


def test_the_ladder_cli_refuses_unknown_names_in_one_line(capsys, tmp_path):
    from pipeline.ladders.configs import LADDERS
    from pipeline.ladders.ladder import main as ladders_main

    assert ladders_main(["bogus"]) == 2
    allowed = ", ".join(sorted(LADDERS))
    assert capsys.readouterr().err.strip() == f"error: unknown ladder 'bogus' (allowed: {allowed})"
    assert ladders_main(["test", "--size", "xl"]) == 2
    assert "unknown size of ladder 'test' 'xl'" in capsys.readouterr().err
    argv = ["test", "--data-root", str(tmp_path), "--cache", str(tmp_path / "cache")]
    assert ladders_main(argv) == 2
    assert "corpus folder" in capsys.readouterr().err and not (tmp_path / "cache").exists()
