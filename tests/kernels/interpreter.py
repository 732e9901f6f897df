"""Run a test script under Triton's interpreter (TRITON_INTERPRET=1) in a fresh Python: the variable is
read when Triton is imported, so it cannot be switched on inside the test process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_interpreted(script: str, timeout: int = 600) -> str:
    """Run `script` from the repository root with TRITON_INTERPRET=1; its stdout. Fails the test if it
    exits non-zero (with its stderr's tail) or does not print its "checked" line."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "checked" in proc.stdout
    return proc.stdout
