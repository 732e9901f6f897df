"""Recovery adapters (pipeline/recovery.py) on a real tiny Llama and the real corpus, on CPU.

Properties: a few dozen LoRA steps lower the held-out loss of a 3-bit model; the adapters leave no
trace (names, weights, numbers) once removed, also on a resident worker model; their bits are counted
exactly (against counts written out here); bad settings are refused before anything runs; a job
without recovery keeps its key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.jobs import Job, _dumps, build_jobs
from pipeline.models import load_model, quantize_model_, snapshot_weights
from pipeline.recipe import Recipe
from pipeline.recovery import (
    RecoverSpec,
    adapter_param_count,
    attach_adapters_,
    detach_adapters_,
    train_recovery_,
    with_adapter_bits,
)
from pipeline.specs import ModelRef
from pipeline.sweep import ConfigError, expand, plan_sweep

WIKI = "eval/wikitext-2-raw/wiki.test.raw"
WINDOW = "{name:wikitext2,path:" + WIKI + ",context_length:64,stride:64,max_tokens:256}"
# the tiny Llama's adapted linear layers per decoder layer, as (in, out): q, k, v, o, gate, up, down
LAYERS = [(64, 64)] * 4 + [(64, 128)] * 2 + [(128, 64)]
N_DECODER_LAYERS = 2


def lora_params(rank: int) -> int:
    """LoRA's A [rank, in] and B [out, rank] for every adapted layer."""
    return N_DECODER_LAYERS * sum(rank * (n_in + n_out) for n_in, n_out in LAYERS)


def vblora_params(rank: int, num_vectors: int, vector_length: int) -> int:
    """VB-LoRA's shared bank once, plus per layer logits A [rank, in/len, vectors] and B [out/len, rank,
    vectors]."""
    per_layer = sum(rank * (n_in + n_out) // vector_length * num_vectors for n_in, n_out in LAYERS)
    return num_vectors * vector_length + N_DECODER_LAYERS * per_layer


def heldout_loss(model, tokenizer, data_root: Path) -> float:
    from pipeline.ladders.corpus import split_corpus

    _, heldout = split_corpus(data_root)
    ids = torch.tensor(tokenizer(heldout[:20_000])["input_ids"][:1024]).view(-1, 64)
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_lora_recovery_lowers_the_heldout_loss_of_a_3bit_model_and_leaves_no_trace(tiny_model_dir, data_root):
    model, tokenizer = load_model(ModelRef(str(tiny_model_dir)), "cpu")
    quantize_model_(model, Recipe(dtype="int", bits=3, block_size=64))
    quantized, loss_3bit = snapshot_weights(model), heldout_loss(model, tokenizer, data_root)
    spec = RecoverSpec(method="lora", rank=4, steps=40, lr=1e-2, seq_len=64, batch_size=4)
    tuner = attach_adapters_(model, spec)
    report = train_recovery_(model, tokenizer, spec, data_root, 512)
    recovered = heldout_loss(model, tokenizer, data_root)
    assert report.last_loss is not None and report.first_loss is not None
    assert report.last_loss < report.first_loss
    assert recovered < loss_3bit - 0.01, (loss_3bit, recovered)
    base = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(p, quantized[n.replace(".base_layer", "")]) for n, p in base.items())  # frozen
    detach_adapters_(model, tuner)
    after = snapshot_weights(model)
    assert after.keys() == quantized.keys() and all(torch.equal(after[n], quantized[n]) for n in after)
    assert heldout_loss(model, tokenizer, data_root) == loss_3bit and not hasattr(model, "peft_config")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (RecoverSpec(method="lora", rank=4, steps=0), lora_params(4)),
        (RecoverSpec(method="lora", rank=1, steps=0), lora_params(1)),
        (
            RecoverSpec(method="vblora", rank=4, steps=0, num_vectors=32, vector_length=32),
            vblora_params(4, 32, 32),
        ),
        (
            RecoverSpec(method="vblora", rank=2, steps=0, num_vectors=8, vector_length=64),
            vblora_params(2, 8, 64),
        ),
    ],
)
def test_adapter_bits_are_counted_exactly(tiny_model_dir, data_root, spec, expected):
    model, tokenizer = load_model(ModelRef(str(tiny_model_dir)), "cpu")
    report = quantize_model_(model, Recipe(dtype="int", bits=3, block_size=64))
    tuner = attach_adapters_(model, spec)
    recovery = train_recovery_(model, tokenizer, spec, data_root, 512)
    assert adapter_param_count(model) == recovery.adapter_params == expected
    assert recovery.adapter_bits == 16 * expected
    detach_adapters_(model, tuner)
    total = with_adapter_bits(report, recovery.adapter_bits)
    assert total.total_model_bits == report.total_model_bits + 16 * expected
    n_matrix = report.n_quantized_params + report.n_kept_params
    assert total.bits_per_param == pytest.approx(report.bits_per_param + 16 * expected / n_matrix, rel=1e-12)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"method": "dora"}, r"recover.method='dora' unknown; allowed: none, lora, vblora"),
        ({"method": "lora", "rank": 0}, r"recover.rank must be an int >= 1, got 0"),
        ({"method": "lora", "steps": -1}, r"recover.steps must be an int >= 0, got -1"),
        ({"method": "lora", "lr": 0.0}, r"recover.lr must be a number > 0"),
    ],
)
def test_bad_recover_settings_are_refused_at_construction(fields, message):
    with pytest.raises(ValueError, match=message):
        RecoverSpec(**fields)


def cells(tiny_model_dir: Path, data_root: Path, *overrides: str):
    base = [
        f"model.name_or_path={tiny_model_dir}",
        f"eval.perplexity=[{WINDOW}]",
        f"eval.data_root={data_root}",
    ]
    return expand(plan_sweep([*base, "eval.batch_size=4", *overrides], multirun=True))


def test_preflight_refuses_bad_recovery_before_anything_runs(tiny_model_dir, data_root, tmp_path):
    from pipeline.preflight import preflight

    bad = cells(
        tiny_model_dir,
        data_root,
        "quant.bits=3",
        "recover.method=lora,dora",
        f"recover.data={WIKI}",
        "recover.rank=0",
        f"results_root={tmp_path}",
    )
    with pytest.raises(ConfigError) as caught:
        preflight(bad)
    text = str(caught.value)
    assert "recover.method='dora' unknown" in text and "recover.rank must be an int >= 1" in text
    preflight(
        cells(tiny_model_dir, data_root, "quant.bits=3", "recover.method=lora", f"results_root={tmp_path}")
    )
    evaluated = cells(
        tiny_model_dir,
        data_root,
        "quant.bits=3",
        "recover.method=lora",
        f"recover.data={WIKI}",
        f"results_root={tmp_path}",
    )
    with pytest.raises(ConfigError, match=r"recover.data: .*evaluation text"):
        preflight(evaluated)
    assert not (tmp_path / "default").exists()


def test_no_recovery_keeps_the_key_and_a_baseline_never_recovers(tiny_model_dir, data_root):
    jobs = build_jobs(cells(tiny_model_dir, data_root, "quant.bits=3,16", "recover.method=none,lora"))
    by_setting = {(job.bits, job.recover.method): job for job in jobs}
    assert sorted(by_setting) == [(3, "lora"), (3, "none"), (16, "none")]  # 16-bit x lora is the baseline
    plain = by_setting[(3, "none")]
    assert '"recover"' not in plain.job_json and plain.job_json == _dumps(plain.canonical)
    assert (
        plain.key
        == Job(
            *(getattr(plain, f) for f in ("model", "recipe", "evals", "study")), **_pre_recovery(plain)
        ).key
    )
    lora = by_setting[(3, "lora")]
    assert lora.job_json == _dumps(lora.canonical) and json.loads(lora.job_json)["recover"]["data_sha256"]


def _pre_recovery(job: Job) -> dict:
    """The fields a job had before recovery existed."""
    names = ("model_label", "model_family", "calibration_sha256", "model_sha256", "data_sha256")
    return {name: getattr(job, name) for name in names}


def test_a_job_after_a_recovered_job_gives_the_same_numbers(tiny_model_dir, data_root, tmp_path):
    from pipeline.worker import ModelWorker

    recover = ["recover.steps=10", "recover.rank=2", "recover.seq_len=64", "recover.batch_size=2"]
    grid = cells(tiny_model_dir, data_root, "quant.bits=3,4", "recover.method=none,lora", *recover)
    jobs = {(job.bits, job.recover.method): job for job in build_jobs(grid)}
    worker = ModelWorker(str(tmp_path))
    order = [(4, "none"), (3, "lora"), (4, "none"), (3, "none")]
    results = [worker.run(jobs[setting]) for setting in order]
    assert [r.status for r in results] == ["ok"] * 4, [r.error for r in results]
    first, recovered, again, plain = (r.rows for r in results)
    assert [row["value"] for row in again] == [row["value"] for row in first]
    assert {row["recover"] for row in recovered} == {"lora"} and {row["adapter_bits"] for row in plain} == {0}
    adapter_bits = 16 * lora_params(2)
    row, base = recovered[0], plain[0]
    assert row["adapter_bits"] == adapter_bits
    assert row["total_model_bits"] == base["total_model_bits"] + adapter_bits
    n_matrix = base["n_quantized_params"] + base["n_kept_params"]
    assert row["bits_per_param"] == pytest.approx(base["bits_per_param"] + adapter_bits / n_matrix)
    assert json.loads(row["recover_params"])["steps"] == 10 and row["recover_s"] is not None


def test_the_recovery_sweep_plans_every_method_at_3_and_4_bits_at_equal_budgets():
    grid = expand(plan_sweep(["+sweep=recovery", "model=ladder/h100", "dry_run=true"], multirun=True))
    quantized = {(c.quant.dtype, c.quant.bits, c.recover.method) for c in grid if c.quant.bits < 16}
    methods = ("none", "lora", "vblora", "shears")
    eight_bit = {(d, 8, "none") for d in ("int", "nf")}  # the frontier above the recovered 4-bit jobs
    assert quantized == {(d, b, m) for d in ("int", "nf") for b in (3, 4) for m in methods} | eight_bit
    assert len(grid) == 19 and {c.recover.data for c in grid} == {"corpus:train"}
    recover = grid[0].recover  # VB-LoRA's logits per layer equal LoRA's parameters at the rank
    assert recover.num_vectors == recover.vector_length and recover.ranks == [4, 8, 16]
    assert vblora_params(8, 32, 32) == lora_params(8) + 32 * 32
