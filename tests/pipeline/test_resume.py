"""Damaged studies resume and one driver runs a study: the real planner and driver on a tiny model.

Planning (dry run included) skips an unreadable result file with a warning and runs its job again;
a second driver on a study is refused before Ray starts, naming the holder; SIGTERM ends a real
driver process like Ctrl-C (summary, exit code 143, no traceback, lock released).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.lock import LOCK_NAME, study_lock
from pipeline.results import job_path, write_job_rows
from pipeline.run import main, plan_run

ROOT = Path(__file__).resolve().parents[2]
EVAL = [
    "eval.perplexity=[{name:wikitext2,path:eval/wikitext-2-raw/wiki.test.raw,"
    "context_length:64,stride:64,max_tokens:256}]",
    "eval.tasks=[]",
    "eval.batch_size=4",
]
GRID = ["quant.dtype=int,nf", "quant.bits=3,4", "quant.block_size=64"]  # 4 jobs


def overrides(model_dir: Path, root: Path) -> list[str]:
    return [*EVAL, *GRID, f"model.name_or_path={model_dir}", f"results_root={root}", "study=s"]


def test_dry_run_skips_an_unreadable_file_and_runs_its_job_again(tiny_model_dir, tmp_path, caplog):
    argv = [*overrides(tiny_model_dir, tmp_path), "dry_run=true"]
    first, second = plan_run(argv).to_run[:2]
    write_job_rows(tmp_path / "s", first.key, [{"job_key": first.key, "status": "ok"}])
    broken = job_path(tmp_path / "s", second.key)
    broken.write_bytes(b"PAR1\x00\x00 cut short by a full disk")
    plan = plan_run(argv)
    assert plan.skipped == 1 and second in plan.to_run and first not in plan.to_run
    assert f"{broken.name}: not a readable Parquet file" in caplog.text


def test_a_second_driver_on_a_study_is_refused_naming_the_holder(tiny_model_dir, tmp_path, capsys):
    import ray

    with study_lock(tmp_path / "s"):
        assert main(["-m", *overrides(tiny_model_dir, tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "error: study" in err and f"in use by another driver: pid {os.getpid()} on host" in err
    assert not ray.is_initialized()  # refused before Ray started
    assert not list((tmp_path / "s").glob("*.parquet"))


@pytest.mark.slow
def test_sigterm_ends_the_driver_like_ctrl_c(tiny_model_dir, tmp_path):
    argv = [*overrides(tiny_model_dir, tmp_path), "ray.num_cpus=1"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", "-m", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert driver.stderr is not None
    head = []
    for line in driver.stderr:  # until the workers are started: the sweep is under way, far from done
        head.append(line)
        if "worker(s), each" in line:
            break
    assert driver.poll() is None, "".join(head)
    driver.send_signal(signal.SIGTERM)
    out, err = driver.communicate()
    assert driver.returncode == 128 + signal.SIGTERM, "".join(head) + err
    assert "interrupted (SIGTERM)" in out and "re-run the same command" in out
    assert re.search(r"[1-9][0-9]* not run", out), out
    assert "Traceback" not in err
    assert not (tmp_path / "s" / LOCK_NAME).exists()
