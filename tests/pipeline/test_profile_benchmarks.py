"""benchmarks/quantize_model.py and benchmarks/forward_profile.py run end to end on a CPU (tiny shape)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, f"benchmarks/{script}", "--device", "cpu", "--shape", "tiny", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quantize_model_benchmark_times_every_config_against_the_copy_floor(tmp_path: Path) -> None:
    out = tmp_path / "q.json"
    proc = run("quantize_model.py", "--reps", "1", "--out", str(out))
    record = json.loads(out.read_text())
    assert record["matrices"] == 16 and record["copy_floor_s"] > 0
    assert [(r["config"], r["codebooks"]) for r in record["rows"]][3:5] == [
        ("quantile4-b64", "batched"),
        ("quantile4-b64", "per matrix"),
    ]
    # quantize_s is a job minus a restore, both timed once: its sign is noise on a busy machine
    assert all(isinstance(r["quantize_s"], float) for r in record["rows"])
    assert "| quantile4-b64 | per matrix |" in proc.stdout


@pytest.mark.slow  # torch.compile with C++ codegen: minutes on a busy machine
def test_forward_profile_compares_eager_compiled_and_gemm_variants(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    run("forward_profile.py", "--rows", "9", "--context", "12", "--continuations", "2",
        "--continuation-length", "6", "--reps", "1", "--out", str(out))  # fmt: skip
    record = json.loads(out.read_text())
    variants = record["variants"]
    assert list(variants) == ["packed", "causal", "gemm", "compiled-dynamic", "compiled-static", "compiled"]
    assert record["tokens"] == 9 * 24 and all(v["seconds"] > 0 for v in variants.values())
    assert set(variants["compiled"]["other_shapes_s"]) == {"6x24", "9x18", "1x18"}


def test_gptq_benchmark_times_hessians_solves_and_the_naive_way(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gptq.py", "--shape", "tiny", "--device", "cpu", "--samples", "4",
         "--seq-len", "64", "--no-jobs", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["hessians_gib"] > 0 and record["calibration_tokens"] == 4 * 64
    assert [r["config"] for r in record["solves"]][:2] == ["gptq-int4-b64", "gptq-nf3-b64"]
    assert "| gptq-quantile4-b64 |" in proc.stdout and "naive (one matrix at a time" in proc.stdout
