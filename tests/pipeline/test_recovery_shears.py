"""Shears-style elastic adapters (pipeline/shears.py via recover.method=shears) on the real tiny Llama
and the real corpus, on CPU.

Properties: the super-adapter's training loss falls with ranks sampled per layer; a sub-adapter at
per-layer ranks r is exactly the quantized model plus B[:, :r] A[:r] merged by hand (the reference
here), also after the adapter is cut down to those ranks; the search stays within the budget of a
LoRA at `recover.rank` and keeps all layers at the largest rank when that fits; the kept adapter's
bits are 16 x its parameters for the chosen ranks; the base stays frozen; bad settings are refused
with one message each; a worker runs a shears job with a sparse base end to end.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pipeline import shears
from pipeline.jobs import build_jobs
from pipeline.models import load_model, quantize_model_, snapshot_weights
from pipeline.recipe import Recipe
from pipeline.recovery import ADAPTER_NAME, RecoverSpec, attach_adapters_, detach_adapters_, train_recovery_
from pipeline.specs import ModelRef
from tests.pipeline.test_recover_adapters import LAYERS, N_DECODER_LAYERS, cells, lora_params

MODULE_SIZES = [n_in + n_out for n_in, n_out in LAYERS] * N_DECODER_LAYERS  # module order


def shears_spec(**fields) -> RecoverSpec:
    base = {"method": "shears", "ranks": (2, 4, 8), "rank": 4, "seq_len": 64, "batch_size": 4, "lr": 1e-2}
    return RecoverSpec(**{**base, **fields})


def quantized_tiny(tiny_model_dir):
    model, tokenizer = load_model(ModelRef(str(tiny_model_dir)), "cpu")
    report = quantize_model_(model, Recipe(dtype="int", bits=3, block_size=64))
    return model, tokenizer, report


def test_super_adapter_trains_and_the_kept_adapter_is_within_budget_and_counted(tiny_model_dir, data_root):
    model, tokenizer, _ = quantized_tiny(tiny_model_dir)
    quantized = snapshot_weights(model)
    spec = shears_spec(steps=40)
    tuner = attach_adapters_(model, spec)
    report = train_recovery_(model, tokenizer, spec, data_root, 512)
    assert report.first_loss is not None and report.last_loss is not None
    assert report.last_loss < report.first_loss - 0.1, (report.first_loss, report.last_loss)
    chosen = report.chosen_ranks
    assert chosen is not None and len(chosen) == len(MODULE_SIZES) and set(chosen) <= {2, 4, 8}
    expected = sum(r * size for r, size in zip(chosen, MODULE_SIZES, strict=True))
    assert report.adapter_params == expected <= lora_params(4)
    assert report.adapter_bits == 16 * expected and report.search in ("greedy", "heuristic")
    assert [layer.module.r[ADAPTER_NAME] for layer in shears.elastic_layers(model)] == list(chosen)
    base = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(p, quantized[n.replace(".base_layer", "")]) for n, p in base.items())  # frozen
    params = json.loads(report.recover_json(spec))
    assert params["chosen_ranks"] == list(chosen) and params["ranks"] == [2, 4, 8]
    detach_adapters_(model, tuner)
    after = snapshot_weights(model)
    assert all(torch.equal(after[n], quantized[n]) for n in quantized)


def merged_reference(model, layers, ranks):
    """The quantized model with W + B[:, :r] @ A[:r] written into each adapted weight (scale 1)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer, rank in zip(layers, ranks, strict=True):
            a = layer.module.lora_A[ADAPTER_NAME].weight
            b = layer.module.lora_B[ADAPTER_NAME].weight
            reference.get_submodule(layer.name).weight += b[:, :rank] @ a[:rank]
    return reference


def test_a_sub_adapter_is_the_plain_lora_of_its_first_components(tiny_model_dir):
    model, _, _ = quantized_tiny(tiny_model_dir)
    plain = copy.deepcopy(model)
    attach_adapters_(model, shears_spec(steps=0))
    layers = shears.elastic_layers(model)
    torch.manual_seed(1)
    for layer in layers:  # B starts at zero: give it values so that every component matters
        torch.nn.init.normal_(layer.module.lora_B[ADAPTER_NAME].weight, std=0.05)
    ranks = [(2, 4, 8)[i % 3] for i in range(len(layers))]
    reference = merged_reference(plain, layers, ranks)
    ids = torch.arange(64).view(2, 32) % 100
    shears.install_masks_(layers)
    shears.set_ranks_(layers, ranks)
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        full = model(input_ids=ids).logits.clone()
        shears.set_ranks_(layers, [8] * len(layers))
        assert not torch.allclose(model(input_ids=ids).logits, full, atol=1e-4)  # the mask matters
        shears.truncate_(layers, ranks)
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert shears.adapter_params(layers, ranks) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


@pytest.mark.parametrize("rank", [2, 3, 4, 6, 8])
def test_search_respects_the_budget(tiny_model_dir, rank):
    model, _, _ = quantized_tiny(tiny_model_dir)
    attach_adapters_(model, shears_spec(steps=0))
    layers = shears.elastic_layers(model)
    shears.install_masks_(layers)
    torch.manual_seed(2)
    for layer in layers:
        torch.nn.init.normal_(layer.module.lora_B[ADAPTER_NAME].weight, std=0.05)
    ids = torch.arange(128).view(4, 32) % 100
    budget = shears.rank_budget(layers, rank)
    found = shears.search_ranks(layers, (2, 4, 8), budget, lambda: shears.validation_loss(model, ids))
    assert shears.adapter_params(layers, found.ranks) <= budget == lora_params(rank)
    assert [layer.rank for layer in layers] == list(found.ranks)
    assert found.loss == pytest.approx(shears.validation_loss(model, ids))
    if rank == 2:
        assert set(found.ranks) == {2}  # the only sub-adapter that fits
    if rank == 8:
        assert set(found.ranks) == {8} and found.search == "greedy"  # nothing to drop


def test_medium_rank_is_the_middle_of_the_ranks():
    assert [shears.medium_rank(r) for r in ((4,), (4, 8), (4, 8, 16), (2, 4, 8, 16))] == [4, 4, 8, 4]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ranks": ()}, r"recover.method='shears' needs recover.ranks, e.g. \[4, 8, 16\]; got \[\]"),
        ({"ranks": (0, 4)}, r"recover.ranks=\[0, 4\] must be ints >= 1"),
        ({"ranks": (8, 4)}, r"recover.ranks=\[8, 4\] must be increasing, without duplicates"),
        ({"ranks": (4, 4)}, r"recover.ranks=\[4, 4\] must be increasing, without duplicates"),
        ({"rank": 1}, r"recover.rank=1 \(shears: the average-rank budget\) is below .* allowed: >= 2"),
        ({"sparsity": 1.0}, r"recover.sparsity=1.0 is outside \[0, 1\)"),
        ({"sparsity": -0.1}, r"recover.sparsity=-0.1 is outside \[0, 1\)"),
        ({"method": "none", "sparsity": 0.5}, r"recover.sparsity=0.5 needs adapters: .*got 'none'"),
    ],
)
def test_bad_shears_settings_are_refused_at_construction(fields, message):
    with pytest.raises(ValueError, match=message):
        shears_spec(**fields)


def test_preflight_names_bad_shears_settings_and_unknown_keys(tiny_model_dir, data_root, tmp_path):
    from pipeline.preflight import preflight
    from pipeline.sweep import ConfigError

    bad = cells(
        tiny_model_dir, data_root, "quant.bits=3", "recover.method=shears", "recover.ranks=[8,4]",
        "recover.sparsity=1.5", f"results_root={tmp_path}",
    )  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        preflight(bad)
    assert "recover.ranks=[8, 4] must be increasing" in str(caught.value)
    with pytest.raises(Exception, match=r"recover.*rankz"):
        cells(tiny_model_dir, data_root, "recover.rankz=[4]")


def test_key_holds_every_recovery_setting_and_lora_keys_do_not_change(tiny_model_dir, data_root):
    lora = RecoverSpec(method="lora", ranks=(2, 4))
    assert "ranks" not in lora.plain() and "sparsity" not in lora.plain()  # pre-shears keys kept
    settings = ["recover.method=shears", "recover.ranks=[2,4]", "recover.rank=2", "recover.sparsity=0,0.5"]
    jobs = build_jobs(cells(tiny_model_dir, data_root, "quant.bits=3", *settings))
    keys = {json.dumps(json.loads(job.job_json)["recover"], sort_keys=True): job.key for job in jobs}
    assert len(keys) == 2 and all('"ranks": [2, 4]' in k for k in keys)
    assert sum('"sparsity": 0.5' in k for k in keys) == 1


def test_a_worker_runs_a_shears_job_on_a_sparse_base(tiny_model_dir, data_root, tmp_path):
    from pipeline.worker import ModelWorker

    recover = ["recover.steps=6", "recover.ranks=[2,4]", "recover.rank=2", "recover.seq_len=64"]
    recover += ["recover.batch_size=2", "recover.sparsity=0,0.5"]
    grid = cells(tiny_model_dir, data_root, "quant.bits=4", "recover.method=shears", *recover)
    jobs = {job.recover.sparsity: job for job in build_jobs(grid)}
    worker = ModelWorker(str(tmp_path))
    dense, sparse = (worker.run(jobs[s]) for s in (0.0, 0.5))
    assert [dense.status, sparse.status] == ["ok", "ok"], (dense.error, sparse.error)
    dense_row, sparse_row = dense.rows[0], sparse.rows[0]
    assert dense_row["adapter_bits"] == sparse_row["adapter_bits"] == 16 * lora_params(2)  # budget = min
    params = json.loads(sparse_row["recover_params"])
    assert params["chosen_ranks"] == [2] * len(MODULE_SIZES) and params["sparsity"] == 0.5
    n_matrix = sum(n_in * n_out for n_in, n_out in LAYERS) * N_DECODER_LAYERS
    pruned = sum(n_out * (n_in // 2) for n_in, n_out in LAYERS) * N_DECODER_LAYERS
    assert sparse_row["total_model_bits"] == dense_row["total_model_bits"] + n_matrix - 4 * pruned
