"""benchmarks/quantize_kernels.py runs end to end on a CPU (GPU-only columns empty), JSON and table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.kernels import cuda_syntax


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


def test_kernel_anatomy_runs_on_cpu(tmp_path: Path) -> None:
    # benchmarks/kernel_anatomy.py: a table of up to 32 words (int 4 bits: 15 midpoints, 16 values) is
    # read without bank conflicts, one wavefront a read; an 8-bit table conflicts (the pair lookup's one
    # 64-bit read for nf 8 bits: two half-warp passes, over 2 wavefronts each); the int grid at 8 bits
    # reads its midpoint only (its value computed); SASS counted where Triton's ptxas is installed.
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "anatomy.json"
    cmd = [
        sys.executable,
        "benchmarks/kernel_anatomy.py",
        "--bits",
        "4,8",
        "--dtypes",
        "int,nf",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["dtype"], r["bits"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows["int", 4]["search"] == "uniform" and rows["int", 4]["wavefronts"] == {
        "mids": 1.0,
        "values": 1.0,
    }
    assert rows["nf", 8]["search"] == "pairs" and set(rows["nf", 8]["wavefronts"]) == {"pairs"}
    assert rows["nf", 8]["wavefronts"]["pairs"] > 4.0 and rows["nf", 8]["wide"]
    assert rows["int", 8]["search"] == "grid-value" and set(rows["int", 8]["wavefronts"]) == {"mids"}
    assert "| nf | 8 | pairs (wide) |" in proc.stdout
    if json.loads(out.read_text())["ptxas"]:
        assert 20 < rows["int", 4]["sass_per_value"] < 60 and rows["nf", 8]["lds_per_value"] >= 1


def test_pairs_copies_probe_dry_run_and_source(tmp_path: Path) -> None:
    # benchmarks/pairs_copies_probe.py (a GPU probe with CuPy, which CI lacks): on the CPU its tables and
    # shared-memory sizes (nf 8: 1,024 value pairs, 16 copies = 128 KB, the most one program may hold), and
    # its CUDA source parses as C++ under stand-ins for the CUDA built-ins (where g++ exists).
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "benchmarks/pairs_copies_probe.py", "--dry-run", "--shape", "256x256",
           "--configs", "nf:8,quantile:8", "--copies", "1,16"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nf 8: 1024 pairs x 16 copies = 131072 bytes (fits)" in proc.stdout
    assert "quantile 8: 2048 pairs x 16 copies = 262144 bytes (too large)" in proc.stdout
    if not cuda_syntax.gxx_available():
        return
    sys.path.insert(0, str(repo))
    from benchmarks.pairs_copies_probe import SOURCE

    defines = {"COPIES": 16, "BLOCK": 1024, "UNROLL": 4, "LOOKUP": 1, "STAGES": 3}
    cuda_syntax.check_parses(SOURCE, tmp_path, defines)
