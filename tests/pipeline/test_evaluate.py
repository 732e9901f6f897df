"""pipeline.evals.evaluate / pipeline.evals.perplexity: strided perplexity against naive forwards, the 16-bit
baseline and restore reproducing metrics exactly, and every bad-input path of `check_eval_spec`."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from pipeline.evals.evaluate import Evaluator, check_eval_spec
from pipeline.evals.perplexity import encode_text, strided_windows, tokenize_text, total_nats
from pipeline.models import load_model, quantize_model_, restore_weights_, snapshot_weights
from pipeline.recipe import Recipe
from pipeline.specs import EvalSpec, ModelRef, PerplexitySpec

WIKI = "eval/wikitext-2-raw/wiki.test.raw"


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return load_model(ModelRef(str(tiny_model_dir)), "cpu")


@pytest.fixture(scope="module")
def wiki_text(data_root):
    return (data_root / WIKI).read_text(encoding="utf-8")[:20_000]


def ppl_spec(**kwargs) -> PerplexitySpec:
    return PerplexitySpec(**{"name": "wikitext2", "path": WIKI, "max_tokens": 160, **kwargs})


@pytest.mark.parametrize("n, context, stride", [(10, 4, 4), (10, 4, 2), (10, 4, 1), (3, 8, 8), (9, 5, 3)])
def test_strided_windows_score_each_token_at_most_once(n, context, stride):
    windows = strided_windows(n, context, stride)
    scored = [p for w in windows for p in range(w.end - w.n_scored, w.end)]
    assert len(scored) == len(set(scored)) and 0 not in scored
    assert all(w.end - w.begin <= context and w.end - w.n_scored > w.begin for w in windows)
    if stride < context:
        assert sorted(scored) == list(range(1, n))
    else:  # disjoint windows: every window's first token goes unscored
        assert sorted(scored) == [p for p in range(1, n) if p % context != 0]


def _nll_naive(model, ids: list[int], context: int) -> list[float]:
    """Each token p >= 1 scored by a full forward of the (up to) `context` tokens ending at p."""
    nll = []
    with torch.no_grad():
        for p in range(1, len(ids)):
            window = torch.tensor([ids[max(0, p - context + 1) : p + 1]])
            logits = model(input_ids=window).logits[0, -2]
            nll.append(-torch.log_softmax(logits.double(), -1)[ids[p]].item())
    return nll


def _nats_naive(model, ids: list[int], context: int) -> float:
    return math.fsum(_nll_naive(model, ids, context))


def test_perplexity_single_window_equals_full_forward(llama, wiki_text):
    model, tokenizer = llama
    text = tokenize_text(ppl_spec(context_length=256, stride=256), wiki_text, tokenizer, 4, model.device)
    ids, _ = encode_text(wiki_text, tokenizer, 160)
    assert ids[0] == tokenizer.bos_token_id and text.n_scored == len(ids) - 1 == 160
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    naive = F.cross_entropy(logits.double(), torch.tensor(ids[1:]), reduction="sum").item()
    assert total_nats(model, text) == pytest.approx(naive, rel=1e-5)


def test_perplexity_strided_equals_naive_per_token_forwards(llama, wiki_text):
    model, tokenizer = llama
    spec = ppl_spec(context_length=24, stride=1, max_tokens=60)
    text = tokenize_text(spec, wiki_text, tokenizer, 8, model.device)
    ids, _ = encode_text(wiki_text, tokenizer, 60)
    assert text.n_scored == len(ids) - 1
    assert total_nats(model, text) == pytest.approx(_nats_naive(model, ids, 24), rel=1e-5)


def test_perplexity_metrics_relations(llama, data_root):
    model, tokenizer = llama
    spec = EvalSpec(perplexity=(ppl_spec(context_length=64, stride=32),), data_root=str(data_root))
    metrics = {m.metric: m for m in Evaluator(model, tokenizer, spec).run()}
    assert set(metrics) == {"nats_per_token", "perplexity", "bits_per_byte"}
    nats = metrics["nats_per_token"].value
    assert metrics["perplexity"].value == pytest.approx(math.exp(nats))
    text = (data_root / WIKI).read_text(encoding="utf-8")
    _, n_bytes = encode_text(text, tokenizer, 160)
    assert metrics["bits_per_byte"].value == pytest.approx(nats * 160 / math.log(2) / n_bytes)
    assert all(m.n_examples == 160 and m.task == "wikitext2" for m in metrics.values())


def test_baseline_and_restore_reproduce_metrics_exactly(tiny_model_dir, data_root):
    from kernels import QuantSpec

    model, tokenizer = load_model(ModelRef(str(tiny_model_dir)), "cpu")
    spec = EvalSpec(
        perplexity=(ppl_spec(context_length=64, stride=64), ppl_spec(name="heldout", path="corpus:heldout")),
        data_root=str(data_root),
    )
    evaluator = Evaluator(model, tokenizer, spec)
    before = evaluator.run()
    snapshot = snapshot_weights(model)
    quantize_model_(model, Recipe.of(None))
    assert evaluator.run() == before
    quantize_model_(model, Recipe.of(QuantSpec(dtype="int", bits=3, block_size=64)))
    quantized = evaluator.run()
    assert quantized[0].value != before[0].value
    restore_weights_(model, snapshot)
    assert evaluator.run() == before


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"data_root": "/no/such/root"}, ValueError, "data_root"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"limit": 0}, ValueError, "limit"),
        ({"tasks": ("piqa", "piqa")}, ValueError, "duplicate"),
        ({"tasks": ("hellaswagg",)}, KeyError, "did you mean 'hellaswag'"),
        ({"tasks": ("no_such_task_xyz",)}, KeyError, "offline tasks"),
        ({"perplexity": (ppl_spec(path="eval/missing.txt"),)}, ValueError, "missing.txt"),
        ({"perplexity": (ppl_spec(context_length=1),)}, ValueError, "context_length"),
        ({"perplexity": (ppl_spec(context_length=8, stride=9),)}, ValueError, "stride"),
        ({"perplexity": (ppl_spec(stride=0),)}, ValueError, "stride"),
        ({"perplexity": (ppl_spec(max_tokens=1),)}, ValueError, "max_tokens"),
        ({"perplexity": (ppl_spec(), ppl_spec())}, ValueError, "duplicate"),
        ({"compile": "yes"}, ValueError, "compile must be true, false or null"),
    ],
)
def test_check_eval_spec_rejects(data_root, change, error, match):
    spec = replace(EvalSpec(data_root=str(data_root)), **change)
    with pytest.raises(error, match=match):
        check_eval_spec(spec)


def test_check_eval_spec_accepts_defaults(data_root):
    check_eval_spec(
        EvalSpec(
            perplexity=(ppl_spec(), ppl_spec(name="heldout", path="corpus:heldout")),
            tasks=("lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge"),
            limit=5,
            data_root=str(data_root),
        )
    )


def test_check_eval_spec_missing_task_data(tmp_path):
    with pytest.raises(ValueError, match="piqa"):
        check_eval_spec(EvalSpec(tasks=("piqa",), data_root=str(tmp_path)))


def test_evaluator_rejects_windows_longer_than_the_model(llama, data_root):
    model, tokenizer = llama
    limit = model.config.max_position_embeddings
    spec = EvalSpec(perplexity=(ppl_spec(context_length=limit + 1, stride=limit),), data_root=str(data_root))
    needle = f"context_length={limit + 1} exceeds .*max_position_embeddings={limit}"
    with pytest.raises(ValueError, match=needle):
        Evaluator(model, tokenizer, spec)


def test_max_positions_reads_config_without_loading(tiny_model_dir, tmp_path):
    from pipeline.models import max_positions

    assert max_positions(str(tiny_model_dir)) == 512
    assert max_positions("ladder:h100/d128") == 512 and max_positions("ladder:tiny") == 256
    assert max_positions(str(tmp_path)) is None and max_positions("org/hub-model") is None


def test_text_too_short(llama):
    model, tokenizer = llama
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        tokenize_text(ppl_spec(), "", tokenizer, 4, model.device)


@pytest.mark.parametrize(
    ("setting", "device", "scorer", "tasks", "want"),
    [
        (None, "cuda", "fast", True, True),
        (None, "cuda", "hflm", False, True),  # perplexity only: fixed windows
        (None, "cuda", "hflm", True, False),  # HFLM's widths vary batch by batch
        (None, "cpu", "fast", True, False),
        (True, "cpu", "hflm", True, True),
        (False, "cuda", "fast", True, False),
    ],
)
def test_compile_auto_is_on_for_planned_shapes_on_cuda(setting, device, scorer, tasks, want):
    from pipeline.evals.evaluate import should_compile

    assert should_compile(setting, device, scorer, tasks) is want


@pytest.mark.gpu
def test_compiled_perplexity_equals_eager_on_the_gpu(tiny_neox_dir, data_root):
    """Auto compile on CUDA (perplexity only): the same nats as eager, float32 weights."""
    from pipeline.models import is_compiled

    spec = EvalSpec(
        perplexity=(ppl_spec(max_tokens=3000, context_length=128, stride=96),),
        data_root=str(data_root),
        batch_size=4,
    )
    eager_model, tokenizer = load_model(ModelRef(str(tiny_neox_dir)), "cuda")
    eager = Evaluator(eager_model.float(), tokenizer, replace(spec, compile=False)).run()
    model, _ = load_model(ModelRef(str(tiny_neox_dir)), "cuda")
    evaluator = Evaluator(model.float(), tokenizer, spec)
    assert is_compiled(model) and not is_compiled(eager_model)
    for got, want in zip(evaluator.run(), eager, strict=True):
        assert got.value == pytest.approx(want.value, rel=1e-4)


def test_perplexity_units_sum_to_the_value_and_pair_across_configs(tiny_model_dir, data_root):
    """100 contiguous chunks of the scored tokens: sum / count is the value, and the counts (the
    partition) are the same for every configuration, so chunk i pairs across jobs."""
    from kernels import QuantSpec

    model, tokenizer = load_model(ModelRef(str(tiny_model_dir)), "cpu")
    spec = EvalSpec(
        perplexity=(ppl_spec(context_length=48, stride=24, max_tokens=1000),), data_root=str(data_root)
    )
    evaluator = Evaluator(model, tokenizer, spec)
    runs = [evaluator.run()]
    quantize_model_(model, Recipe.of(QuantSpec(dtype="int", bits=3, block_size=64)))
    runs.append(evaluator.run())
    for metrics in runs:
        by_metric = {m.metric: m for m in metrics}
        nats = by_metric["nats_per_token"]
        assert len(nats.unit_sums) == 100 and sum(nats.unit_counts) == nats.n_examples == 1000
        assert nats.value == pytest.approx(math.fsum(nats.unit_sums) / sum(nats.unit_counts), rel=1e-15)
        assert (
            by_metric["perplexity"].unit_sums == nats.unit_sums
            and by_metric["bits_per_byte"].unit_sums is None
        )
        assert set(nats.unit_counts) == {10.0}
    assert runs[0][0].unit_counts == runs[1][0].unit_counts and runs[0][0].unit_sums != runs[1][0].unit_sums


def test_perplexity_units_are_the_per_token_nll_summed_by_chunk(llama, wiki_text):
    from pipeline.evals.perplexity import score_text
    from pipeline.evals.units import chunk_bounds

    model, tokenizer = llama
    spec = ppl_spec(context_length=24, stride=1, max_tokens=60)
    text = tokenize_text(spec, wiki_text, tokenizer, 8, model.device)
    ids, _ = encode_text(wiki_text, tokenizer, 60)
    per_token = _nll_naive(model, ids, 24)
    assert len(chunk_bounds(len(per_token), 100)) == 61 and text.chunks.counts == (1.0,) * 60  # one a chunk
    assert score_text(model, text).nats == pytest.approx(per_token, rel=1e-5)
