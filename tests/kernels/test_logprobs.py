"""`token_logprobs`: the torch reference against log_softmax/argmax, and the Triton kernel (under
TRITON_INTERPRET=1 in a subprocess on CPU, on the GPU with the `gpu` marker) against the reference."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.logprobs import reference_token_logprobs, token_logprobs

ROOT = Path(__file__).resolve().parents[2]

CASES = r"""
import torch
from kernels.logprobs import reference_token_logprobs, token_logprobs

def cases(device):
    g = torch.Generator().manual_seed(0)
    shapes = ((50, torch.float32), (300, torch.bfloat16), (5000, torch.bfloat16), (4099, torch.float16))
    for vocab, dtype in shapes:
        x = (torch.randn(7, vocab, generator=g) * 3).to(dtype)
        x[2] = torch.round(x[2].float()).to(dtype)  # many ties
        x[3, vocab - 1] = 100  # the maximum in the last, partial block
        x[4] = 0
        x[4, [5, vocab - 3]] = 9  # a tie for the maximum in two different blocks
        rows = torch.tensor([0, 0, 2, 3, 3, 4, 4, 6, 1])
        targets = torch.randint(0, vocab, (9,), generator=g)
        targets[0] = x[0].float().argmax()
        targets[3], targets[5], targets[6] = vocab - 1, 5, vocab - 3  # argmax; first of a tie; second
        yield x.to(device), rows.to(device), targets.to(device)

def check(device):
    n = 0
    for x, rows, targets in cases(device):
        got = token_logprobs(x, rows, targets, impl="triton")
        want = reference_token_logprobs(x, rows, targets)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], want[1]), (got[1], want[1])
        assert got[1][[0, 3, 5]].all() and not got[1][6]
        n += 1
    return n
"""


def test_reference_is_log_softmax_and_first_argmax():
    x = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    rows, targets = torch.tensor([0, 0, 0, 1]), torch.tensor([1, 2, 3, 0])
    logprob, greedy = reference_token_logprobs(x, rows, targets)
    want = x.log_softmax(-1)[rows, targets]
    assert torch.allclose(logprob, want)
    assert greedy.tolist() == [True, False, False, True]  # torch.argmax: the first maximal index


def test_auto_uses_the_reference_on_cpu_and_bad_shapes_are_named():
    x = torch.randn(3, 10)
    rows, targets = torch.tensor([0, 2]), torch.tensor([4, 9])
    for got, want in zip(
        token_logprobs(x, rows, targets), reference_token_logprobs(x, rows, targets), strict=True
    ):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"need logits \[P, V\]"):
        token_logprobs(x, rows, targets[:1])
    with pytest.raises(ValueError, match="impl='fast' is not allowed"):
        token_logprobs(x, rows, targets, impl="fast")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs a CUDA tensor"):
            token_logprobs(x, rows, targets, impl="triton")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernel_matches_the_reference_under_the_interpreter():
    script = CASES + "\nprint('checked', check('cpu'))\n"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checked 4" in done.stdout


@pytest.mark.gpu
def test_kernel_matches_the_reference_on_the_gpu():
    namespace: dict = {}
    exec(CASES, namespace)
    assert namespace["check"]("cuda") == 4
