"""`kernels` stays light: no ray, hydra, transformers, lm-eval (nor triton) on import or CPU use."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ["ray", "hydra", "omegaconf", "transformers", "lm_eval", "triton"]

SCRIPT = """
import json, sys, torch
import kernels
spec = kernels.QuantSpec("quantile", 4, 64)
kernels.fake_quantize(torch.randn(8, 64), spec)
kernels.bits_per_param(spec, (8, 64))
kernels.pack(kernels.quantize(torch.randn(8, 64), spec).codes, 4)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))
"""


def test_kernels_imports_no_heavy_packages() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT % (FORBIDDEN,)], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
