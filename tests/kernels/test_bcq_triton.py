"""The one-kernel BCQ fit (`kernels.triton_bcq`) on CPU under TRITON_INTERPRET=1 (set before triton is
imported, so the checks run in a subprocess), against the torch reference `kernels.bcq.fit_blocks`:

- α and codes equal the reference's bit for bit at q = 2, 3, 4, on random blocks of a power-of-two width
  and of another; on degenerate blocks (all zero, constant, two values, every other value zero: normal
  equations that can be singular, where the reference takes the pseudo-inverse's minimum-norm α and the
  kernel a basic least-squares one) the errors agree; the decoded values are the codes' sums;
- with `iters` = 0 it is the greedy fit; a block's error never rises from one round to the next;
- `bcq_fake_quantize` through the kernel (a tail block included) equals the torch path's.
The kernel's speed is measured on the GPU by `benchmarks/bcq.py`, not here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.bcq import BCQSettings, fit_blocks, use_triton

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

SCRIPT = r"""
import torch
from kernels.bcq import (BCQSettings, ScaleFormat, bcq_fake_quantize, block_errors, decode, fit_blocks,
                         greedy_fit)
from kernels.spec import QuantSpec
from kernels.triton_bcq import fit_blocks_triton
import kernels.bcq as bcq

def degenerate(width, g):
    x = torch.randn(10, width, generator=g) * 0.02
    x[0] = 0.0
    x[1] = 0.01
    x[2, : width // 2], x[2, width // 2 :] = 0.02, -0.02
    x[3] = torch.tensor([0.01, -0.03]).repeat(width)[:width]
    x[4, ::2] = 0.0
    x[5] = torch.linspace(-1.0, 1.0, width)
    return x

g = torch.Generator().manual_seed(7)
checked = 0
for q in (2, 3, 4):
    for width in (64, 33):
        x = torch.cat([torch.randn(24, width, generator=g) * 0.02, degenerate(width, g)])
        alpha, codes, out, rounds = fit_blocks_triton(x, q, 15, store_codes=True, store_out=True)
        ref_alpha, ref_codes = fit_blocks(x, q, BCQSettings(iters=15))
        assert torch.equal(out, decode(alpha, codes.long())), (q, width)
        assert torch.equal(alpha[:24], ref_alpha[:24]), (q, width, (alpha != ref_alpha).any(1).nonzero())
        assert torch.equal(codes[:24].long(), ref_codes[:24]), (q, width)
        # singular normal equations: a basic least-squares α, not the pseudo-inverse's; the same error
        error, ref_error = block_errors(x, alpha, codes.long()), block_errors(x, ref_alpha, ref_codes)
        assert torch.allclose(error, ref_error, rtol=1e-3, atol=1e-12), (q, width, error, ref_error)
        assert int(rounds.min()) >= 1 and int(rounds.max()) <= 15
        greedy = fit_blocks_triton(x, q, 0)
        ga, gc = greedy_fit(x, q, ScaleFormat())
        assert torch.equal(greedy[0], ga) and torch.equal(greedy[1].long(), gc) and int(greedy[3].max()) == 0
        previous = block_errors(x, ga, gc)
        for iters in range(1, 5):
            a, c, _, _ = fit_blocks_triton(x, q, iters)
            error = block_errors(x, a, c.long())
            assert bool((error <= previous).all()), (q, width, iters)
            previous = error
        checked += 1

# the probe that guards the compiled kernel passes here, and a kernel that fails to build is refused
assert bcq.kernel_agrees(3, 64, 15, "cpu") and bcq.kernel_agrees(4, 100, 15, "cpu")
import kernels.triton_bcq as tb
real, tb.fit_blocks_triton = tb.fit_blocks_triton, None  # calling it raises TypeError
assert not bcq.kernel_agrees(2, 64, 15, "cpu")
tb.fit_blocks_triton = real

# bcq_fake_quantize through the kernel (forced on CPU) equals the torch loop's, tail block included
w = (torch.randn(5, 70, generator=g) * 0.02).to(torch.bfloat16)
spec, settings = QuantSpec("bcq", 3, 64), BCQSettings(iters=15)
torch_path = bcq_fake_quantize(w, spec, settings)
bcq.use_triton = lambda x, q, s: True
assert torch.equal(bcq_fake_quantize(w, spec, settings), torch_path)
print("checked", checked)
"""


def test_the_kernel_matches_the_reference_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checked 6" in out.stdout


def test_cpu_blocks_take_the_torch_loop() -> None:
    x = torch.randn(4, 64) * 0.02
    assert not use_triton(x, 3, BCQSettings())
    alpha, codes = fit_blocks(x, 3, BCQSettings())
    assert alpha.shape == (4, 3) and codes.dtype == torch.int64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_compiled_kernel_matches_the_reference_on_the_device() -> None:
    from kernels.bcq import block_errors, greedy_fit, refine_blocks

    g = torch.Generator(device="cuda").manual_seed(3)
    for q in (2, 3, 4):
        for width in (64, 128, 1024, 100):
            x = torch.randn(max(4096, 4096 * 64 // width), width, device="cuda", generator=g) * 0.02
            settings = BCQSettings(iters=15)
            assert use_triton(x, q, settings)
            alpha, codes = fit_blocks(x, q, settings)
            ref_alpha, ref_codes, _ = refine_blocks(x, *greedy_fit(x, q, settings.scales), settings)
            same = (alpha == ref_alpha).all(1) & (codes == ref_codes).all(1)
            # The greedy mean's float32 sum runs in another order on the device, so a rare block starts
            # one fp16 step away and may settle at another fixed point: nearly all blocks are identical,
            # and the blocks' total error is the loop's to within a thousandth.
            assert float(same.double().mean()) >= 0.99, (q, width, float(same.double().mean()))
            err, ref_err = (
                float(block_errors(x, alpha, codes).sum()),
                float(block_errors(x, ref_alpha, ref_codes).sum()),
            )
            assert err <= ref_err * 1.001, (q, width, err, ref_err)
