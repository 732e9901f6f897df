"""`benchmarks/startup.py` on the tiny shape: two real sweeps through the CLI, the JSON it writes, and
the worker's start-up lines (the second sweep's Evaluator loads its texts and tasks from the cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.startup import DRIVER_PHASES
from pipeline.startup import PHASE_LOGGER, phase_line

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("worker_init", "model_load", "snapshot", "evaluator_build", "first_job")


def test_phase_lines_parse_back():
    from benchmarks.startup import parse_lines

    line = f"(ModelWorker pid=1) {phase_line('model_load', 1.5, job='abc')}"
    parsed = parse_lines([(2.0, line), (3.0, "x: 5 cells -> 5 jobs (planned in 0.10s)")], t0_epoch=0.0)
    assert parsed["phases"]["model_load"]["s"] == 1.5 and parsed["phases"]["model_load"]["job"] == "abc"
    assert parsed["driver"] == {"planned": 3.0}
    assert PHASE_LOGGER.startswith("pipeline.startup")


@pytest.mark.slow
def test_startup_benchmark_tiny_cpu(tmp_path, data_root):
    out = tmp_path / "startup.json"
    command = [
        sys.executable, "benchmarks/startup.py", "--shape", "tiny", "--eval", "smoke", "--device", "cpu",
        "--data-root", str(data_root), "--workdir", str(tmp_path / "work"), "--out", str(out),
        "ray.max_workers=1",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["shape"] == "tiny" and result["jobs"] == 5 and "pipeline.run" in result["command"]
    assert out.with_suffix(".md").read_text().startswith(result["device"])
    for name in ("cold", "warm"):
        run = result["runs"][name]
        assert run["rc"] == 0 and run["rows"] == 5 and len(run["row_times_s"]) == 5
        for key in ("first_row_s", "last_row_s", "wall_s", "steady_job_s", "row_job_s"):
            assert isinstance(run[key], float), (name, key, run[key])
        assert set(PHASES) <= set(run["phases"]), run["phases"]
        assert set(DRIVER_PHASES) <= set(run["phases"]), run["phases"]  # the driver's own lines
        ends = [run["phases"][name]["end_s"] for name in DRIVER_PHASES[:2] + DRIVER_PHASES[3:4]]
        assert ends == sorted(ends)  # in the order they happen
        assert run["phases"]["workers_created"]["end_s"] >= run["phases"]["driver_preflight"]["end_s"]
        assert {"planned", "dispatch"} <= set(run["driver"])
        build = run["phases"]["evaluator_build"]
        assert {"texts", "kl", "tasks", "compile"} <= set(build)
    cold, warm = (result["runs"][name]["phases"]["evaluator_build"]["cache"] for name in ("cold", "warm"))
    assert cold == "wikitext2:miss,tasks:miss" and warm == "wikitext2:hit,tasks:hit"
    assert result["runs"]["cold"]["phases"]["first_job"]["status"] == "ok"


def test_preflight_profile_times_and_profiles_the_checks(tiny_model_dir, tmp_path, data_root):
    out = tmp_path / "preflight.json"
    command = [
        sys.executable, "benchmarks/preflight_profile.py", "--top", "5", "--out", str(out), "--",
        "-m", f"model.name_or_path={tiny_model_dir}", "eval.tasks=[]", f"eval.data_root={data_root}",
        "quant.dtype=int", "quant.bits=3,4", f"results_root={tmp_path / 'results'}",
    ]  # fmt: skip
    env = {**os.environ, "KBIT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    steps = {"import_s", "expand_s", "start_early_s", "preflight_s", "preflight_thread_cpu_s"}
    assert set(result["steps"]) == steps
    assert len(result["top"]) == 5 and any("check_cells" in r["function"] for r in result["top"])
    assert "| cumulative s |" in done.stdout
    assert not (tmp_path / "results").exists()  # pre-flight writes no result
    # --prestart: Ray starts first, as on the CLI's first line, is adopted, and is stopped at the end
    prestart = [*command[:2], "--prestart", *command[2:]]
    done = subprocess.run(prestart, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(json.loads(out.read_text())["steps"]) == steps
    assert "startup phase=ray_start" in done.stderr
