"""One driver per study: the lock names its holder, a dead holder's lock is taken over, and a new
holder cleans what a crash left. A second process holds the lock for real (a child Python)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.lock import LOCK_NAME, StudyLocked, study_lock

HOLDER = """
import sys
from pathlib import Path
from pipeline.lock import study_lock
with study_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills this process
"""


@pytest.fixture
def holder(tmp_path: Path):
    """A child process holding the lock of `tmp_path / "s"` until the test ends or kills it."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "s")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    yield child
    if child.poll() is None:
        child.kill()
    child.wait()


def acquire(study: Path) -> None:
    with study_lock(study):
        pass


def test_lock_is_held_for_the_block_and_removed_after(tmp_path: Path) -> None:
    study = tmp_path / "s"
    with study_lock(study) as path:
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(StudyLocked, match=rf"in use by another driver: pid {os.getpid()} on host"):
            acquire(study)
    assert not (study / LOCK_NAME).exists()
    with study_lock(study):  # free again
        pass


def test_a_second_driver_is_refused_naming_the_holder_then_takes_over_when_it_dies(
    tmp_path: Path, holder: subprocess.Popen, caplog
) -> None:
    study = tmp_path / "s"
    with pytest.raises(StudyLocked) as info:
        acquire(study)
    assert f"pid {holder.pid} on host {socket.gethostname()}" in str(info.value)
    assert "wait for it to end" in str(info.value)
    holder.send_signal(signal.SIGKILL)  # a driver killed -9 leaves its lock file behind
    holder.wait()
    assert json.loads((study / LOCK_NAME).read_text())["pid"] == holder.pid
    with study_lock(study) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of an ended driver (pid {holder.pid}" in caplog.text


def test_a_lock_file_from_another_host_is_not_taken_over(tmp_path: Path) -> None:
    study = tmp_path / "s"
    study.mkdir()
    (study / LOCK_NAME).write_text(json.dumps({"host": "other-node", "pid": 1, "started": "then"}))
    with pytest.raises(StudyLocked, match=r"pid 1 on host other-node .*if that driver has ended, delete"):
        acquire(study)
