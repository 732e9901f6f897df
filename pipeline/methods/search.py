"""`quant.allocation=search`: a differentiable search over the candidates per layer (seed 004).

Each layer l holds logits α_l over the candidates. A step draws a straight-through Gumbel-softmax
sample per layer (forward: one-hot, the model exactly as some allocation would deploy it; backward: the
soft sample's gradient), mixes the candidates' round-to-nearest weights Σ_k y_lk Ŵ_lk, runs a batch of
calibration windows through the model with those weights (`torch.func.functional_call`: the model's own
weights are never written), and takes an Adam step on α against

    cross-entropy + lam · max(0, E[bits] / n_params − target_bits),    E[bits] = Σ_l Σ_k softmax(α_l)_k c_lk

(the penalty in bits per parameter, so `lam` does not depend on the model's size). The allocation is
argmax α, then `repair` downgrades layers until the exact bits fit the budget.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch import nn

    from pipeline.allocators import SearchSpec


@dataclass(frozen=True)
class SearchResult:
    """The search's allocation and what it cost.

    Attributes:
        choice: the candidate index per layer, repaired to the budget.
        losses: the objective at every step (cross-entropy + penalty).
        wall_s: seconds of the search (quantizing the candidates included).
        n_repaired: downgrades the repair made.
    """

    choice: tuple[int, ...]
    losses: tuple[float, ...]
    wall_s: float
    n_repaired: int


def repair(
    choice: Sequence[int], logits: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], budget: int
) -> tuple[list[int], int]:
    """Greedily downgrade until the exact bits fit `budget`: each move takes the layer and cheaper
    candidate that lose the least logit per bit saved. Returns (choice, number of moves).

    Raises:
        ValueError: even the cheapest candidate of every layer exceeds the budget.
    """
    if sum(min(row) for row in costs) > budget:
        raise ValueError(f"budget {budget} is below the cheapest assignment's cost")
    picked, moves = list(choice), 0
    spent = sum(costs[i][k] for i, k in enumerate(picked))
    while spent > budget:
        best: tuple[float, int, int] | None = None
        for i, k in enumerate(picked):
            for j, c in enumerate(costs[i]):
                saved = costs[i][k] - c
                if saved > 0:
                    rate = (logits[i][k] - logits[i][j]) / saved
                    if best is None or rate < best[0]:
                        best = (rate, i, j)
        assert best is not None  # the cheapest assignment fits, so some layer can still go cheaper
        _, i, j = best
        spent -= costs[i][picked[i]] - costs[i][j]
        picked[i], moves = j, moves + 1
    return picked, moves


def search_allocation(
    model: nn.Module,
    weights: Mapping[str, Tensor],
    quantized: Mapping[str, Sequence[Tensor | None]],
    costs: Sequence[Sequence[int]],
    budget: int,
    tokens: Tensor,
    spec: SearchSpec,
) -> SearchResult:
    """Search the allocation on the model's device; the model's weights are read, never written.

    Args:
        quantized: per layer, each candidate's round-to-nearest weights (None: 16-bit, the weight itself).
        costs: costs[layer][candidate], exact bits; budget: the bits they must fit.
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    names = list(weights)
    options = [_options(weights[n], quantized[n]) for n in names]
    cost = torch.tensor(costs, dtype=torch.float32, device=device)
    n_params = sum(v.numel() for v in weights.values())
    logits = torch.zeros(len(names), cost.shape[1], device=device, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=spec.lr)
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    grad_was, losses = torch.is_grad_enabled(), []
    try:  # quantize_model_ runs under no_grad: the search needs its own graph
        torch.set_grad_enabled(True)
        for p in params.values():  # gradients reach the logits alone
            p.requires_grad_(False)
        for step in range(spec.steps):
            y = _gumbel_softmax(logits, spec.temperature, generator)
            mixed = {n: _in_layout(_mix(y[i], options[i]), params[n]) for i, n in enumerate(names)}
            ce = _cross_entropy(model, mixed, _batch(tokens, step, spec.batch_size).to(device))
            expected = (torch.softmax(logits, dim=1) * cost).sum() / n_params
            loss = ce + spec.lam * torch.relu(expected - budget / n_params)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_grad_enabled(grad_was)
        for n, p in params.items():
            p.requires_grad_(flags[n])
    final = logits.detach().cpu().tolist()
    argmax = [max(range(len(row)), key=row.__getitem__) for row in final]
    choice, moves = repair(argmax, final, costs, budget)
    return SearchResult(tuple(choice), tuple(losses), time.perf_counter() - start, moves)


def _options(view: Tensor, quantized: Sequence[Tensor | None]) -> Tensor:
    """[candidates, out, in]: each candidate's weights in the view's dtype (16-bit: the view)."""
    return torch.stack([view if q is None else q.to(view.dtype) for q in quantized]).detach()


def _mix(y: Tensor, options: Tensor) -> Tensor:
    """Σ_k y_k · options[k] in the options' dtype."""
    return torch.einsum("k,k...->...", y.to(options.dtype), options)


def _in_layout(w: Tensor, param: Tensor) -> Tensor:
    """An `[out, in]` weight in its parameter's layout (GPT-2's Conv1D stores `[in, out]`)."""
    return w if w.shape == param.shape else w.T


def _gumbel_softmax(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """A straight-through Gumbel-softmax sample per row: one-hot forward, the soft sample's gradient."""
    u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(1e-10, 1 - 1e-10)
    soft = torch.softmax((logits - torch.log(-torch.log(u))) / temperature, dim=1)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=1), soft.shape[1]).to(soft.dtype)
    return hard + soft - soft.detach()


def _batch(tokens: Tensor, step: int, batch_size: int) -> Tensor:
    """The step's windows, cycling through the calibration set in order."""
    n = tokens.shape[0]
    starts = [(step * batch_size + i) % n for i in range(min(batch_size, n))]
    return tokens[starts]


def _cross_entropy(model: nn.Module, mixed: Mapping[str, Tensor], batch: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats) of `batch` with the weights in `mixed` substituted."""
    from torch.func import functional_call

    logits = functional_call(model, dict(mixed), args=(), kwargs={"input_ids": batch, "use_cache": False})
    logits = logits.logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
