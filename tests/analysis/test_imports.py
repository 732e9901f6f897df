from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_analysis_never_imports_torch_ray_or_transformers() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        "import analysis, analysis.report\n"
        "for m in pkgutil.iter_modules(analysis.__path__):\n"
        "    importlib.import_module(f'analysis.{m.name}')\n"
        "heavy = sorted(n for n in ('torch', 'ray', 'transformers', 'lm_eval') if n in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_module_cli_help_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "analysis.report", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "results/<study>" in result.stdout and "--out" in result.stdout
