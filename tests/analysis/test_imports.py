from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# One subprocess (imports cost seconds on a 2-core CI machine): import every analysis module, check
# that no heavy framework came with them, then run the CLI as `python -m analysis.report --help`.
CODE = """
import importlib, pkgutil, runpy, sys
import analysis, analysis.report
for m in pkgutil.iter_modules(analysis.__path__):
    importlib.import_module(f"analysis.{m.name}")
heavy = sorted(n for n in ("torch", "ray", "transformers", "lm_eval") if n in sys.modules)
print("HEAVY", heavy)
sys.argv = ["kbitscale-report", "--help"]
runpy.run_module("analysis.report", run_name="__main__")
"""


def test_analysis_never_imports_torch_ray_or_transformers_and_cli_help_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    assert "results/<study>" in result.stdout and "--out" in result.stdout
