"""The Triton kernel's numerics on CPU under TRITON_INTERPRET=1 (set before triton is imported, so the
check runs in a subprocess): codes, absmax and outputs equal the torch reference's bit for bit, on every
search path (binary search in shared or global memory, compare-select chain, bucketed search (more in
test_bucket_search.py); k = 1..8 and 16), launch shape (whole-block programs, masked tails) and input
dtype; NaN and Inf blocks are flagged as before."""

from __future__ import annotations

import importlib.util

import pytest

from tests.kernels.interpreter import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

SCRIPT = r"""
import itertools, torch
from kernels import CODEBOOKS, QuantSpec, fake_quantize, quantize
from kernels import triton_fused
from kernels.blockwise import levels_for

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
triton_fused.MAX_FUSED_BLOCK = 8192

# Every search path on codebooks of 2^k sorted values (2^k - 1 for even k: padded values), k = 1..8: the
# shared-memory binary search (sorted to k = 5, Eytzinger order from 6), the compare-select chain, the
# global-memory search and the bucketed search (FusedChoice); power-of-two blocks as whole-block programs
# plus a masked tail launch, a block that is not a power of two, the two-pass path (block None); bf16 and
# float32.
from kernels.blockwise import _codes_torch, reference_fake_quantize
from kernels.codebooks import levels_from_values

shapes = {64: (65, 64), 128: (2137, 2), 1024: (1, 4196), 100: (3, 70), None: (5, 77)}  # tails 0, 50, 100, 10
# more, smaller programs and launches, with the binary search (the default takes the bucketed one from k = 4)
small = triton_fused.FusedChoice(values_per_thread=4, num_warps=2, bucket_from_log2=0)
chain = triton_fused.FusedChoice(max_chain_log2=8)
in_global = triton_fused.FusedChoice(max_shared_log2=0)
bucket = triton_fused.FusedChoice(bucket_from_log2=6, values_per_thread=4, num_warps=2)
for k in range(1, 9):
    values = torch.sort(torch.rand(2**k - (k % 2 == 0), generator=g, dtype=torch.float64) * 2 - 1).values
    levels = levels_from_values(values / values.abs().max())
    choices = [triton_fused.DEFAULT_CHOICE, small] + [chain] * (k <= 5) + [in_global] * (k in (2, 6, 8))
    choices += [bucket] * (k in (6, 8))  # random codebooks: windows of 1 or 2 midpoints
    for (block, shape), torch_dtype, choice in itertools.product(
        shapes.items(), (torch.bfloat16, torch.float32), choices
    ):
        if torch_dtype == torch.float32 and (k > 2 and block != 64 or choice is not small):
            continue  # keep the interpreter run short
        x = torch.randn(*shape, generator=g).to(torch_dtype)
        spec = QuantSpec("nf", 8, block)
        ref = reference_fake_quantize(x, spec, levels)
        assert torch.equal(triton_fused.fused_fake_quantize(x, spec, levels, choice=choice), ref), (k, block)
        codes, absmax = triton_fused.fused_quantize(x, spec, levels, choice=choice)
        ref_codes, ref_absmax, _ = _codes_torch(x, spec, levels, check_finite=True)
        assert torch.equal(codes.int(), ref_codes.reshape(-1)[: x.numel()]), (k, block, torch_dtype)
        assert torch.equal(absmax, ref_absmax), (k, block)
        checked += 1

# Blocks with absmax below 2^-64 (scaled by 2^64 first) and float32 subnormals. (Not bf16 subnormals:
# the interpreter widens those wrongly; the GPU test covers them.)
tiny = torch.tensor([1e-39, 0.0, -5e-40, 3e-40, 7e-45, 1e-30, -2e-30, 1e-20] * 9)
mixed = torch.cat([tiny, torch.randn(72, generator=g)])  # tiny and ordinary blocks in one program
for block, x in itertools.product((2, 3, 64, None), (tiny, mixed)):
    spec = QuantSpec("int", 4, block)
    assert torch.equal(fake_quantize(x, spec, impl="torch"), fake_quantize(x, spec, impl="triton"))
    spec = QuantSpec("int", 8, block)  # the binary search
    assert torch.equal(fake_quantize(x, spec, impl="torch"), fake_quantize(x, spec, impl="triton"))

# Kept columns and NaN detection go through the kernel too.
spec = QuantSpec("fp", 4, 64)
kept = [1, 7]
assert torch.equal(fake_quantize(w, spec, kept, impl="torch"), fake_quantize(w, spec, kept, impl="triton"))
for block, bad_value, bits in itertools.product((64, None), (float("nan"), float("inf")), (4, 8)):
    bad = w.clone(); bad[3, 3] = bad_value
    try:
        fake_quantize(bad, QuantSpec("int", bits, block), impl="triton")
    except ValueError as e:
        assert "NaN or Inf" in str(e)
    else:
        raise AssertionError(f"{bad_value} not caught")
    if block == 64:  # unchecked: that block's absmax is NaN (as before, Inf too), every other is finite
        spec = QuantSpec("int", bits, block)
        _, absmax = triton_fused._launch(bad, spec, levels_for(bad, spec), True, None)[1:]
        assert (~absmax.isfinite()).sum() == 1 and absmax[(3 * 41 + 3) // 64].isnan(), absmax
print("checked", checked)
"""


def test_triton_interpreter_matches_reference() -> None:
    run_interpreted(SCRIPT)
