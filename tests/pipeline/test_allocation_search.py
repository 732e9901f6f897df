"""The shiftadd and search allocators and the measured / first-order sensitivities (issue 19): bad input,
job keys, the rules against unoptimized references, exact bits within the budget, and a tiny sweep."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.allocators import SearchSpec
from pipeline.calibration import CalibrationSpec, calibration_tokens
from pipeline.methods.allocation import budget_bits, layer_costs, shiftadd_choice
from pipeline.methods.search import repair, search_allocation
from pipeline.methods.sensitivity import (
    calibration_loss,
    first_order_sensitivities,
    measured_sensitivities,
    quantized_weights,
)
from pipeline.models import linear_weights, load_model, quantize_model_, restore_weights_, snapshot_weights
from pipeline.recipe import Recipe
from pipeline.specs import ModelRef

CALIBRATION = CalibrationSpec(source="corpus:train", n_samples=8, seq_len=64, seed=0)
CANDIDATES = ("nf3-b64", "nf4-b64", "int8-b64")


def mixed(allocation: str, target: float, candidates: tuple[str, ...] = CANDIDATES, **fields: Any) -> Recipe:
    return Recipe(
        allocation=allocation, target_bits=target, candidates=candidates, calibration=CALIBRATION, **fields
    )


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        (dict(allocation="serch"), KeyError, "did you mean 'search'"),
        (dict(allocation="shiftad"), KeyError, "did you mean 'shiftadd'"),
        (dict(sensitivity="mesured"), KeyError,
         "unknown quant.sensitivity 'mesured'; did you mean 'measured'"),
        (dict(allocation="shiftadd", candidates=()), ValueError, "needs quant.candidates"),
        (dict(allocation="search", target_bits=2.0), ValueError, r"target_bits=2 is outside"),
        (dict(allocation="shiftadd", target_bits=9.0), ValueError, r"target_bits=9 is outside"),
        (dict(allocation="search", candidates=("fp2-b64", "nf4-b64")), ValueError,
         "bits=2 is not allowed for dtype .fp.; bits must be an int in 3..16"),
    ],
)  # fmt: skip
def test_bad_allocator_input_is_one_clear_message(fields, error, match) -> None:
    base: dict[str, Any] = dict(
        allocation="knapsack", target_bits=3.5, candidates=CANDIDATES, calibration=CALIBRATION
    )
    with pytest.raises(error, match=match):
        Recipe(**{**base, **fields})


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("steps", 0, "1..100000"),
        ("lr", 0.0, "0 < lr <= 10"),
        ("lam", -1.0, ">= 0"),
        ("batch_size", 0, ">= 1"),
        ("temperature", 0.0, "> 0"),
    ],
)
def test_search_settings_out_of_range_are_named(name, value, match) -> None:
    with pytest.raises(ValueError, match=rf"quant.search.{name}={value!r} is not allowed; use .*{match}"):
        SearchSpec(**{name: value})


def test_job_keys_hold_the_allocator_settings_and_keep_the_knapsack_key() -> None:
    knapsack = mixed("knapsack", 3.5)
    assert "sensitivity" not in knapsack.plain() and "search" not in knapsack.plain()  # keys as before
    measured = mixed("knapsack", 3.5, sensitivity="measured")
    assert measured.plain()["sensitivity"] == "measured" and measured.name == "knapsack-measured3.5[" + (
        "+".join(CANDIDATES) + "]"
    )
    search = mixed("search", 3.5, sensitivity="first_order")  # the search uses no sensitivity
    assert search.sensitivity == "hessian" and search.plain()["search"] == dataclasses.asdict(SearchSpec())
    assert mixed("search", 3.5, search=SearchSpec(steps=7)).plain() != search.plain()
    assert mixed("shiftadd", 3.5, search=SearchSpec(steps=7)).search is None
    assert Recipe(sensitivity="measured", search=SearchSpec(steps=7)) == Recipe()  # uniform: dropped


def test_shiftadd_gives_the_top_ranked_fraction_the_higher_bits() -> None:
    nominal = [3.25, 4.25, 8.25]
    sizes = [100] * 10
    costs = [[int(b * s) for b in nominal] for s in sizes]
    scores = [[float(10 - i), 0.5 * (10 - i), 0.0] for i in range(10)]  # layer 0 the most sensitive
    random.Random(0).shuffle(scores)
    target = 3.65  # between 3.25 and 4.25: 40% of the parameters at 4.25
    budget = int(target * sum(sizes))
    choice, details = shiftadd_choice(costs, scores, budget, nominal, target, sizes)
    upgraded = sorted(range(10), key=lambda i: -(scores[i][0] - scores[i][1]))[:4]
    assert {i for i, k in enumerate(choice) if k == 1} == set(upgraded) and 2 not in choice
    assert details["hi_fraction_target"] == pytest.approx(0.4) and details["n_repaired"] == 0
    assert sum(costs[i][k] for i, k in enumerate(choice)) <= budget


def test_shiftadd_and_repair_never_exceed_the_budget() -> None:
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 6)
        sizes = [rng.choice([64, 128, 192]) for _ in range(n)]
        costs = [[s * 3 + 16 * (s // 64) + rng.randint(0, 40), s * 4 + 16 * (s // 64), s * 16] for s in sizes]
        scores = [sorted((rng.random() for _ in range(3)), reverse=True) for _ in range(n)]
        nominal = [3.25, 4.25, 16.0]
        target = rng.uniform(3.25, 16.0)
        budget = int(target * sum(sizes))
        if sum(min(r) for r in costs) > budget:
            with pytest.raises(ValueError, match="below the cheapest"):
                repair([0] * n, scores, costs, budget)
            continue
        choice, _ = shiftadd_choice(costs, scores, budget, nominal, target, sizes)
        assert sum(costs[i][k] for i, k in enumerate(choice)) <= budget
        logits = [[rng.gauss(0, 1) for _ in range(3)] for _ in range(n)]
        start = [rng.randrange(3) for _ in range(n)]
        fixed, moves = repair(start, logits, costs, budget)
        assert sum(costs[i][k] for i, k in enumerate(fixed)) <= budget
        assert moves == 0 or sum(costs[i][k] for i, k in enumerate(start)) > budget


def test_repair_downgrades_the_least_logit_loss_per_bit_first() -> None:
    costs = [[100, 200], [100, 200], [100, 200]]
    logits = [[0.0, 1.0], [0.0, 5.0], [0.0, 3.0]]
    assert repair([1, 1, 1], logits, costs, 500) == ([0, 1, 1], 1)
    assert repair([1, 1, 1], logits, costs, 400) == ([0, 1, 0], 2)
    exhaustive = min(
        (
            c
            for c in itertools.product(range(2), repeat=3)
            if sum(costs[i][k] for i, k in enumerate(c)) <= 400
        ),
        key=lambda c: -sum(logits[i][k] for i, k in enumerate(c)),
    )
    assert list(exhaustive) == [0, 1, 0]


@pytest.fixture(scope="module")
def llama(tiny_model_dir: Path):
    return load_model(ModelRef(name_or_path=str(tiny_model_dir)), "cpu")


@pytest.fixture(scope="module")
def tokens(llama, data_root: Path) -> torch.Tensor:
    return calibration_tokens(CALIBRATION, llama[1], data_root, 512)


def naive_loss(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Mean next-token NLL, written out per window and position (the unoptimized reference)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in tokens:
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
            for t in range(window.numel() - 1):
                total -= float(logp[t, window[t + 1]])
                count += 1
    return total / count


def rtn(view: torch.Tensor, label: str) -> torch.Tensor:
    from kernels import QuantSpec, fake_quantize
    from pipeline.methods.candidates import candidate_codes

    return fake_quantize(view, QuantSpec(**candidate_codes(label)))  # type: ignore[arg-type]


def test_measured_sensitivity_is_the_loss_increase_of_one_layer_alone(llama, tokens) -> None:
    model = llama[0]
    pristine = snapshot_weights(model)
    weights = dict(list(linear_weights(model).items())[:3])
    recipe = mixed("knapsack", 4.0, ("nf3-b64", "int8-b64", "16-bit"))
    candidates = [recipe.candidate(c) for c in recipe.candidates]
    found = measured_sensitivities(model, weights, {}, candidates, tokens)
    base = naive_loss(model, tokens)
    for row, (name, view) in zip(found, weights.items(), strict=True):
        for score, label in zip(row, recipe.candidates, strict=True):
            if label == "16-bit":
                assert score == 0.0
                continue
            with torch.no_grad():
                view.copy_(rtn(pristine[name], label))
            expected = naive_loss(model, tokens) - base
            restore_weights_(model, pristine)
            assert score == pytest.approx(expected, rel=1e-3, abs=1e-5)
    assert all(torch.equal(v, pristine[n]) for n, v in linear_weights(model).items())
    assert any(abs(x) > 0 for row in found for x in row[:2])  # a real loss change, not zeros


def test_first_order_sensitivity_matches_a_per_layer_autograd_reference(llama, tokens) -> None:
    model = llama[0]
    weights = linear_weights(model)
    recipe = mixed("knapsack", 4.0, ("nf3-b64", "int8-b64"))
    candidates = [recipe.candidate(c) for c in recipe.candidates]
    found = first_order_sensitivities(model, weights, {}, candidates, tokens)
    params = dict(model.named_parameters())
    for row, name in zip(found, list(weights)[:4], strict=False):
        w = params[name].detach().clone().requires_grad_(True)  # this layer alone, by autograd
        from torch.func import functional_call

        out = functional_call(model, {name: w}, args=(), kwargs={"input_ids": tokens})
        logits = out.logits[:, :-1].double()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )
        (g,) = torch.autograd.grad(loss, w)
        for score, label in zip(row, recipe.candidates, strict=True):
            expected = float((g * (w.detach() - rtn(w.detach(), label))).abs().sum())
            assert score == pytest.approx(expected, rel=1e-3)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_search_loss_falls_and_its_repaired_argmax_meets_the_budget(llama, tokens) -> None:
    model = llama[0]
    pristine = snapshot_weights(model)
    weights = linear_weights(model)
    recipe = mixed("search", 3.5)
    candidates = [recipe.candidate(c) for c in recipe.candidates]
    costs = layer_costs(weights, {}, candidates)
    budget = budget_bits(3.5, weights)
    spec = SearchSpec(steps=30, lr=0.2, lam=10.0, batch_size=4)
    found = search_allocation(
        model, weights, quantized_weights(weights, {}, candidates), costs, budget, tokens, spec
    )
    assert sum(found.losses[-5:]) < sum(found.losses[:5])
    assert sum(costs[i][k] for i, k in enumerate(found.choice)) <= budget
    assert all(torch.equal(v, pristine[n]) for n, v in linear_weights(model).items())  # never written
    assert found.wall_s > 0 and len(found.losses) == 30


@pytest.mark.parametrize(
    ("allocation", "fields"),
    [
        ("shiftadd", {}),
        ("search", {"search": SearchSpec(steps=5)}),
        ("knapsack", {"sensitivity": "measured"}),
        ("knapsack", {"sensitivity": "first_order"}),
    ],
)
def test_every_allocator_counts_exact_bits_within_its_target(llama, tokens, allocation, fields) -> None:
    model, cache = llama[0], dict[Any, Any]()
    pristine = snapshot_weights(model)
    recipe = mixed(allocation, 3.5, **fields)
    try:
        report = quantize_model_(model, recipe, cache, tokens)
    finally:
        restore_weights_(model, pristine)
    assert report.allocation is not None and report.bits_per_param <= 3.5
    parsed = json.loads(report.allocation)
    assert json.dumps(parsed, sort_keys=True, separators=(",", ":")) == report.allocation  # round trip
    assert parsed["allocator"] == allocation and parsed["cost_bits"] <= parsed["budget_bits"]
    assert set(parsed["layers"]) == set(linear_weights(model)) and set(parsed["layers"].values()) <= set(
        CANDIDATES
    )
    if allocation == "search":
        assert parsed["search_steps"] == 5 and parsed["search_s"] >= 0
    if "sensitivity" in fields:
        assert parsed["sensitivity"] == fields["sensitivity"]
        assert sum(k[0] == "allocation-sensitivities" for k in cache) == 1
    assert calibration_loss(model, tokens) == pytest.approx(calibration_loss(model, tokens))


def test_a_tiny_sweep_runs_shiftadd_and_search(tiny_model_dir, data_root, tmp_path) -> None:
    from pipeline.jobs import build_jobs
    from pipeline.results import load_results
    from pipeline.sweep import expand, plan_sweep
    from pipeline.worker import ModelWorker

    window = (
        "{name:wikitext2,path:eval/wikitext-2-raw/wiki.test.raw,context_length:64,stride:64,max_tokens:256}"
    )
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        f"eval.perplexity=[{window}]",
        f"eval.data_root={data_root}",
        "quant.allocation=shiftadd,search",
        "quant.target_bits=3.5",
        "quant.candidates=[nf3-b64,nf4-b64]",
        "quant.search.steps=4",
        "quant.calibration.source=corpus:train",
        "quant.calibration.n_samples=8",
        "quant.calibration.seq_len=64",
        f"results_root={tmp_path}",
        "study=mixed",
    ]
    jobs = build_jobs(expand(plan_sweep(overrides, multirun=True)))
    worker = ModelWorker(str(tmp_path))
    assert [worker.run(job).status for job in jobs] == ["ok", "ok"]
    frame = load_results(tmp_path / "mixed").drop_duplicates("job_key")
    allocators = {json.loads(a)["allocator"] for a in frame["allocation"]}
    assert allocators == {"shiftadd", "search"} and (frame["bits_per_param"] <= 3.5).all()
