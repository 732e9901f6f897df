"""benchmarks/worker_profile.py runs end to end on a CPU on a tiny saved model: every step timed, the
Ray worker's and the driver's imports profiled, JSON written and the table printed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM


def test_worker_profile_runs_on_cpu(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    cfg = GPTNeoXConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp_path / "model")
    out = tmp_path / "profile.json"
    cmd = [
        sys.executable,
        "benchmarks/worker_profile.py",
        "--model",
        str(tmp_path / "model"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    steps = result["steps"]
    assert set(steps) >= {"import_torch", "job_modules", "read_files", "load_model", "safetensors_to_device"}
    assert all(s >= 0 for s in steps.values()) and result["weight_bytes"] > 0
    for part in ("driver_imports", "ray_worker_imports"):
        assert result[part]["wall_s"] > 0 and result[part]["top"], part
        assert f"{part} (python -X importtime)" in proc.stdout
