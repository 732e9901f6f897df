"""benchmarks/quantize_kernels.py runs end to end on a CPU (GPU-only columns empty), JSON and table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "kernels.json"
    cmd = [sys.executable, "benchmarks/quantize_kernels.py", "--quick", "--device", "cpu",
           "--shapes", "32x64", "--dtypes", "int,quantile", "--bits", "4", "--reps", "1", "--no-compile",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["copy_gbps"] > 0 and len(record["rows"]) == 6
    row = record["rows"][0]
    assert row["shape"] == [32, 64] and row["torch_ms"] > 0 and row["fused_ms"] is None
    assert "| 32x64 | quantile | 4 | tensor |" in out.with_suffix(".md").read_text()
