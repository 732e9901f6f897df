"""pipeline.compact / pipeline.resultlayout: per-job files merged into one part, read the same before,
during and after; a kill -9 at each step of a compaction loses and duplicates nothing; reruns after a
compaction win; compaction takes the study lock."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from pipeline.compact import HOOK_ENV, compact_study, main
from pipeline.lock import StudyLocked, study_lock
from pipeline.resultlayout import COMPACT_PREFIX, by_precedence, compact_seq, is_job_file
from pipeline.results import ResultsError, job_status, load_results, write_job_rows

ROOT = Path(__file__).resolve().parents[2]


def key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def write_job(study: Path, i: int, value: float = 1.0, status: str = "ok") -> None:
    rows = [
        {
            "job_key": key(i),
            "study": study.name,
            "model": "m",
            "bits": 4,
            "task": "wikitext2",
            "metric": metric,
            "value": value + n,
            "unit_sums": [value, float(i)],
            "unit_counts": [1.0, 2.0],
            "status": status,
            "error": None if status == "ok" else "boom",
            "created_at": datetime.now(UTC),
        }
        for n, metric in enumerate(("nats_per_token", "perplexity"))
    ]
    write_job_rows(study, key(i), rows)


def snapshot(study: Path) -> pd.DataFrame:
    frame = load_results(study).drop(columns=["created_at"])
    frame["unit_sums"] = frame["unit_sums"].map(tuple)
    return frame.sort_values(["job_key", "metric"]).reset_index(drop=True)


def kinds(study: Path) -> tuple[int, int, int]:
    """(per-job files, parts, other files incl. temp files)"""
    files = [p for p in study.iterdir() if p.suffix == ".parquet"]
    jobs = sum(is_job_file(p) for p in files)
    parts = sum(compact_seq(p) is not None for p in files)
    return jobs, parts, len(files) - jobs - parts


def test_layout_names_and_reading_order(tmp_path: Path) -> None:
    part1, part2 = (
        tmp_path / f"{COMPACT_PREFIX}000001-ab.parquet",
        tmp_path / f"{COMPACT_PREFIX}000002-cd.parquet",
    )
    job, rows = tmp_path / f"{key(1)}.parquet", tmp_path / "rows.parquet"
    assert is_job_file(job) and not is_job_file(rows) and compact_seq(part2) == 2 and compact_seq(job) is None
    assert by_precedence([part1, rows, part2, job]) == [*sorted([job, rows]), part2, part1]


def test_compaction_reads_the_same_and_is_idempotent(tmp_path: Path) -> None:
    study = tmp_path / "s"
    for i in range(30):
        write_job(study, i, status="failed" if i == 7 else "ok")
    before, status = snapshot(study), job_status(study)
    done = compact_study(study)
    assert (done.job_files, done.parts, done.rows) == (30, 0, 60) and kinds(study) == (0, 1, 0)
    pd.testing.assert_frame_equal(snapshot(study), before)
    assert job_status(study) == status and status[key(7)] == "failed"
    assert compact_study(study).part is None  # nothing new: nothing done
    for i in range(30, 35):
        write_job(study, i)
    assert compact_study(study).job_files == 5 and kinds(study) == (0, 1, 0)
    assert len(job_status(study)) == 35 and len(load_results(study)) == 70


def test_a_rerun_after_compaction_wins_and_is_merged_next_time(tmp_path: Path) -> None:
    study = tmp_path / "s"
    for i in range(4):
        write_job(study, i, status="failed" if i == 2 else "ok")
    compact_study(study)
    write_job(study, 2, value=9.0)  # rerun_failed: a per-job file next to the part
    assert job_status(study)[key(2)] == "ok"
    frame = load_results(study)
    assert len(frame) == 8 and frame[frame.job_key == key(2)].value.tolist() == [9.0, 10.0]
    compact_study(study)
    assert kinds(study) == (0, 1, 0) and job_status(study)[key(2)] == "ok"
    assert load_results(study).set_index(["job_key", "metric"]).loc[(key(2), "perplexity"), "value"] == 10.0


def test_a_committed_single_file_study_is_left_as_it_is(tmp_path: Path) -> None:
    study = tmp_path / "s"
    write_job(study, 1)
    (study / f"{key(1)}.parquet").rename(study / "rows.parquet")
    write_job(study, 2)
    compact_study(study)
    assert (study / "rows.parquet").is_file() and kinds(study) == (0, 1, 1)
    assert sorted(load_results(study).job_key.unique()) == sorted([key(1), key(2)])
    assert set(job_status(study)) == {key(1), key(2)}


def test_compaction_waits_for_no_driver(tmp_path: Path, capsys) -> None:
    study = tmp_path / "s"
    write_job(study, 1)
    with study_lock(study):
        with pytest.raises(StudyLocked):
            compact_study(study)
        assert main([str(study)]) == 1 and "skipped" in capsys.readouterr().err
        assert compact_study(study, locked=True).job_files == 1  # the holder itself may
    assert main([str(study)]) == 0 and "already compacted" in capsys.readouterr().out


def _wait_for(path: Path, process: subprocess.Popen[bytes]) -> None:
    for _ in range(12_000):  # a fail-safe against a hang, not a timing check
        if path.exists():
            return
        if process.poll() is not None:
            raise AssertionError(f"compaction ended (rc {process.returncode}) before {path.name}")
        time.sleep(0.01)
    raise AssertionError(f"compaction never reached {path.name}")


@pytest.mark.parametrize("step", ["written", "replaced", "deleting", "parts"])
def test_kill_9_at_any_step_loses_and_duplicates_nothing(tmp_path: Path, step: str) -> None:
    study, hook = tmp_path / "s", tmp_path / "hook"
    hook.mkdir()
    (hook / f"{step}.pause").touch()
    for i in range(10):
        write_job(study, i, status="failed" if i == 3 else "ok")
    compact_study(study)  # an earlier part ...
    for i in range(10, 20):
        write_job(study, i)
    write_job(study, 3, value=5.0)  # ... a job of it rerun since, and ten new jobs
    before, status = snapshot(study), job_status(study)
    env = {**os.environ, HOOK_ENV: str(hook), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "pipeline.compact", str(study)], env=env, cwd=ROOT)
    try:
        _wait_for(hook / step, process)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    pd.testing.assert_frame_equal(snapshot(study), before)  # half-compacted: the same rows, once each
    assert job_status(study) == status and status[key(3)] == "ok"
    done = compact_study(study)  # the dead driver's lock is taken over; the work is finished
    assert done.part is not None and kinds(study) == (0, 1, 0)
    pd.testing.assert_frame_equal(snapshot(study), before)
    assert job_status(study) == status


def test_a_folder_with_two_copies_outside_parts_is_still_refused(tmp_path: Path) -> None:
    study = tmp_path / "s"
    write_job(study, 1)
    compact_study(study)
    write_job(study, 1)
    (study / f"{key(1)}.parquet").rename(study / "copy.parquet")
    write_job(study, 1)
    with pytest.raises(ResultsError, match="is in two files"):
        load_results(study)
