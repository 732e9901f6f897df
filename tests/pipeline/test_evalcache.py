"""`pipeline.evals.evalcache`: an Evaluator's model-independent build, kept on disk and never stale."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.evals import evalcache
from pipeline.evals.evaluate import Evaluator
from pipeline.evals.lmeval import LmEvalSuite
from pipeline.models import load_model
from pipeline.specs import EvalSpec, ModelRef, PerplexitySpec
from tests.pipeline.test_user_tasks import COPA_DOCS, write_task

NAMES = ("lambada_openai", "piqa")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty $KBIT_CACHE for the test."""
    monkeypatch.setenv("KBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / evalcache.CACHE_DIR


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return load_model(ModelRef(str(tiny_model_dir)), "cpu")


def fast_suite(model, tokenizer, data_root, names=NAMES, include_path=(), limit=4) -> LmEvalSuite:
    return LmEvalSuite(
        model, tokenizer, names, data_root=data_root, limit=limit, batch_size=4, scorer="fast",
        include_path=include_path, cache=True,
    )  # fmt: skip


def test_a_cached_suite_loads_no_task_and_scores_the_same(llama, data_root, cache):
    model, tokenizer = llama
    built = fast_suite(model, tokenizer, data_root)
    assert not built.cache_hit and len(list(cache.glob("*.pkl"))) == 1
    loaded = fast_suite(model, tokenizer, data_root)
    assert loaded.cache_hit and loaded._task_dict is None  # no lm-eval task was loaded
    assert loaded.pairs == built.pairs
    assert loaded.run() == built.run()
    loaded.plan = None  # lm-eval's own path still works: the tasks load on demand
    assert {(m.task, m.metric, m.value) for m in loaded.run()} == {
        (m.task, m.metric, m.value) for m in built.run()
    }


def test_a_changed_task_definition_or_data_file_is_a_miss(llama, data_root, cache, tmp_path):
    model, tokenizer = llama
    folder = write_task(tmp_path / "tasks")
    first = fast_suite(model, tokenizer, data_root, ("my_copa",), (str(folder),), limit=3)
    assert not first.cache_hit
    assert fast_suite(model, tokenizer, data_root, ("my_copa",), (str(folder),), limit=3).cache_hit
    write_task(folder, prompt="What came of it?")  # the YAML's prompt changed
    reworded = fast_suite(model, tokenizer, data_root, ("my_copa",), (str(folder),), limit=3)
    assert not reworded.cache_hit and reworded.pairs != first.pairs
    write_task(folder, prompt="What came of it?", docs=COPA_DOCS[::-1])  # the documents changed
    reordered = fast_suite(model, tokenizer, data_root, ("my_copa",), (str(folder),), limit=3)
    assert not reordered.cache_hit and reordered.pairs != reworded.pairs
    assert not fast_suite(model, tokenizer, data_root, ("my_copa",), (str(folder),), limit=2).cache_hit


def test_a_changed_tokenizer_is_a_miss(tiny_model_dir, data_root, cache):
    model, tokenizer = load_model(ModelRef(str(tiny_model_dir)), "cpu")
    before = evalcache.tokenizer_fingerprint(tokenizer)
    assert fast_suite(model, tokenizer, data_root, ("piqa",)).cache_hit is False
    assert fast_suite(model, tokenizer, data_root, ("piqa",)).cache_hit is True
    tokenizer.add_tokens(["the cat"])  # a new token: the same text now encodes differently
    assert evalcache.tokenizer_fingerprint(tokenizer) != before
    assert fast_suite(model, tokenizer, data_root, ("piqa",)).cache_hit is False


def test_text_keys_follow_text_tokenizer_and_length(llama):
    _, tokenizer = llama
    key = evalcache.text_key("some text", tokenizer, None)
    assert key == evalcache.text_key("some text", tokenizer, None)
    assert key != evalcache.text_key("some text.", tokenizer, None)
    assert key != evalcache.text_key("some text", tokenizer, 128)


def test_unreadable_entries_are_misses_and_rebuilt(llama, data_root, cache):
    model, tokenizer = llama
    fast_suite(model, tokenizer, data_root, ("piqa",))
    (entry,) = cache.glob("*.pkl")
    entry.write_bytes(b"cut short")
    rebuilt = fast_suite(model, tokenizer, data_root, ("piqa",))
    assert not rebuilt.cache_hit
    assert fast_suite(model, tokenizer, data_root, ("piqa",)).cache_hit


def test_the_evaluator_uses_the_cache_for_texts_and_tasks(llama, data_root, cache):
    model, tokenizer = llama
    text = PerplexitySpec("wikitext2", "eval/wikitext-2-raw/wiki.test.raw", 128, 128, 1024, kl_tokens=64)
    spec = EvalSpec(perplexity=(text,), tasks=("piqa",), limit=3, batch_size=4, data_root=str(data_root))
    spec = replace(spec, scorer="fast")
    cold = Evaluator(model, tokenizer, spec)
    warm = Evaluator(model, tokenizer, spec)
    assert cold.cache_hits == {"wikitext2": False, "tasks": False}
    assert warm.cache_hits == {"wikitext2": True, "tasks": True}
    assert set(warm.phases) == {"compile_s", "texts_s", "kl_s", "tasks_s"}
    assert warm.run() == cold.run()


def test_templates_compiled_once_render_the_same():
    import lm_eval.utils

    from pipeline.evals.lmeval import compile_templates_once

    compile_templates_once()
    compile_templates_once()  # idempotent: one wrapper, not two
    assert lm_eval.utils.apply_template.compiles_once
    template = "{{query}} {{choices[gold] | regex_replace('a', 'b')}}\n"
    doc = {"query": "Q: a cat?", "choices": ["a bat", "a mat"], "gold": 1}
    want = lm_eval.utils.env.from_string(template).render(**doc)
    assert lm_eval.utils.apply_template(template, doc) == want == "Q: a cat? b mbt\n"
    with pytest.raises(Exception, match="undefined"):  # StrictUndefined still applies
        lm_eval.utils.apply_template("{{missing}}", doc)
