"""Token log-probabilities from logits in one read: log p(target) and whether target is the argmax.

    from kernels.logprobs import token_logprobs
    logprob, greedy = token_logprobs(logits, rows, targets)   # logits [P, V]; rows, targets [E]

Entry e asks for row `rows[e]` of `logits` and token `targets[e]`: `logprob[e]` is
`log_softmax(logits[rows[e]].float())[targets[e]]` and `greedy[e]` is `argmax(logits[rows[e]]) ==
targets[e]` (the first maximal index, as `torch.argmax`). Several entries may share a row (one
context's last position predicts the first token of each of its continuations).

On CUDA a Triton kernel reads each asked row once in the logits' own dtype, keeping a running max,
a rescaled sum of exponentials and the first argmax in float32 registers (no float32 copy of the
logits, no separate logsumexp and argmax passes); elsewhere the torch reference runs. The kernel
also runs under TRITON_INTERPRET=1 on CPU, where the tests compare it with the reference.
"""

from __future__ import annotations

import os

from torch import Tensor

BLOCK_V = 2048  # vocabulary entries one program reads per step


def reference_token_logprobs(logits: Tensor, rows: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The torch reference: float32 log-softmax and argmax of the asked rows."""
    x = logits.float()
    lse, best = x.logsumexp(-1), x.argmax(-1)
    return x[rows, targets] - lse[rows], best[rows] == targets


def token_logprobs(
    logits: Tensor, rows: Tensor, targets: Tensor, *, impl: str = "auto"
) -> tuple[Tensor, Tensor]:
    """(float32 log-probability, bool is-argmax) of each (row, target) entry; see the module doc."""
    if logits.dim() != 2 or rows.shape != targets.shape or rows.dim() != 1:
        raise ValueError(
            f"need logits [P, V] and rows, targets [E]; got {tuple(logits.shape)}, "
            f"{tuple(rows.shape)}, {tuple(targets.shape)}"
        )
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl={impl!r} is not allowed; allowed: auto, torch, triton")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if impl == "auto":
        from kernels.blockwise import _has_triton

        impl = "triton" if logits.is_cuda and _has_triton() else "torch"
    if impl == "torch" or not rows.numel():
        return reference_token_logprobs(logits, rows, targets)
    if not (logits.is_cuda or interpret):
        raise ValueError(
            f"impl='triton' needs a CUDA tensor (logits are on {logits.device}) or TRITON_INTERPRET=1"
        )
    from kernels.triton_logprobs import fused_token_logprobs

    return fused_token_logprobs(logits, rows, targets, BLOCK_V)
