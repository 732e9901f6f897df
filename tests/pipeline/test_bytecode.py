"""The bytecode cache where the environment writes none (`pipeline.bytecode`): which environments get it,
and a real Ray worker started by `start_workers` writing its modules' bytecode under $KBIT_CACHE/pycache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import bytecode


@pytest.fixture
def no_shipped_bytecode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packages without bytecode beside their source, as on the lent H200 image (this venv has it)."""
    monkeypatch.setattr(bytecode, "shipped_bytecode", lambda package="torch": False)


def test_pip_installed_packages_ship_their_bytecode() -> None:
    # pip compiles at install, so this venv's torch has it: no cache is needed (or made) here.
    bytecode.shipped_bytecode.cache_clear()
    assert bytecode.shipped_bytecode("torch") is True
    assert bytecode.cache_dir({"PYTHONDONTWRITEBYTECODE": "1"}) is None
    assert bytecode.shipped_bytecode("no_such_package_here") is True  # nothing to compile


def test_only_an_environment_that_writes_no_bytecode_gets_the_cache(
    tmp_path: Path, no_shipped_bytecode
) -> None:
    off = {"PYTHONDONTWRITEBYTECODE": "1", "KBIT_CACHE": str(tmp_path)}
    assert bytecode.cache_dir(off) == tmp_path / "pycache"
    assert bytecode.worker_env(off) == {
        "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache"),
        "PYTHONDONTWRITEBYTECODE": "",
    }
    assert bytecode.cache_dir({"KBIT_CACHE": str(tmp_path)}) is None  # bytecode written as usual
    assert bytecode.worker_env({"PYTHONDONTWRITEBYTECODE": ""}) == {}  # empty: writing is on
    assert bytecode.cache_dir({**off, "PYTHONPYCACHEPREFIX": "/elsewhere"}) is None  # the user's prefix
    assert bytecode.cache_dir({**off, "KBIT_BYTECODE_CACHE": "0"}) is None
    relative = bytecode.cache_dir({"PYTHONDONTWRITEBYTECODE": "1", "KBIT_CACHE": "cache"})
    assert relative == Path.cwd() / "cache" / "pycache"  # workers start in other directories
    home = bytecode.cache_dir({"PYTHONDONTWRITEBYTECODE": "1"})
    assert home == Path.home() / ".cache" / "kbitscale" / "pycache"


def test_the_cli_process_writes_its_bytecode_under_the_cache(tmp_path: Path) -> None:
    # What `python -m pipeline.run` does first: from then on imports write .pyc files under the prefix.
    # (In the child, packages are taken to ship no bytecode, as on the lent H200 image.)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "probe_module.py").write_text("VALUE = 1\n")
    code = (
        "import sys; from pipeline import bytecode; bytecode.shipped_bytecode = lambda package='': False; "
        "from pipeline.bytecode import use_in_this_process; where = use_in_this_process(); "
        "sys.path.insert(0, sys.argv[1]); import probe_module; print(where, sys.flags.dont_write_bytecode)"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "KBIT_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONPYCACHEPREFIX", None)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "src")], capture_output=True,
                          text=True, env=env, cwd=repo, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == str(tmp_path / "cache" / "pycache")
    assert list((tmp_path / "cache" / "pycache").rglob("probe_module*.pyc")), "no bytecode under the cache"
    assert not (tmp_path / "src" / "__pycache__").exists()  # the source tree untouched


class BytecodeProbe:
    """A stand-in worker class (`start_workers(worker_cls=...)`): reports its process's bytecode settings."""

    def __init__(self, results_root: str, cpu_threads: int, plugins: list[str]) -> None:
        pass

    def settings(self) -> tuple[str | None, bool, str | None]:
        return sys.pycache_prefix, sys.dont_write_bytecode, os.environ.get("PYTHONPYCACHEPREFIX")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_ray_worker_gets_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_shipped_bytecode
) -> None:
    import ray

    from pipeline.cluster import WorkerPlan, start_workers

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("KBIT_CACHE", str(tmp_path))
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        (worker,) = start_workers(
            WorkerPlan(1, {"num_cpus": 1, "num_gpus": 0}, 1), tmp_path, 0, BytecodeProbe
        )
        prefix, dont_write, env_prefix = ray.get(worker.settings.remote(), timeout=120)
    finally:
        ray.shutdown()
    assert prefix == env_prefix == str(tmp_path / "pycache") and dont_write is False
