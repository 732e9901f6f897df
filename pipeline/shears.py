"""Shears-style elastic LoRA (seed 000): one super-adapter, many sub-adapters, a rank per layer.

peft's LoRA is attached at the largest rank of `recover.ranks` with `lora_alpha` equal to that rank,
so the scale is 1 for every sub-adapter. A forward hook on each layer's `lora_A` zeroes the rank
components past the layer's current rank r: `B[:, :r] @ A[:r] x`, exactly a plain LoRA of rank r
made of the first r components. Training samples one rank per layer per step, independently and
uniformly from `ranks` (NNCF's random sub-network sampling, which Shears trains with), so the first
components learn to work alone. Afterwards `search_ranks` picks the per-layer ranks and `truncate_`
cuts every layer down to them: the adapter that stays (and is counted) has only the chosen ranks.

Budget: the parameters of a plain LoRA at `recover.rank` on the same layers, sum_l rank*(in_l+out_l),
so shears and lora compare at equal adapter bits. The search starts from every layer at the largest
rank and, while over the budget, lowers by one step the layer whose drop raises the validation loss
least per parameter saved, with each layer's rises measured once, alone (additive sensitivities:
layers x (ranks - 1) validation passes, not one per candidate per step, which at 96 layers would be
thousands); Shears' heuristic (every layer at the middle rank of `ranks`) is the other candidate
when it fits, and the lower measured loss wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.recovery import ADAPTER_NAME


@dataclass
class ElasticLayer:
    """One peft LoRA layer with its current rank (`rank` components of A and B are used)."""

    name: str
    module: Any  # peft.tuners.lora.LoraLayer
    rank: int

    @property
    def params_per_rank(self) -> int:
        """Parameters one rank component costs: a row of A [r, in] and a column of B [out, r]."""
        return int(
            self.module.lora_A[ADAPTER_NAME].in_features + self.module.lora_B[ADAPTER_NAME].out_features
        )


def elastic_layers(model: nn.Module) -> list[ElasticLayer]:
    """Every peft LoRA layer of `model`, in module order, at its full rank."""
    from peft.tuners.lora import LoraLayer

    return [
        ElasticLayer(name, module, int(module.r[ADAPTER_NAME]))
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A
    ]


def install_masks_(layers: Sequence[ElasticLayer]) -> None:
    """Hook every layer's `lora_A` so that only its first `layer.rank` outputs reach `lora_B`."""
    for layer in layers:

        def hook(_: nn.Module, __: Any, out: torch.Tensor, layer: ElasticLayer = layer) -> torch.Tensor:
            if layer.rank >= out.shape[-1]:
                return out
            keep = torch.arange(out.shape[-1], device=out.device) < layer.rank
            return out * keep.to(out.dtype)

        layer.module.lora_A[ADAPTER_NAME].register_forward_hook(hook)


def set_ranks_(layers: Sequence[ElasticLayer], ranks: Sequence[int]) -> None:
    """Use the first `ranks[i]` components in layer i."""
    assert len(layers) == len(ranks)
    for layer, rank in zip(layers, ranks, strict=True):
        layer.rank = int(rank)


def sampler(layers: Sequence[ElasticLayer], ranks: Sequence[int], seed: int) -> Callable[[int], None]:
    """A per-step callback that sets every layer to a rank drawn uniformly from `ranks` (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    choices = torch.tensor(list(ranks))

    def before_step(_: int) -> None:
        picks = torch.randint(len(choices), (len(layers),), generator=generator)
        set_ranks_(layers, choices[picks].tolist())

    return before_step


def medium_rank(ranks: Sequence[int]) -> int:
    """Shears' heuristic sub-adapter: the middle of the sorted ranks (the lower middle of an even count)."""
    return sorted(ranks)[(len(ranks) - 1) // 2]


def adapter_params(layers: Sequence[ElasticLayer], ranks: Sequence[int]) -> int:
    """Parameters of the sub-adapter with `ranks` (one per layer)."""
    return sum(r * layer.params_per_rank for layer, r in zip(layers, ranks, strict=True))


def rank_budget(layers: Sequence[ElasticLayer], rank: int) -> int:
    """The parameters of a plain LoRA of `rank` on the same layers: the search's budget."""
    return adapter_params(layers, [rank] * len(layers))


@dataclass(frozen=True)
class SearchResult:
    """The chosen ranks (one per layer, in module order), how they were chosen and their loss."""

    ranks: tuple[int, ...]
    search: str  # "greedy" or "heuristic"
    loss: float
    evaluations: int


def search_ranks(
    layers: Sequence[ElasticLayer], ranks: Sequence[int], budget: int, loss_of: Callable[[], float]
) -> SearchResult:
    """Per-layer ranks within `budget` parameters that keep `loss_of()` low; leaves the layers set to
    the result.

    Greedy on additive sensitivities: from every layer at the largest rank, the loss rise of lowering
    one layer alone to each smaller rank is measured once (layers x (ranks - 1) passes); then, while
    over the budget, the layer whose next step down costs the least rise per parameter saved steps
    down. The chosen ranks are measured, and Shears' heuristic (the middle rank everywhere) replaces
    them if it fits the budget and measures lower.
    """
    levels, top = sorted(ranks), len(ranks) - 1
    full = [top] * len(layers)

    def loss_at(indices: Sequence[int]) -> float:
        set_ranks_(layers, [levels[i] for i in indices])
        return loss_of()

    base = loss_at(full)
    rise = {(i, top): 0.0 for i in range(len(layers))}
    for i in range(len(layers)):
        for level in range(top):
            rise[i, level] = loss_at([*full[:i], level, *full[i + 1 :]]) - base
    current = [*full]

    def step_score(i: int) -> float:
        step_params = (levels[current[i]] - levels[current[i] - 1]) * layers[i].params_per_rank
        return (rise[i, current[i] - 1] - rise[i, current[i]]) / step_params

    while adapter_params(layers, [levels[i] for i in current]) > budget:
        lowerable = [i for i, level in enumerate(current) if level > 0]
        assert lowerable, "budget below the smallest sub-adapter (refused in pre-flight)"
        current[min(lowerable, key=step_score)] -= 1
    evaluations = 2 + len(layers) * top
    result = SearchResult(tuple(levels[i] for i in current), "greedy", loss_at(current), evaluations)
    medium = [medium_rank(levels)] * len(layers)
    if adapter_params(layers, medium) <= budget:
        set_ranks_(layers, medium)
        medium_loss = loss_of()
        if medium_loss < result.loss:
            return SearchResult(tuple(medium), "heuristic", medium_loss, evaluations + 1)
        evaluations += 1
    set_ranks_(layers, result.ranks)
    return dataclasses.replace(result, evaluations=evaluations)


def truncate_(layers: Sequence[ElasticLayer], ranks: Sequence[int]) -> None:
    """Keep only the first `ranks[i]` components of layer i: A's rows and B's columns are cut, so the
    adapter holds (and counts) exactly the chosen ranks; the scale stays 1."""
    for layer, rank in zip(layers, ranks, strict=True):
        a, b = layer.module.lora_A[ADAPTER_NAME], layer.module.lora_B[ADAPTER_NAME]
        new_a = nn.Linear(a.in_features, rank, bias=False, device=a.weight.device, dtype=a.weight.dtype)
        new_b = nn.Linear(rank, b.out_features, bias=False, device=b.weight.device, dtype=b.weight.dtype)
        with torch.no_grad():
            new_a.weight.copy_(a.weight[:rank])
            new_b.weight.copy_(b.weight[:, :rank])
        layer.module.lora_A[ADAPTER_NAME], layer.module.lora_B[ADAPTER_NAME] = new_a, new_b
        layer.module.r[ADAPTER_NAME] = rank
        layer.rank = rank


def validation_loss(model: nn.Module, tokens: torch.Tensor) -> float:
    """Mean next-token loss of `model` on the windows `tokens` [n, seq_len] (no gradients)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(model(input_ids=tokens.to(device), labels=tokens.to(device)).loss)
    finally:
        model.train(was_training)
