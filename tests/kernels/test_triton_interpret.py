"""The Triton kernel's numerics on CPU under TRITON_INTERPRET=1 (set before triton is imported, so the
check runs in a subprocess): codes, absmax and outputs equal the torch reference's bit for bit."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

SCRIPT = r"""
import itertools, torch
from kernels import CODEBOOKS, QuantSpec, fake_quantize, quantize
from kernels import triton_fused

g = torch.Generator().manual_seed(1234)
cases = [((7, 33), torch.bfloat16), ((3, 130), torch.float32), ((5, 27), torch.float16)]
checked = 0
for (shape, torch_dtype), dtype, bits, block in itertools.product(
    cases, list(CODEBOOKS), (3, 4, 16), (64, 100, None)
):
    if bits == 16 and (block != 64 or dtype in ("quantile", "dynamic")):
        continue  # 16-bit search is the same code with more probes; keep the interpreter run short
    w = (torch.randn(*shape, generator=g) * 0.02).to(torch_dtype)
    w.view(-1)[:block or 1].zero_() if bits == 4 else None  # an all-zero first block
    spec = QuantSpec(dtype, bits, block)
    ref, fused = fake_quantize(w, spec, impl="torch"), fake_quantize(w, spec, impl="triton")
    assert ref.dtype == fused.dtype == torch_dtype and ref.shape == fused.shape
    assert torch.equal(ref, fused), (shape, torch_dtype, spec)
    if bits == 4:
        qr, qf = quantize(w, spec, impl="torch"), quantize(w, spec, impl="triton")
        assert qr.codes.dtype == qf.codes.dtype and torch.equal(qr.codes, qf.codes), (shape, spec)
        assert torch.equal(qr.absmax, qf.absmax), (shape, spec)
    checked += 1

# Two-pass path (blocks wider than the fused kernel holds), with a tail.
triton_fused.MAX_FUSED_BLOCK = 32
w = torch.randn(9, 41, generator=g).bfloat16()
for block in (48, 100, None):
    spec = QuantSpec("nf", 4, block)
    assert torch.equal(fake_quantize(w, spec, impl="torch"), fake_quantize(w, spec, impl="triton"))
    assert torch.equal(quantize(w, spec, impl="torch").codes, quantize(w, spec, impl="triton").codes)

# Blocks with absmax below 2^-64 (scaled by 2^64 first) and float32 subnormals. (Not bf16 subnormals:
# the interpreter widens those wrongly; the GPU test covers them.)
tiny = torch.tensor([1e-39, 0.0, -5e-40, 3e-40, 7e-45, 1e-30, -2e-30, 1e-20] * 9)
for block in (2, 3, 64, None):
    spec = QuantSpec("int", 4, block)
    assert torch.equal(fake_quantize(tiny, spec, impl="torch"), fake_quantize(tiny, spec, impl="triton"))

# Kept columns and NaN detection go through the kernel too.
spec = QuantSpec("fp", 4, 64)
kept = [1, 7]
assert torch.equal(fake_quantize(w, spec, kept, impl="torch"), fake_quantize(w, spec, kept, impl="triton"))
for block in (64, None):
    bad = w.clone(); bad[3, 3] = float("nan")
    try:
        fake_quantize(bad, QuantSpec("int", 4, block), impl="triton")
    except ValueError as e:
        assert "NaN or Inf" in str(e)
    else:
        raise AssertionError("NaN not caught")
print("checked", checked)
"""


def test_triton_interpreter_matches_reference() -> None:
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, cwd=repo, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "checked" in proc.stdout
