"""Smoke test: `benchmarks/evaluation.py` runs end to end on CPU with tiny settings and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "evaluation.py"


def test_evaluation_benchmark_end_to_end(tmp_path: Path, data_root: Path) -> None:
    """One config, both scorers, an in-process naive run: every phase timed, MFU and speed-up reported."""
    out = tmp_path / "eval.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--tasks",
        "piqa,lambada_openai",
        "--limit",
        "2",
        "--configs",
        "1",
        "--batch-size",
        "8",
        "--naive",
        "inprocess",
        "--naive-index",
        "offline",
        "--naive-bootstrap",
        "0",
        "--data-root",
        str(data_root),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["versions"]["torch"] and result["matmul"]["flops"] > 0
    for scorer in ("hflm", "fast"):
        job = result["pipeline"][scorer]["jobs"][0]
        for key in ("quantize_s", "forward_s", "eval_s", "job_s", "forward_flops", "mfu_eval"):
            assert job[key] > 0, (scorer, key)
        assert 0 < job["overhead_share"] < 1
        assert set(job["metrics"]) >= {"piqa/acc", "lambada_openai/acc"}
        assert result["summary"][scorer]["speedup"] > 0
    assert result["naive"][0]["wall_s"] > 0
    # both scorers saw the same quantized weights: the same accuracies
    hflm, fast = (result["pipeline"][s]["jobs"][0]["metrics"] for s in ("hflm", "fast"))
    assert hflm["piqa/acc"] == fast["piqa/acc"] and hflm["lambada_openai/acc"] == fast["lambada_openai/acc"]
    assert "| scorer |" in out.with_suffix(".md").read_text()
