"""Workers kept between commands (`ray.keep_workers=true`, `pipeline.kept`): names, refusals, and two real
CLI runs on a `ray start --head` cluster, the second finding the first's worker with its model loaded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.kept import PREFIX, code_version, kept_prefix, stale_names
from pipeline.run import main
from tests.pipeline.test_resume import EVAL

ROOT = Path(__file__).resolve().parents[2]


def test_the_name_follows_every_start_setting_and_the_code():
    options, args = {"num_gpus": 1, "num_cpus": 0}, ("results", 1, [])
    base = kept_prefix(options, args, {}, "v1")
    assert base.startswith(PREFIX) and base.endswith("-")
    assert kept_prefix(dict(reversed(options.items())), args, {}, "v1") == base  # key order is not a setting
    assert kept_prefix({**options, "num_gpus": 0.5}, args, {}, "v1") != base
    assert kept_prefix(options, ("elsewhere", 1, []), {}, "v1") != base
    assert kept_prefix(options, ("results", 1, ["my_pkg.method"]), {}, "v1") != base
    assert kept_prefix(options, args, {"gpus_per_worker": 2}, "v1") != base
    assert kept_prefix(options, args, {}, "v2") != base
    assert stale_names([f"{base}0", f"{base}1", f"{PREFIX}0123456789abcdef-0", "someone-else"], base) == [
        f"{PREFIX}0123456789abcdef-0"
    ]


def test_the_code_version_changes_with_a_source_file(tmp_path):
    for folder in ("pipeline", "kernels"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.py").write_text("x = 1\n")
    before = code_version.__wrapped__(tmp_path)
    assert code_version.__wrapped__(tmp_path) == before
    (tmp_path / "kernels" / "a.py").write_text("x = 2\n")
    assert code_version.__wrapped__(tmp_path) != before


def test_keeping_workers_needs_a_cluster_that_outlives_the_command(tmp_path, capsys):
    assert main(["-m", f"results_root={tmp_path}", "eval.tasks=[]", "ray.keep_workers=true"]) == 2
    assert "ray.keep_workers=true needs a Ray cluster that outlives the command" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for path in folder.glob("**/*.parquet") for row in pq.read_table(path).to_pylist()]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
def test_a_second_command_reuses_the_kept_worker_and_its_model(tiny_model_dir, tmp_path):
    port = _free_port()
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
         "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    address = "auto"  # the cluster `ray start` recorded last: this one (an explicit 127.0.0.1 is not its IP)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KBIT_CACHE": str(tmp_path / "cache")}
    argv = [*EVAL, f"model.name_or_path={tiny_model_dir}", f"results_root={tmp_path}", "study=kept",
            f"ray.address={address}", "ray.keep_workers=true"]  # fmt: skip

    def run(*grid: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.run", "-m", *argv, *grid],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stderr

    try:
        assert head.stdout is not None
        for line in head.stdout:  # `ray start` records the cluster (for address=auto), then blocks
            if "block forever" in line:
                break
        assert head.poll() is None, "ray start --head did not come up"
        first = run("quant.dtype=int", "quant.bits=3")
        assert "kept workers: 0 reused, 1 started" in first, first
        second = run("quant.dtype=int", "quant.bits=4")  # another job, the same model and workers
        assert "kept workers: 1 reused, 0 started" in second, second
        # the rows, not the workers' forwarded log lines (which a joined cluster may deliver after the
        # driver exits): the first command's job loaded the model, the second's found it resident
        load_s = {row["bits"]: row["load_s"] for row in _rows(tmp_path / "kept")}
        assert load_s[3] > 0 and load_s[4] == 0, load_s
        released = subprocess.run(
            [sys.executable, "-m", "pipeline.kept", "release", "--address", address],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert "released 1 kept worker(s)" in released.stdout, released.stdout + released.stderr
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its cluster on SIGTERM
        head.wait(timeout=60)


def test_a_plugin_counts_by_its_source(tmp_path, monkeypatch):
    from pipeline.kept import plugin_sources

    (tmp_path / "my_plugin.py").write_text("SCALE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = plugin_sources(["my_plugin"])
    assert plugin_sources(["my_plugin"]) == before and plugin_sources([]) != before
    (tmp_path / "my_plugin.py").write_text("SCALE = 2\n")
    assert plugin_sources(["my_plugin"]) != before
    assert plugin_sources(["no_such_module_here"]) != plugin_sources([])  # by its name alone


def test_release_names_an_address_nothing_answers_at(capsys):
    from pipeline.kept import main as kept_main

    assert kept_main(["release", "--address", f"127.0.0.1:{_free_port()}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ray.address=127.0.0.1:") and "no Ray cluster answers" in err
