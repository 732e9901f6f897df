"""Per-layer sensitivities of a mixed-precision allocation (`quant.sensitivity`), beside the Hessian score.

scores[layer][candidate] for the knapsack and shiftadd allocators (`pipeline.methods.allocation`);
0 for the 16-bit candidate. Ŵ is the candidate's round-to-nearest codes, whatever the method.

- `hessian` (in allocation.py): tr((W − Ŵ) H (W − Ŵ)ᵀ), the layer's output error on calibration inputs.
- `measured`: the calibration loss with this layer alone at Ŵ, minus the 16-bit model's loss (mean
  next-token cross-entropy in nats over every calibration window). One forward pass of the calibration
  set per (layer, candidate), all windows batched; the layer is restored from a copy after each.
- `first_order`: Σ|g ⊙ (W − Ŵ)| with g the gradient of the same loss w.r.t. the 16-bit weights: one
  backward pass serves every layer and candidate (a first-order Taylor bound on the loss change).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch import nn

    from pipeline.recipe import Recipe

WINDOWS_PER_BATCH = 8  # calibration windows per forward pass (memory: 8 x 2048 x 50k float32 logits = 3.3 GB)


def calibration_loss(model: nn.Module, tokens: Tensor, batch_size: int = WINDOWS_PER_BATCH) -> Tensor:
    """Mean next-token cross-entropy in nats over every window of `tokens` [n, seq_len] (0-d float32).

    Differentiable: call under `torch.no_grad()` where no gradient is wanted.
    """
    device = next(model.parameters()).device
    total = torch.zeros((), device=device, dtype=torch.float32)
    count = 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        total = total + torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        count += target.numel()
    return total / count


def quantized_weights(
    weights: Mapping[str, Tensor], keep: Mapping[str, Tensor], candidates: Sequence[Recipe]
) -> dict[str, list[Tensor | None]]:
    """Per layer, each candidate's round-to-nearest weights (None: the 16-bit candidate)."""
    from kernels import fake_quantize

    return {
        name: [
            None if r.is_baseline else fake_quantize(view, r.spec, keep.get(name))  # type: ignore[arg-type]
            for r in candidates
        ]
        for name, view in weights.items()
    }


@torch.no_grad()
def measured_sensitivities(
    model: nn.Module,
    weights: Mapping[str, Tensor],
    keep: Mapping[str, Tensor],
    candidates: Sequence[Recipe],
    tokens: Tensor,
) -> list[list[float]]:
    """scores[layer][candidate]: the calibration loss increase with this layer alone quantized (nats).

    Writes each layer's views in place and copies them back: the model ends as it began.
    """
    base = calibration_loss(model, tokens)
    rows = []
    for name, view in weights.items():
        from kernels import fake_quantize

        pristine = view.clone()
        row = []
        for r in candidates:
            if r.is_baseline:
                row.append(torch.zeros((), device=base.device))
                continue
            view.copy_(fake_quantize(pristine, r.spec, keep.get(name)))  # type: ignore[arg-type]
            row.append(calibration_loss(model, tokens) - base)
            view.copy_(pristine)
        rows.append(torch.stack(row))
    return torch.stack(rows).double().cpu().tolist()  # one transfer for every score


def weight_gradients(model: nn.Module, weights: Mapping[str, Tensor], tokens: Tensor) -> dict[str, Tensor]:
    """d(calibration loss)/dW of the weights' parameters, float32 in each view's `[out, in]` layout.

    Only those parameters require grad for the pass; every parameter's flag and grad is put back.
    """
    names = set(weights)
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
            p.grad = None
        calibration_loss(model, tokens).backward()
        grads = {n: _as_view(params[n].grad, view).float() for n, view in weights.items()}  # type: ignore[arg-type]
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])
    return grads


@torch.no_grad()
def first_order_sensitivities(
    model: nn.Module,
    weights: Mapping[str, Tensor],
    keep: Mapping[str, Tensor],
    candidates: Sequence[Recipe],
    tokens: Tensor,
) -> list[list[float]]:
    """scores[layer][candidate]: Σ|g ⊙ (W − Ŵ)| with g from one backward pass (nats, first order)."""
    from kernels import fake_quantize

    with torch.enable_grad():
        grads = weight_gradients(model, weights, tokens)
    rows = []
    for name, view in weights.items():
        g = grads[name]
        row = [
            torch.zeros((), device=g.device)
            if r.is_baseline
            else (g * (view.float() - fake_quantize(view, r.spec, keep.get(name)).float())).abs().sum()  # type: ignore[arg-type]
            for r in candidates
        ]
        rows.append(torch.stack(row))
    return torch.stack(rows).double().cpu().tolist()


def _as_view(grad: Tensor, view: Tensor) -> Tensor:
    """The gradient in the `[out, in]` layout `linear_weights` gives its parameter (Conv1D: transposed)."""
    return grad if grad.shape == view.shape else grad.T
