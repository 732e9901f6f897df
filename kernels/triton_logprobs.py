"""The Triton kernel behind `kernels.logprobs.token_logprobs` (CUDA; TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _token_logprobs_kernel(
    logits_ptr, rows_ptr, targets_ptr, logprob_ptr, greedy_ptr, vocab, row_stride, BLOCK_V: tl.constexpr
):
    entry = tl.program_id(0)
    row = tl.load(rows_ptr + entry).to(tl.int64)
    target = tl.load(targets_ptr + entry).to(tl.int64)
    base = logits_ptr + row * row_stride
    offs = tl.arange(0, BLOCK_V)
    x = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
    running_max = tl.max(x, 0)
    total = tl.sum(tl.exp(x - running_max), 0)
    best = tl.min(tl.where(x == running_max, offs, vocab), 0)  # first index of the maximum
    for start in range(BLOCK_V, vocab, BLOCK_V):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, 0)
        block_best = tl.min(tl.where(x == block_max, idx, vocab), 0)
        best = tl.where(block_max > running_max, block_best, best)  # ties keep the earlier index
        new_max = tl.maximum(running_max, block_max)
        total = total * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    target_logit = tl.load(base + target).to(tl.float32)
    tl.store(logprob_ptr + entry, target_logit - (running_max + tl.log(total)))
    tl.store(greedy_ptr + entry, (best == target).to(tl.int8))


def fused_token_logprobs(
    logits: Tensor, rows: Tensor, targets: Tensor, block_v: int
) -> tuple[Tensor, Tensor]:
    """One program per entry; returns (float32 log-probabilities, bool is-argmax)."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n = rows.numel()
    logprob = torch.empty(n, dtype=torch.float32, device=logits.device)
    greedy = torch.empty(n, dtype=torch.int8, device=logits.device)
    block = min(block_v, triton.next_power_of_2(logits.shape[1]))
    _token_logprobs_kernel[(n,)](
        logits, rows, targets, logprob, greedy, logits.shape[1], logits.stride(0), BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )  # fmt: skip
    return logprob, greedy.bool()
