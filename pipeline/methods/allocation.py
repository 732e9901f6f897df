"""Mixed precision under an exact bit budget: each linear layer one candidate recipe (`quant.allocation`).

`quantize_allocated_` serves a recipe with `allocation` "knapsack", "shiftadd" or "search" (the search:
`pipeline.methods.search` replaces steps 2-3). Knapsack and shiftadd:

1. Costs: a layer's exact storage bits under each candidate, from the method's `weight_bits` (the
   function `count_bits` uses), kept proxy columns included; the 16-bit candidate costs 16 a value.
2. Sensitivities: per layer and candidate, the layer's output error on the calibration inputs,
   ||WX − ŴX||² · 2/n = tr((W − Ŵ) H (W − Ŵ)ᵀ) with GPTQ's shared Hessians H = 2XXᵀ/n of the 16-bit
   model and Ŵ the candidate's round-to-nearest codes (whatever the method: cheap, and it ranks
   layers). Computed once per (weights, candidates, outlier fraction, calibration) and kept in the
   worker's per-model cache beside the Hessians, which later gptq jobs of the model reuse.
   `quant.sensitivity=measured|first_order` scores by the calibration loss instead
   (`pipeline.methods.sensitivity`), cached the same way.
3. Solve: `kernels.knapsack.solve_knapsack` minimizes summed sensitivity with summed bits at most
   floor(target_bits x the parameters in scope); shiftadd: `shiftadd_choice` (ShiftAddLLM's fixed
   fractions by rank), repaired to the budget.
4. Quantize: the layers of each candidate with the recipe's method, one call per candidate.

The report's `allocation` is compact JSON: the allocator, target, candidates, budget and exact bits,
layer -> candidate, and the allocator's details (knapsack: unit and gap; shiftadd: fractions; search:
seconds, steps, first and last loss).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pipeline.methods.hessians import Hessians
from pipeline.methods.registry import METHODS, QuantizeRequest

if TYPE_CHECKING:
    from torch import nn

    from pipeline.recipe import Recipe
    from pipeline.specs import QuantReport

log = logging.getLogger(__name__)

SENSITIVITY_KEY = "allocation-sensitivities"


@dataclass(frozen=True)
class LayerChoice:
    """The allocation of one model: layer name -> candidate label, its exact bits, how it was solved.

    `details` are the allocator's own JSON-able facts (knapsack: unit and gap; shiftadd: the fractions;
    search: its cost in seconds and steps, and its losses).
    """

    layers: dict[str, str]
    budget_bits: int
    cost_bits: int
    details: dict[str, Any]


def matrix_bits(recipe: Recipe, shape: tuple[int, ...], n_keep_columns: int) -> int:
    """Exact stored bits of one `[out, in]` matrix under a uniform recipe (16 bits a value: baseline)."""
    if recipe.is_baseline:
        return 16 * math.prod(shape)
    from kernels import weight_bits

    own = METHODS[recipe.method].weight_bits
    if own is not None:
        return own(recipe, shape, n_keep_columns)
    assert recipe.spec is not None
    return weight_bits(recipe.spec, shape, n_keep_columns)


def layer_costs(
    weights: Mapping[str, Tensor], keep: Mapping[str, Tensor], candidates: Sequence[Recipe]
) -> list[list[int]]:
    """costs[layer][candidate]: exact stored bits."""
    return [
        [matrix_bits(r, tuple(view.shape), _n_keep(keep, name)) for r in candidates]
        for name, view in weights.items()
    ]


def budget_bits(target_bits: float, weights: Mapping[str, Tensor]) -> int:
    """The budget over the matrices in scope: floor(target x their parameters)."""
    return math.floor(target_bits * sum(view.numel() for view in weights.values()))


@torch.no_grad()
def output_error(w: Tensor, q: Tensor, h: Tensor) -> Tensor:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) in float32 on H's device (a 0-d tensor)."""
    d = w.to(h.device, torch.float32) - q.to(h.device, torch.float32)
    return ((d @ h) * d).sum()


@torch.no_grad()
def sensitivities(
    weights: Mapping[str, Tensor],
    keep: Mapping[str, Tensor],
    candidates: Sequence[Recipe],
    hessians: Hessians,
) -> list[list[float]]:
    """scores[layer][candidate]: the output error of round-to-nearest to the candidate (0 at 16 bits)."""
    from kernels import fake_quantize

    rows = []
    for name, view in weights.items():
        h = hessians.of(name)
        row = [
            torch.zeros((), device=h.device)
            if r.is_baseline
            else output_error(view, fake_quantize(view, r.spec, keep.get(name)), h)  # type: ignore[arg-type]
            for r in candidates
        ]
        rows.append(torch.stack(row))
    return torch.stack(rows).double().cpu().tolist()  # one transfer for every score


def check_budget(costs: Sequence[Sequence[int]], recipe: Recipe, budget: int, n_params: int) -> None:
    """Raise ValueError when the budget is below every layer's cheapest candidate (naming the least
    bits per parameter)."""
    cheapest = sum(min(row) for row in costs)
    if cheapest > budget:
        raise ValueError(
            f"quant.target_bits={recipe.target_bits} is below what these layers can take: the cheapest "
            f"candidates need {cheapest / n_params:.4f} bits per parameter (codebooks and partial blocks "
            "included)"
        )


def allocate(
    costs: Sequence[Sequence[int]],
    scores: Sequence[Sequence[float]],
    names: Sequence[str],
    recipe: Recipe,
    budget: int,
    n_params: int,
    sizes: Sequence[int] | None = None,
) -> LayerChoice:
    """The knapsack's (or shiftadd's) layer -> candidate within `budget` bits (`n_params` in scope;
    `sizes`: each layer's parameters, shiftadd's fractions count them; None: equal).

    Raises:
        ValueError: the budget is below every layer's cheapest candidate (naming the least bits per param).
    """
    from kernels.knapsack import solve_knapsack

    check_budget(costs, recipe, budget, n_params)
    if recipe.allocation == "shiftadd":
        from pipeline.methods.candidates import nominal_bits

        nominal = [nominal_bits(c) for c in recipe.candidates]
        target = recipe.target_bits or 0.0
        choice, details = shiftadd_choice(costs, scores, budget, nominal, target, sizes or [1] * len(costs))
    else:
        solution = solve_knapsack(costs, scores, budget)
        choice, details = list(solution.choice), {"unit_bits": solution.unit, "gap_bits": solution.gap_bits}
    layers = {name: recipe.candidates[k] for name, k in zip(names, choice, strict=True)}
    return LayerChoice(layers, budget, sum(costs[i][k] for i, k in enumerate(choice)), details)


def shiftadd_choice(
    costs: Sequence[Sequence[int]],
    scores: Sequence[Sequence[float]],
    budget: int,
    nominal: Sequence[float],
    target: float,
    sizes: Sequence[int],
) -> tuple[list[int], dict[str, Any]]:
    """ShiftAddLLM's rule: the target lies between two neighbouring candidates' nominal bits lo <= t <= hi;
    rank layers by the score they lose going lo -> hi, and give hi to the top-ranked prefix holding at
    most the fraction f = (t − lo)/(hi − lo) of the parameters, lo to the rest; then, if the exact bits
    still exceed the budget (codebooks, partial blocks), `repair` downgrades the least sensitive first.

    Returns:
        (candidate index per layer, details: the candidates used, f, the fractions reached, the repairs).
    """
    from pipeline.methods.search import repair

    hi = next((k for k in range(1, len(nominal)) if nominal[k] >= target), len(nominal) - 1)
    lo = hi - 1 if hi > 0 else 0
    f = 1.0 if nominal[hi] == nominal[lo] else (target - nominal[lo]) / (nominal[hi] - nominal[lo])
    ranked = sorted(range(len(costs)), key=lambda i: (-(scores[i][lo] - scores[i][hi]), i))
    choice, room = [lo] * len(costs), f * sum(sizes) * (1 + 1e-9)  # float slack: 0.4 may be 0.3999...
    for i in ranked:
        if sizes[i] > room:
            break
        choice[i], room = hi, room - sizes[i]
    planned = sum(sizes[i] for i, k in enumerate(choice) if k == hi) / max(sum(sizes), 1)
    choice, moves = repair(choice, [[-x for x in row] for row in scores], costs, budget)
    return choice, {"lo": lo, "hi": hi, "hi_fraction_target": f, "hi_fraction": planned, "n_repaired": moves}


def allocation_json(recipe: Recipe, choice: LayerChoice) -> str:
    """The `allocation` column: canonical JSON of the allocator, target, solution and layer -> candidate."""
    fields = {
        "allocator": recipe.allocation,
        "target_bits": recipe.target_bits,
        "candidates": list(recipe.candidates),
        "budget_bits": choice.budget_bits,
        "cost_bits": choice.cost_bits,
        "layers": choice.layers,
        **choice.details,
    }
    if recipe.sensitivity != "hessian" and recipe.allocation != "search":
        fields["sensitivity"] = recipe.sensitivity
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def hessian_setting(recipe: Recipe) -> str:
    """Where shared Hessians go: the method's `hessian_device` (gptq, shiftadd), else "auto"."""
    return str(dict(recipe.params).get("hessian_device", "auto"))


def shared_hessians(request: QuantizeRequest) -> Hessians:
    """The 16-bit model's Hessians of every weight in scope, under gptq's cache key (so a gptq job of
    the same model, calibration and device setting reuses them); one set per model at a time."""
    from pipeline.methods.gptq import _hessian_device, hessian_bytes
    from pipeline.methods.hessians import collect_hessians
    from pipeline.models.compile import eager_layers

    key = hessians_key(request.recipe, request.weights)
    if key not in request.cache:
        assert request.calibration is not None
        device = _hessian_device(
            request.model, hessian_setting(request.recipe), hessian_bytes(request.weights)
        )
        for old in [k for k in request.cache if isinstance(k, tuple) and k[:1] == ("gptq-hessians",)]:
            del request.cache[old]
        with eager_layers(request.model):
            request.cache[key] = collect_hessians(request.model, request.weights, request.calibration, device)
    hessians: Hessians = request.cache[key]
    return hessians


def hessians_key(recipe: Recipe, weights: Mapping[str, Tensor]) -> tuple[Any, ...]:
    """gptq's `hessian_key` for these weights (`pipeline.methods.gptq.hessian_key`)."""
    return ("gptq-hessians", recipe.calibration, tuple(weights), hessian_setting(recipe))


def cached_sensitivities(request: QuantizeRequest, candidates: Sequence[Recipe]) -> list[list[float]]:
    """The recipe's `sensitivity` scores, computed at the first such job of a model and kept in the
    worker's cache (one entry per kind; the model's weights are pristine here, as the worker restores)."""
    from pipeline.methods import sensitivity as kinds
    from pipeline.models.compile import eager_layers

    recipe, weights, keep = request.recipe, request.weights, request.keep
    key = (
        SENSITIVITY_KEY,
        recipe.calibration,
        tuple(weights),
        recipe.candidates,
        recipe.outlier_fraction,
        recipe.sensitivity,
    )
    if key not in request.cache:
        assert request.calibration is not None
        if recipe.sensitivity in ("measured", "first_order"):
            measure = getattr(kinds, f"{recipe.sensitivity}_sensitivities")
            with eager_layers(request.model):  # a backward pass and in-place writes: no compiled graph
                found = measure(request.model, weights, keep, candidates, request.calibration)
        else:
            found = sensitivities(weights, keep, candidates, shared_hessians(request))
        request.cache[key] = found
    scores: list[list[float]] = request.cache[key]
    return scores


def searched(
    request: QuantizeRequest, candidates: Sequence[Recipe], costs: Sequence[Sequence[int]], budget: int
) -> LayerChoice:
    """The search allocator's choice (`pipeline.methods.search`), its cost in the details."""
    from pipeline.methods.search import search_allocation
    from pipeline.methods.sensitivity import quantized_weights
    from pipeline.models.compile import eager_layers

    recipe, weights = request.recipe, request.weights
    assert recipe.search is not None and request.calibration is not None
    check_budget(costs, recipe, budget, sum(v.numel() for v in weights.values()))
    quantized = quantized_weights(weights, request.keep, candidates)
    with eager_layers(request.model):
        found = search_allocation(
            request.model, weights, quantized, costs, budget, request.calibration, recipe.search
        )
    layers = {name: recipe.candidates[k] for name, k in zip(weights, found.choice, strict=True)}
    details = {
        "search_s": round(found.wall_s, 3),
        "search_steps": len(found.losses),
        "loss_first": found.losses[0],
        "loss_last": found.losses[-1],
        "n_repaired": found.n_repaired,
    }
    return LayerChoice(layers, budget, sum(costs[i][k] for i, k in enumerate(found.choice)), details)


def share_hessians_(cache: dict[Any, Any], full: Hessians, recipe: Recipe, names: Sequence[str]) -> None:
    """Put a view of `full` (no copy) under the cache key a method's call on `names` alone looks up."""
    owners = {full.owner[n] for n in names}
    view = Hessians(
        h={o: full.h[o] for o in owners},
        owner={n: full.owner[n] for n in names},
        tokens={o: full.tokens[o] for o in owners},
    )
    cache[hessians_key(recipe, dict.fromkeys(names))] = view  # type: ignore[arg-type]


def quantize_allocated_(
    model: nn.Module,
    weights: dict[str, Tensor],
    keep: dict[str, Tensor],
    recipe: Recipe,
    cache: dict[Any, Any],
    calibration: Tensor | None,
) -> tuple[dict[str, Recipe], str]:
    """Allocate candidates to the layers and quantize each layer with its own, in place.

    Returns:
        (layer -> its uniform recipe, the `allocation` JSON).

    Raises:
        ValueError: no calibration windows, or a budget below the cheapest candidates.
    """
    if calibration is None:
        raise ValueError(f"quant.allocation={recipe.allocation!r} needs calibration token windows")
    request = QuantizeRequest(model, weights, keep, recipe, cache, calibration)
    candidates = [recipe.candidate(label) for label in recipe.candidates]
    costs = layer_costs(weights, keep, candidates)
    n_matrix = sum(view.numel() for view in weights.values())
    budget = budget_bits(recipe.target_bits or 0.0, weights)
    if recipe.allocation == "search":
        choice = searched(request, candidates, costs, budget)
    else:
        scores = cached_sensitivities(request, candidates)
        sizes = [view.numel() for view in weights.values()]
        choice = allocate(costs, scores, list(weights), recipe, budget, n_matrix, sizes)
    per_layer = {name: candidates[recipe.candidates.index(label)] for name, label in choice.layers.items()}
    reads_hessians = "hessian_device" in dict(recipe.params)  # gptq, shiftadd: shared Hessians
    full = shared_hessians(request) if reads_hessians else None
    for candidate in candidates:
        names = [n for n, r in per_layer.items() if r is candidate and not r.is_baseline]
        if not names:
            continue
        if full is not None:
            share_hessians_(cache, full, candidate, names)
        subset = {n: weights[n] for n in names}
        METHODS[candidate.method].quantize_(
            QuantizeRequest(model, subset, keep, candidate, cache, calibration)
        )
    log.info("allocation %s: %s", recipe.name, _summary(choice.layers))
    return per_layer, allocation_json(recipe, choice)


def count_allocated_bits(
    total: int, weights: Mapping[str, Tensor], keep: Mapping[str, Tensor], per_layer: Mapping[str, Recipe]
) -> QuantReport:
    """Exact counts of a model whose layers carry their own recipes; 16-bit layers count as kept."""
    from pipeline.specs import QuantReport

    n_quant = n_kept = quant_bits = 0
    for name, view in weights.items():
        recipe, n_keep = per_layer[name], _n_keep(keep, name)
        kept = view.numel() if recipe.is_baseline else n_keep * view.shape[0]
        n_kept += kept
        n_quant += view.numel() - kept
        quant_bits += matrix_bits(recipe, tuple(view.shape), n_keep)
    return QuantReport.of_counts(total, n_quant, n_kept, quant_bits)


def _n_keep(keep: Mapping[str, Tensor], name: str) -> int:
    cols = keep.get(name)
    return 0 if cols is None else cols.numel()


def _summary(layers: Mapping[str, str]) -> str:
    counts: dict[str, int] = {}
    for label in layers.values():
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{label} x{n}" for label, n in sorted(counts.items()))
