"""`pipeline.evals.fastmetrics` gives exactly lm-eval's metric values, on a real model and offline data."""

from __future__ import annotations

import math

import pytest

from pipeline.evals.lmeval import LmEvalSuite
from pipeline.models import load_model
from pipeline.specs import ModelRef

NAMES = ("lambada_openai", "piqa", "hellaswag", "winogrande")


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return load_model(ModelRef(str(tiny_model_dir)), "cpu")


@pytest.mark.parametrize("scorer", ["hflm", "fast"])
def test_numpy_metrics_equal_lm_eval_metrics(llama, data_root, scorer):
    """Same scorer, both metrics paths: every MetricValue (value, stderr, n_examples) is equal, not close."""
    model, tokenizer = llama
    suite = LmEvalSuite(
        model, tokenizer, NAMES, data_root=data_root, limit=20, batch_size=8, scorer=scorer, metrics="numpy"
    )
    assert suite.plan is not None
    runs = {"numpy": suite.run()}
    suite.plan = None  # the same suite, scored through lm-eval's evaluate
    runs["lm_eval"] = suite.run()
    assert runs["numpy"] == runs["lm_eval"]
    assert {(m.task, m.metric) for m in runs["numpy"]} == {
        *((name, "acc") for name in NAMES),
        ("lambada_openai", "perplexity"),
        ("piqa", "acc_norm"),
        ("hellaswag", "acc_norm"),
    }
    assert all(m.n_examples == 20 and m.stderr is not None for m in runs["numpy"])
    for m in runs["numpy"]:  # units: each document's value, in document order (equal on both paths)
        assert m.unit_counts == (1.0,) * 20
        if m.metric == "perplexity":  # per-document NLL
            assert m.value == pytest.approx(math.exp(sum(m.unit_sums) / 20), rel=1e-12)
        else:
            assert set(m.unit_sums) <= {0.0, 1.0} and m.value == pytest.approx(sum(m.unit_sums) / 20)


def test_metrics_path_defaults_and_fallback(llama, data_root):
    """hflm keeps lm-eval's evaluate; fast uses numpy metrics; a task it cannot plan falls back."""
    from pipeline.evals.fastmetrics import plan_suite

    model, tokenizer = llama
    hflm = LmEvalSuite(model, tokenizer, ("piqa",), data_root=data_root, limit=2, batch_size=2)
    fast = LmEvalSuite(model, tokenizer, ("piqa",), data_root=data_root, limit=2, batch_size=2, scorer="fast")
    assert hflm.plan is None and fast.plan is not None
    task = fast.task_dict["tasks"]["piqa"]
    task._metric_fn_list = {**task._metric_fn_list, "brier_score": None}
    assert plan_suite(fast.task_dict["tasks"], 2) is None
    with pytest.raises(ValueError, match="metrics 'pandas' unknown"):
        LmEvalSuite(model, tokenizer, ("piqa",), data_root=data_root, limit=1, batch_size=1, metrics="pandas")
