"""`python -m pipeline.run --help`: every group, option, sweep, key and exit code; no heavy imports."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from pipeline import config
from pipeline.cli_help import help_text

ROOT = Path(__file__).resolve().parents[2]


NESTED = {
    "model": config.ModelConfig, "quant": config.QuantConfig, "eval": config.EvalConfig,
    "ray": config.RayConfig, "calibration": config.CalibrationConfig,
}  # fmt: skip


def _keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in NESTED:
            keys += _keys(NESTED[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_help_lists_every_key_group_sweep_and_exit_code():
    text = help_text()
    for key in _keys(config.Config) + [f"eval.perplexity[i].{f.name}" for f in
                                        dataclasses.fields(config.PerplexityConfig)]:  # fmt: skip
        assert f"  {key}=" in text, key
    for path in (ROOT / "conf").rglob("*.yaml"):
        if path.parent != ROOT / "conf":
            assert path.stem in text, path
    for path in (ROOT / "sweeps").glob("*.yaml"):
        assert f"  {path.stem} " in text, path
    from pipeline import run

    documented = {int(code) for code in re.findall(r"\b(\d+) [a-z]", run.main.__doc__.split("exit codes")[1])}
    assert documented, run.main.__doc__
    listed = {int(m) for m in re.findall(r"^  (\d+) ", text, flags=re.M)}
    assert documented <= listed, documented - listed
    assert "--cfg" in text and "dry_run=true" in text


def test_help_answers_without_loading_the_stack():
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['pipeline.run', '--help']\n"
        "try:\n    runpy.run_module('pipeline.run', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in ('pandas', 'pyarrow', 'torch', 'ray', 'hydra', 'transformers')"
        " if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "usage: python -m pipeline.run" in out.stdout
    assert "HEAVY []" in out.stdout, out.stdout[-300:]
