"""Mixed precision (`quant.allocation=knapsack`): candidates and bad input, the job key, sensitivities
against the layer's output error, and the allocation on a tiny model against brute force."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from pipeline.calibration import CalibrationSpec, calibration_tokens
from pipeline.methods.allocation import budget_bits, output_error, quantize_allocated_
from pipeline.methods.candidates import candidate_codes, canonical_label
from pipeline.methods.hessians import collect_hessians
from pipeline.models import linear_weights, load_model, quantize_model_, restore_weights_, snapshot_weights
from pipeline.recipe import Recipe
from pipeline.specs import ModelRef

CALIBRATION = CalibrationSpec(source="corpus:train", n_samples=8, seq_len=64, seed=0)
NOMINAL = {"nf3-b64": 3, "nf4-b64": 4, "int8-b64": 8}  # code bits; each block of 64 adds a 16-bit absmax


def mixed(target: float, candidates: tuple[str, ...], **fields: Any) -> Recipe:
    return Recipe(
        allocation="knapsack", target_bits=target, candidates=candidates, calibration=CALIBRATION, **fields
    )


def naive_bits(label: str, shape: torch.Size) -> int:
    """Storage of one matrix written out: 16 a value at 16 bits, else k a value + 16 per block of 64."""
    n = shape[0] * shape[1]
    return 16 * n if label == "16-bit" else n * NOMINAL[label] + 16 * math.ceil(n / 64)


def naive_score(w: torch.Tensor, label: str, x: torch.Tensor) -> float:
    """||W Xᵀ − Ŵ Xᵀ||² · 2/n over the n calibration input rows x [n, in], Ŵ round-to-nearest."""
    if label == "16-bit":
        return 0.0
    from kernels import QuantSpec, fake_quantize

    q = fake_quantize(w, QuantSpec(**candidate_codes(label)))  # type: ignore[arg-type]
    return float(((w.double() - q.double()) @ x.double().T).pow(2).sum() * 2 / x.shape[0])


def test_candidates_are_canonical_and_cheapest_first() -> None:
    recipe = mixed(3.5, ("int8-b64", "16", "nf3-b64", "nf4-b64", "nf3-b64"))
    assert recipe.candidates == ("nf3-b64", "nf4-b64", "int8-b64", "16-bit")
    assert (recipe.dtype, recipe.bits, recipe.block_size) == ("nf", 3, 64)  # the cheapest's codes
    assert canonical_label("fp4-b64") == "fp4-e2-b64" and candidate_codes("16-bit") is None
    assert recipe.candidate("16-bit").is_baseline and recipe.candidate("int8-b64").name == "int8-b64"
    assert json.loads(recipe.params_json) == {
        "allocation": "knapsack", "candidates": "nf3-b64,nf4-b64,int8-b64,16-bit", "target_bits": 3.5
    }  # fmt: skip


def test_a_uniform_recipe_keys_as_before_and_a_mixed_one_keys_its_allocation() -> None:
    assert set(Recipe().plain()) == {
        "method", "dtype", "bits", "block_size", "exponent_bits", "centering", "outlier_fraction",
        "quantize_embeddings", "quantize_lm_head", "params", "calibration",
    }  # fmt: skip
    assert Recipe(target_bits=3.0, candidates=("nf3-b64",)) == Recipe()  # uniform: dropped, as calibration
    a, b = mixed(3.5, ("nf3-b64", "nf4-b64")), mixed(3.75, ("nf3-b64", "nf4-b64"))
    assert a.plain()["target_bits"] == 3.5 and a.plain()["candidates"] == ["nf3-b64", "nf4-b64"]
    assert a.plain() != b.plain() and a == mixed(3.5, ("nf4-b64", "nf3-b64"))


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        (dict(allocation="knapsak"), KeyError, "did you mean 'knapsack'"),
        (dict(allocation="knapsack", target_bits=3.0), ValueError, "needs quant.candidates"),
        (dict(allocation="knapsack", candidates=("nf3-b64",)), ValueError, "needs quant.target_bits"),
        (dict(allocation="knapsack", target_bits=3.0, candidates=("nf3-b64", "nf4-b64")), ValueError,
         r"outside the candidates' bits per parameter 3.25 \(nf3-b64\) .. 4.25 \(nf4-b64\)"),
        (dict(allocation="knapsack", target_bits=9.0, candidates=("nf3-b64", "int8-b64")), ValueError,
         "outside"),
        (dict(allocation="knapsack", target_bits=3.5, candidates=("nf3-b64", "foo4-b64")), KeyError,
         "unknown quantization data type 'foo'"),
        (dict(allocation="knapsack", target_bits=3.5, candidates=("nf3-b64", "nf4-64")), ValueError,
         "is not a candidate"),
        (dict(allocation="knapsack", target_bits=3.5, candidates=("nf3-b64", "bcq2-b64")), ValueError,
         "codebook data type"),
        (dict(allocation="knapsack", target_bits=16.0, candidates=("16-bit",)), ValueError,
         "at least one quantized candidate"),
        (dict(allocation="knapsack", target_bits=3.5, candidates=("nf3-b64", "nf4-b64")), ValueError,
         "quant.allocation='knapsack' needs calibration text"),
    ],
)  # fmt: skip
def test_bad_allocation_input_is_one_clear_message(fields, error, match) -> None:
    with pytest.raises(error, match=match):
        Recipe(**fields)


def test_sensitivity_is_the_layer_output_error_on_calibration_inputs() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(8, 128), torch.randn(200, 128)
    h = 2 * x.T @ x / x.shape[0]
    from kernels import QuantSpec, fake_quantize

    q = fake_quantize(w, QuantSpec("nf", 3, 64))
    assert float(output_error(w, q, h)) == pytest.approx(naive_score(w, "nf3-b64", x), rel=1e-4)


@pytest.fixture(scope="module")
def llama(tiny_model_dir: Path):
    return load_model(ModelRef(name_or_path=str(tiny_model_dir)), "cpu")


@pytest.fixture(scope="module")
def tokens(llama, data_root: Path) -> torch.Tensor:
    return calibration_tokens(CALIBRATION, llama[1], data_root, 512)


def layer_inputs(model: torch.nn.Module, names: list[str], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every named layer's calibration inputs [n, in], captured by plain hooks (the naive reference)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n.removesuffix(".weight")).register_forward_pre_hook(
            lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1]).detach().clone())
        )
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for handle in handles:
        handle.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}


def brute_force(costs: list[list[int]], scores: list[list[float]], budget: int) -> float:
    best = math.inf
    for choice in itertools.product(*(range(len(r)) for r in costs)):
        if sum(costs[i][k] for i, k in enumerate(choice)) <= budget:
            best = min(best, sum(scores[i][k] for i, k in enumerate(choice)))
    return best


@pytest.mark.parametrize(
    ("candidates", "target", "n_layers"),
    [(("nf3-b64", "int8-b64"), 4.0, 14), (("nf3-b64", "nf4-b64", "int8-b64", "16-bit"), 5.0, 7)],
)
def test_allocation_on_a_tiny_model_equals_brute_force_within_the_budget(
    llama, tokens, candidates, target, n_layers
) -> None:
    model = llama[0]
    pristine = snapshot_weights(model)
    weights = dict(list(linear_weights(model).items())[:n_layers])
    x = layer_inputs(model, list(weights), tokens)
    recipe = mixed(target, candidates)
    costs = [[naive_bits(c, v.shape) for c in recipe.candidates] for v in weights.values()]
    scores = [
        [naive_score(v.detach().clone(), c, x[n]) for c in recipe.candidates] for n, v in weights.items()
    ]
    budget = math.floor(target * sum(v.numel() for v in weights.values()))
    assert budget == budget_bits(target, weights)
    try:
        per_layer, allocation = quantize_allocated_(model, weights, {}, recipe, {}, tokens)
    finally:
        restore_weights_(model, pristine)
    chosen = json.loads(allocation)["layers"]
    picks = [recipe.candidates.index(chosen[n]) for n in weights]
    assert sum(costs[i][k] for i, k in enumerate(picks)) <= budget
    found = sum(scores[i][k] for i, k in enumerate(picks))
    assert found == pytest.approx(brute_force(costs, scores, budget), rel=1e-5)
    assert {n: r.name for n, r in per_layer.items()} == chosen


def test_a_mixed_job_counts_exact_bits_under_its_target_and_reuses_its_sensitivities(llama, tokens) -> None:
    model, cache = llama[0], dict[Any, Any]()
    pristine = snapshot_weights(model)
    recipe = mixed(3.5, ("nf3-b64", "nf4-b64", "int8-b64"))
    try:
        report = quantize_model_(model, recipe, cache, tokens)
        restore_weights_(model, pristine)
        hessians = next(v for k, v in cache.items() if k[0] == "gptq-hessians")
        again = quantize_model_(model, recipe, cache, tokens)
    finally:
        restore_weights_(model, pristine)
    weights = linear_weights(model)
    assert report.allocation is not None
    layers = json.loads(report.allocation)["layers"]
    expected = sum(naive_bits(layers[n], v.shape) for n, v in weights.items())
    n_matrix = sum(v.numel() for v in weights.values())
    assert report.bits_per_param == expected / n_matrix <= 3.5
    assert report.n_quantized_params == n_matrix and again == report
    assert next(v for k, v in cache.items() if k[0] == "gptq-hessians") is hessians  # not collected twice
    assert sum(k[0] == "allocation-sensitivities" for k in cache) == 1
    reference = collect_hessians(model, weights, tokens, torch.device("cpu"))
    assert torch.allclose(hessians.of(next(iter(weights))), reference.of(next(iter(weights))))


def test_a_mixed_gptq_job_solves_each_group_with_the_shared_hessians(llama, tokens) -> None:
    model, cache = llama[0], dict[Any, Any]()
    pristine = snapshot_weights(model)
    recipe = mixed(4.0, ("nf3-b64", "int8-b64"), method="gptq")
    try:
        report = quantize_model_(model, recipe, cache, tokens)
    finally:
        restore_weights_(model, pristine)
    full = [v for k, v in cache.items() if k[0] == "gptq-hessians" and len(k[2]) == 14]
    views = [v for k, v in cache.items() if k[0] == "gptq-hessians" and len(k[2]) < 14]
    assert (
        len(full) == 1 and views and all(v.h[o] is full[0].h[o] for v in views for o in v.h)
    )  # the groups' Hessians are views, never collected again
    assert report.bits_per_param <= 4.0 and recipe.name == "gptq-knapsack4[nf3-b64+int8-b64]"


def test_the_mixed_sweep_plans_and_bad_targets_stop_in_preflight(tmp_path, monkeypatch) -> None:
    from pipeline.run import plan_run
    from pipeline.sweep import ConfigError

    monkeypatch.setenv("KBIT_CACHE", str(tmp_path / "cache"))  # no ladder trained: one model counted
    args = ["+sweep=mixed", "model=ladder/h100", "dry_run=true", f"results_root={tmp_path}"]
    plan = plan_run(args)
    mixed_jobs = [j for j in plan.jobs if j.recipe.is_mixed]
    assert len(plan.jobs) == 49 and len(mixed_jobs) == 40
    assert {j.recipe.target_bits for j in mixed_jobs} == {2.5, 3.0, 3.25, 3.5, 4.0}
    by_allocator = {(j.recipe.allocation, j.recipe.sensitivity) for j in mixed_jobs}
    assert by_allocator == {
        ("knapsack", "hessian"), ("shiftadd", "hessian"), ("search", "hessian"),
        ("knapsack", "measured"), ("knapsack", "first_order"),
    }  # fmt: skip
    assert all(json.loads(j.job_json)["recipe"]["candidates"] for j in mixed_jobs)
    with pytest.raises(ConfigError, match=r"target_bits=2 is outside .* 2.25 \(nf2-b64\)"):
        plan_run([*args, "quant.target_bits=2"])
    with pytest.raises(ConfigError, match=r"quant.allocation='knapsack' needs calibration text"):
        plan_run([*args, "quant.calibration.source=null"])
    with pytest.raises(ConfigError, match=r"quant.search.steps=0 is not allowed; use an integer 1..100000"):
        plan_run([*args, "quant.search.steps=0"])
    with pytest.raises(ConfigError, match=r"quant.sensitivity 'hessain'; did you mean 'hessian'"):
        plan_run([*args, "quant.sensitivity=hessain"])
    with pytest.raises(ConfigError, match="lamda"):  # the config layer refuses an unknown key
        plan_run([*args, "quant.search.lamda=1"])


def test_a_target_the_layers_cannot_meet_exactly_is_named() -> None:
    from pipeline.methods.allocation import allocate

    recipe = mixed(3.3, ("nf3-b64", "nf4-b64"))
    with pytest.raises(ValueError, match=r"target_bits=3.3 is below .* need 4.0000 bits per parameter"):
        allocate([[200, 300], [200, 300]], [[1.0, 0.0], [1.0, 0.0]], ["a", "b"], recipe, 150, 100)


def test_a_worker_records_the_allocation_on_its_rows(tiny_model_dir, data_root, tmp_path) -> None:
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
        "quant.allocation=knapsack,uniform",
        "quant.target_bits=3.5",
        "quant.candidates=[nf3-b64,nf4-b64]",
        "quant.calibration.source=corpus:train",
        "quant.calibration.n_samples=8",
        "quant.calibration.seq_len=64",
        f"results_root={tmp_path}",
        "study=mixed",
    ]
    jobs = build_jobs(expand(plan_sweep(overrides, multirun=True)))
    worker = ModelWorker(str(tmp_path))
    assert [worker.run(job).status for job in jobs] == ["ok", "ok"]
    frame = load_results(tmp_path / "mixed").drop_duplicates("job_key").set_index("method_params")
    mixed_row = frame.loc['{"allocation":"knapsack","candidates":"nf3-b64,nf4-b64","target_bits":3.5}']
    layers = json.loads(mixed_row["allocation"])["layers"]
    assert set(layers.values()) == {"nf3-b64", "nf4-b64"} and mixed_row["bits_per_param"] <= 3.5
    assert pd.isna(frame.loc["{}", "allocation"]) and frame.loc["{}", "bits_per_param"] == 4.25
