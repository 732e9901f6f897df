"""The offline lm-eval tasks: document counts, prompts identical to lm-eval 0.4.13's own task
definitions, one scored example per task, and the cached suite agreeing with plain lm-eval."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipeline.evals.evaluate import Evaluator
from pipeline.evals.lmeval import LmEvalSuite, task_manager
from pipeline.evals.tasks import OFFLINE_TASKS, TASKS_DIR
from pipeline.evals.tasks.docs import (
    data_path,
    hellaswag_doc,
    read_jsonl,
    winogrande_choices,
    winogrande_target,
    winogrande_text,
)
from pipeline.models import load_model
from pipeline.recipe import Recipe
from pipeline.specs import EvalSpec, ModelRef

NAMES = tuple(OFFLINE_TASKS)
COUNTS = {
    "lambada_openai": 5153,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
}


def lm_eval_module(relative: str):
    """A helper module of lm-eval's own task definitions, e.g. 'hellaswag/utils.py'."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / relative
    spec = importlib.util.spec_from_file_location(f"lm_eval_ref_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lm_eval_yaml(relative: str) -> dict:
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.__file__).parent / "tasks" / relative, resolve_func=False)


@pytest.fixture(scope="module")
def tasks(data_root):
    return task_manager(NAMES, data_root).load(list(NAMES))["tasks"]


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return load_model(ModelRef(str(tiny_model_dir)), "cpu")


def test_offline_task_counts(tasks):
    assert {name: len(task.eval_docs) for name, task in tasks.items()} == COUNTS
    assert {name: count for name, (_, _, count) in OFFLINE_TASKS.items()} == COUNTS


def test_yaml_data_files_match_registry():
    from lm_eval.tasks._yaml_loader import load_yaml

    for name, (data_file, split, _) in OFFLINE_TASKS.items():
        config = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=False)
        assert config["task"] == name
        assert config["dataset_kwargs"] == {"data_file": data_file, "split": split}


@pytest.mark.parametrize(
    "name, reference",
    [
        ("lambada_openai", "lambada/lambada_openai.yaml"),
        ("piqa", "piqa/piqa.yaml"),
        ("arc_easy", "arc/arc_easy.yaml"),
        ("hellaswag", "hellaswag/hellaswag.yaml"),
    ],
)
def test_templates_and_metrics_match_lm_eval(name, reference):
    from lm_eval.tasks._yaml_loader import load_yaml

    ours, theirs = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=False), lm_eval_yaml(reference)
    for key in ("task", "output_type", "doc_to_text", "metric_list"):
        assert ours[key] == theirs[key], key


def test_prompts_match_lm_eval(tasks):
    lambada, piqa, arc = tasks["lambada_openai"], tasks["piqa"], tasks["arc_challenge"]
    doc = lambada.eval_docs[0]
    assert lambada.doc_to_text(doc) + lambada.doc_to_target(doc) == doc["text"]
    assert lambada.doc_to_target(doc) == " signs"
    doc = piqa.eval_docs[0]
    assert piqa.doc_to_text(doc) == f"Question: {doc['goal']}\nAnswer:"
    assert piqa.doc_to_choice(doc) == [doc["sol1"], doc["sol2"]] and piqa.doc_to_target(doc) == doc["label"]
    doc = arc.eval_docs[0]
    assert arc.doc_to_text(doc) == f"Question: {doc['question']}\nAnswer:"
    assert arc.doc_to_choice(doc) == doc["choices"] and arc.doc_to_target(doc) == doc["gold"] == 2


def test_hellaswag_docs_match_lm_eval(data_root, tasks):
    import datasets

    raw = read_jsonl(data_path(OFFLINE_TASKS["hellaswag"][0], str(data_root)))[:500]
    theirs = lm_eval_module("hellaswag/utils.py").process_docs(datasets.Dataset.from_list(raw))
    for doc, ref in zip(map(hellaswag_doc, raw), theirs, strict=True):
        assert (doc["query"], doc["choices"], doc["gold"]) == (ref["query"], ref["choices"], ref["gold"])
    task = tasks["hellaswag"]
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert task.doc_to_target(doc) == 3 and len(task.doc_to_choice(doc)) == 4


def test_winogrande_functions_match_lm_eval(data_root):
    ref = lm_eval_module("winogrande/preprocess_winogrande.py")
    for doc in read_jsonl(data_path(OFFLINE_TASKS["winogrande"][0], str(data_root))):
        assert winogrande_text(doc) == ref.doc_to_text(doc)
        assert winogrande_target(doc) == ref.doc_to_target(doc)
        assert winogrande_choices(doc) == ref.doc_to_choice(doc)


def test_one_scored_example_per_task(llama, data_root):
    model, tokenizer = llama
    spec = EvalSpec(tasks=NAMES, limit=1, batch_size=8, data_root=str(data_root))
    metrics = Evaluator(model, tokenizer, spec).run()
    by_key = {(m.task, m.metric): m for m in metrics}
    expected = {(n, "acc") for n in NAMES} | {(n, "acc_norm") for n in ("piqa", "hellaswag", "arc_easy")}
    expected |= {("arc_challenge", "acc_norm"), ("lambada_openai", "perplexity")}
    assert set(by_key) == expected
    for (_, metric), value in by_key.items():
        assert value.n_examples == 1
        assert value.value in (0.0, 1.0) if metric != "perplexity" else value.value > 1.0


def _plain_lm_eval(model, tokenizer, names, data_root, limit):
    """A fresh lm-eval evaluation, as its CLI would run it (new HFLM, new tasks, lm-eval's stderr)."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    results = evaluate(
        lm, task_manager(names, data_root).load(list(names)), limit=limit, bootstrap_iters=1000
    )
    return {
        (name, metric.split(",")[0]): (value, results["results"][name].get(metric.replace(",", "_stderr,")))
        for name in names
        for metric, value in results["results"][name].items()
        if metric.split(",")[0] in ("acc", "acc_norm", "perplexity")
    }


def test_cached_suite_matches_plain_lm_eval_across_weight_changes(tiny_model_dir, data_root):
    from kernels import QuantSpec
    from pipeline.models import quantize_model_, restore_weights_, snapshot_weights

    model, tokenizer = load_model(ModelRef(str(tiny_model_dir)), "cpu")
    names, limit = ("lambada_openai", "piqa", "winogrande", "hellaswag"), 5
    suite = LmEvalSuite(model, tokenizer, names, data_root=data_root, limit=limit, batch_size=4)
    snapshot = snapshot_weights(model)
    for quant in (None, QuantSpec(dtype="int", bits=3, block_size=64)):
        restore_weights_(model, snapshot)
        quantize_model_(model, Recipe.of(quant))
        ours = {(m.task, m.metric): m for m in suite.run()}
        plain = _plain_lm_eval(model, tokenizer, names, data_root, limit)
        assert ours.keys() == plain.keys()
        for key, (value, stderr) in plain.items():
            assert ours[key].value == pytest.approx(value, rel=1e-9), key
            if key[1] != "perplexity":  # lm-eval bootstraps perplexity's stderr; ours is the delta method
                assert ours[key].stderr == pytest.approx(stderr, rel=1e-9), key
            assert ours[key].n_examples == limit


def test_fast_scorer_gives_lm_eval_accuracies(llama, data_root):
    model, tokenizer = llama
    names, limit = ("lambada_openai", "hellaswag", "winogrande", "arc_challenge"), 6
    runs = {}
    for scorer in ("hflm", "fast"):
        suite = LmEvalSuite(
            model, tokenizer, names, data_root=data_root, limit=limit, batch_size=4, scorer=scorer
        )
        runs[scorer] = {(m.task, m.metric): m for m in suite.run()}
    assert runs["fast"].keys() == runs["hflm"].keys()
    for key, ref in runs["hflm"].items():
        tolerance = 1e-5 if key[1] == "perplexity" else 0  # summed log-probs agree to float rounding
        assert runs["fast"][key].value == pytest.approx(ref.value, rel=tolerance, abs=0), key


def test_eval_spec_scorer_picks_the_scorer(llama, data_root):
    from pipeline.evals.evaluate import Evaluator
    from pipeline.evals.fastscore import FastScorer
    from pipeline.specs import EvalSpec

    model, tokenizer = llama
    spec = EvalSpec(tasks=("piqa",), limit=2, batch_size=2, data_root=str(data_root), scorer="fast")
    assert isinstance(Evaluator(model, tokenizer, spec).suite.lm, FastScorer)
    assert not isinstance(Evaluator(model, tokenizer, spec, scorer="hflm").suite.lm, FastScorer)


def test_fast_scorer_loglikelihoods_match_hflm(llama, tasks):
    from pipeline.evals.fastscore import FastScorer
    from pipeline.evals.lmeval import make_lm

    model, tokenizer = llama
    requests = []
    for name in ("hellaswag", "arc_challenge", "lambada_openai"):
        tasks[name].build_all_requests(limit=3, rank=0, world_size=1)
        requests += tasks[name].instances
    fast = FastScorer(model, tokenizer, batch_size=2).loglikelihood(requests)
    hflm = make_lm(model, tokenizer, 2).loglikelihood(requests)
    for (lp_fast, greedy_fast), (lp_hf, greedy_hf) in zip(fast, hflm, strict=True):
        assert lp_fast == pytest.approx(lp_hf, rel=1e-5) and greedy_fast == greedy_hf


def test_unknown_scorer(llama, data_root):
    with pytest.raises(ValueError, match=r"unknown eval\.scorer 'slow'"):
        LmEvalSuite(*llama, ("piqa",), data_root=data_root, limit=1, batch_size=1, scorer="slow")


@pytest.mark.parametrize("seed", range(5))
def test_length_batches_cover_every_row_once_with_bounded_padding(seed):
    import random

    from pipeline.evals.fastscore import length_batches

    rng = random.Random(seed)
    lengths = sorted((rng.choice([1, 2, 5, 30, 300]) + rng.randrange(20) for _ in range(500)), reverse=True)
    batches = length_batches(lengths, batch_size=64, max_padding=0.25, free_padding=8)
    assert [i for batch in batches for i in batch] == list(range(len(lengths)))
    for batch in batches:
        area = lengths[batch[0]] * len(batch)
        assert 1 <= len(batch) <= 64
        assert area - sum(lengths[i] for i in batch) <= max(0.25 * area, 8 * 64)
    assert len(batches) < len(lengths) / 4  # rows of similar length still share a batch
    with pytest.raises(ValueError, match="longest first"):
        length_batches([1, 2], batch_size=4)
