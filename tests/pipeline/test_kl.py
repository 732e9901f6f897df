"""`kl_to_16bit`: KL(p16 || pq) on the first `kl_tokens` scored tokens, against the 16-bit logits the
Evaluator keeps; zero for the unquantized model, growing as bits drop, equal to a naive computation,
bounded in memory, in the job key, and taken by the worker before any quantization."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from kernels import QuantSpec
from pipeline.evals import perplexity
from pipeline.evals.evaluate import Evaluator
from pipeline.evals.perplexity import encode_text, strided_windows
from pipeline.evals.units import chunk_bounds
from pipeline.models import load_model, quantize_model_, restore_weights_, snapshot_weights
from pipeline.recipe import Recipe
from pipeline.results import load_results
from pipeline.specs import EvalSpec, ModelRef, PerplexitySpec

WIKI = "eval/wikitext-2-raw/wiki.test.raw"


@pytest.fixture
def llama(tiny_model_dir):
    return load_model(ModelRef(str(tiny_model_dir)), "cpu")


def kl_spec(data_root: Path, **window) -> EvalSpec:
    text = {"name": "wikitext2", "path": WIKI, "context_length": 32, "stride": 16, "max_tokens": 300}
    perplexity_spec = PerplexitySpec(**{**text, "kl_tokens": 150, **window})
    return EvalSpec(perplexity=(perplexity_spec,), batch_size=3, data_root=str(data_root))


def kl_row(metrics):
    (row,) = [m for m in metrics if m.metric == "kl_to_16bit"]
    return row


def test_kl_of_the_unquantized_model_is_exactly_zero(llama, data_root):
    model, tokenizer = llama
    evaluator = Evaluator(model, tokenizer, kl_spec(data_root))
    row = kl_row(evaluator.run())
    assert row.value == 0.0 and row.n_examples == 150 and set(row.unit_sums) == {0.0}
    quantize_model_(model, Recipe.of(None))  # the 16-bit recipe touches nothing
    assert kl_row(evaluator.run()).value == 0.0


def test_kl_grows_as_bits_drop(llama, data_root):
    model, tokenizer = llama
    evaluator = Evaluator(model, tokenizer, kl_spec(data_root))
    snapshot = snapshot_weights(model)
    kls = []
    for bits in (8, 6, 4, 3):
        restore_weights_(model, snapshot)
        quantize_model_(model, Recipe.of(QuantSpec("int", bits, 64)))
        kls.append(kl_row(evaluator.run()).value)
    assert 0 < kls[0] < kls[1] < kls[2] < kls[3]
    restore_weights_(model, snapshot)
    assert kl_row(evaluator.run()).value == 0.0


def naive_kl_chunks(reference, model, ids: list[int], spec: PerplexitySpec) -> list[float]:
    """Per-chunk KL sums from one plain float64 forward per window, tokens in text order, no batching."""
    per_token = []
    with torch.no_grad():
        for window in strided_windows(len(ids), spec.context_length, spec.stride):
            x = torch.tensor([ids[window.begin : window.end]])
            positions = slice(-(window.n_scored + 1), -1)
            log_p = torch.log_softmax(reference(input_ids=x).logits[0, positions].double(), -1)
            log_q = torch.log_softmax(model(input_ids=x).logits[0, positions].double(), -1)
            per_token += (log_p.exp() * (log_p - log_q)).sum(-1).tolist()
    bounds = chunk_bounds(spec.kl_tokens, 100)
    kept = per_token[: spec.kl_tokens]
    return [math.fsum(kept[a:b]) for a, b in itertools.pairwise(bounds)]


def test_kl_equals_a_naive_computation(tiny_model_dir, data_root):
    """Overlapping windows, batches cut across the KL slice (150 is no batch boundary): same per chunk."""
    model, tokenizer = load_model(ModelRef(str(tiny_model_dir)), "cpu")
    reference, _ = load_model(ModelRef(str(tiny_model_dir)), "cpu")
    spec = kl_spec(data_root)
    evaluator = Evaluator(model, tokenizer, spec)
    quantize_model_(model, Recipe.of(QuantSpec("nf", 3, 64)))
    row = kl_row(evaluator.run())
    text = (data_root / WIKI).read_text(encoding="utf-8")
    ids, _ = encode_text(text, tokenizer, spec.perplexity[0].max_tokens)
    want = naive_kl_chunks(reference, model, ids, spec.perplexity[0])
    assert len(row.unit_sums) == 100 and sum(row.unit_counts) == 150
    assert row.unit_sums == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert row.value == pytest.approx(math.fsum(want) / 150, rel=1e-5)


def test_kl_slice_longer_than_the_text_covers_every_scored_token(llama, data_root):
    model, tokenizer = llama
    metrics = Evaluator(model, tokenizer, kl_spec(data_root, kl_tokens=10**6, max_tokens=80)).run()
    assert kl_row(metrics).n_examples == metrics[0].n_examples == 80


def test_kl_reference_memory_is_bounded(llama, data_root, monkeypatch):
    model, tokenizer = llama
    vocab = model.config.vocab_size
    monkeypatch.setattr(perplexity, "KL_MAX_BYTES", 149 * vocab * 4)  # float32 logits: 4 bytes each
    with pytest.raises(ValueError, match=r"kl_tokens=150 keeps .* GiB of 16-bit logits .*lower kl_tokens"):
        Evaluator(model, tokenizer, kl_spec(data_root))
    monkeypatch.setattr(perplexity, "KL_MAX_BYTES", 150 * vocab * 4)
    Evaluator(model, tokenizer, kl_spec(data_root))


def test_kl_tokens_is_in_the_job_key(tiny_model_dir):
    from pipeline.jobs import build_jobs
    from pipeline.sweep import expand, plan_sweep

    window = "{name:w,path:" + WIKI + ",context_length:64,stride:64,max_tokens:256"

    def job(extra: str):
        overrides = [f"model.name_or_path={tiny_model_dir}", f"eval.perplexity=[{window}{extra}}}]"]
        (only,) = build_jobs(expand(plan_sweep(overrides, multirun=True)))
        return only

    off, on = job(""), job(",kl_tokens:128")
    assert '"kl_tokens":null' in off.job_json and '"kl_tokens":128' in on.job_json
    assert off.key != on.key != job(",kl_tokens:256").key


def test_worker_takes_the_reference_before_quantizing(tiny_model_dir, data_root, tmp_path):
    """The first job of a fresh worker is quantized: its KL is still against the 16-bit model, and the
    16-bit job after it reads 0; the rows carry their units through Parquet."""
    from pipeline.jobs import build_jobs
    from pipeline.sweep import expand, plan_sweep
    from pipeline.worker import ModelWorker

    window = "{name:wikitext2,path:" + WIKI + ",context_length:64,stride:64,max_tokens:512,kl_tokens:200}"
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        f"eval.perplexity=[{window}]",
        f"eval.data_root={data_root}",
        "eval.batch_size=4",
        "quant.bits=3,16",
        f"results_root={tmp_path}",
        "study=kl",
    ]
    jobs = sorted(build_jobs(expand(plan_sweep(overrides, multirun=True))), key=lambda job: job.bits)
    assert [job.bits for job in jobs] == [3, 16]
    worker = ModelWorker(str(tmp_path))
    results = [worker.run(job) for job in jobs]
    assert [result.status for result in results] == ["ok", "ok"]
    frame = load_results(tmp_path / "kl")
    kl = frame[frame["metric"] == "kl_to_16bit"].set_index("bits")
    assert kl.loc[16, "value"] == 0.0 and kl.loc[3, "value"] > 1e-4  # reversed if taken after quantizing
    assert kl.loc[3, "value"] == pytest.approx(sum(kl.loc[3, "unit_sums"]) / sum(kl.loc[3, "unit_counts"]))
    nats = frame[frame["metric"] == "nats_per_token"].set_index("bits")
    for bits in (3, 16):
        sums, counts = nats.loc[bits, "unit_sums"], nats.loc[bits, "unit_counts"]
        assert nats.loc[bits, "value"] == pytest.approx(sum(sums) / sum(counts), rel=1e-12)
    assert list(nats.loc[3, "unit_counts"]) == list(nats.loc[16, "unit_counts"])  # chunks pair


@pytest.mark.gpu
@pytest.mark.parametrize("compile_layers", [False, True])
def test_kl_in_bf16_on_the_gpu_is_zero_unquantized_and_grows_as_bits_drop(
    tiny_neox_dir, data_root, compile_layers
):
    """bf16 logits kept on the device (2 bytes each), eager or compiled blocks: the same forwards."""
    from dataclasses import replace

    model, tokenizer = load_model(ModelRef(str(tiny_neox_dir), torch_dtype="bfloat16"), "cuda")
    evaluator = Evaluator(model, tokenizer, replace(kl_spec(data_root), compile=compile_layers))
    assert evaluator.kl_references[0].dtype == torch.bfloat16
    snapshot = snapshot_weights(model)
    assert kl_row(evaluator.run()).value == 0.0
    kls = []
    for bits in (8, 4, 3):
        restore_weights_(model, snapshot)
        quantize_model_(model, Recipe.of(QuantSpec("int", bits, 64)))
        kls.append(kl_row(evaluator.run()).value)
    assert 0 <= kls[0] < kls[1] < kls[2]
    restore_weights_(model, snapshot)
    assert kl_row(evaluator.run()).value == 0.0
