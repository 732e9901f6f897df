"""`eval.scorer=auto`, the default: the fast scorer where the architecture packs, HFLM otherwise, and the
rows' `scorer` column names the scorer actually used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pipeline.config import EvalConfig
from pipeline.evals import fastscore
from pipeline.evals.evaluate import Evaluator, check_eval_spec, resolve_scorer, scorer_problems
from pipeline.jobrows import eval_columns
from pipeline.models import load_model
from pipeline.specs import EvalSpec, MetricValue, ModelRef

CONF_EVAL = Path(__file__).resolve().parents[2] / "conf" / "eval"


def test_auto_is_the_default_of_the_config_and_the_spec():
    assert EvalConfig().scorer == "auto" and EvalSpec().scorer == "auto"


def test_every_eval_preset_scores_with_auto_or_states_fast():
    settings = {p.stem: (yaml.safe_load(p.read_text()) or {}).get("scorer") for p in CONF_EVAL.glob("*.yaml")}
    assert settings and all(s in (None, "auto", "fast") for s in settings.values()), settings


@pytest.mark.parametrize(
    ("setting", "model_type", "want"),
    [
        ("auto", "llama", "fast"),
        ("auto", "gpt_neox", "fast"),
        ("auto", None, "fast"),  # unknown: the probe decides on the worker
        ("auto", "bloom", "hflm"),
        ("hflm", "llama", "hflm"),
        ("fast", "bloom", "fast"),  # explicit: pre-flight refuses it, not resolved away
    ],
)
def test_resolve_scorer(setting, model_type, want):
    assert resolve_scorer(setting, model_type) == want


def test_preflight_accepts_auto_for_every_architecture(data_root):
    check_eval_spec(EvalSpec(tasks=("piqa",), scorer="auto", data_root=str(data_root)))
    assert scorer_problems("auto", True, "bigscience/bloom-560m", "bloom") == []
    assert scorer_problems("fast", True, "bigscience/bloom-560m", "bloom")  # still refused when asked for
    with pytest.raises(ValueError, match=r"eval\.scorer"):
        check_eval_spec(EvalSpec(scorer="quick", data_root=str(data_root)))


def test_rows_record_the_scorer_used_not_the_setting():
    spec = EvalSpec(tasks=("piqa",), scorer="auto")
    assert eval_columns(spec, "piqa", "fast")["scorer"] == "fast"
    assert eval_columns(spec, "piqa")["scorer"] == "auto"  # no Evaluator (a failed job): the setting


def _piqa(data_root: Path) -> EvalSpec:
    return EvalSpec(perplexity=(), tasks=("piqa",), limit=3, batch_size=4, data_root=str(data_root))


def test_auto_scores_a_packable_model_with_the_fast_scorer(tiny_model_dir, data_root):
    model, tokenizer = load_model(ModelRef(str(tiny_model_dir)), "cpu")
    evaluator = Evaluator(model, tokenizer, _piqa(data_root))
    assert evaluator.scorer == "fast"
    metrics = evaluator.run()
    assert metrics and all(isinstance(m, MetricValue) and m.task == "piqa" for m in metrics)


def test_auto_falls_back_to_hflm_when_the_probe_refuses_packing(tiny_neox_dir, data_root, monkeypatch):
    model, tokenizer = load_model(ModelRef(str(tiny_neox_dir)), "cpu")
    causal_only = fastscore.attention_bias  # a model that ignores the segments, as in test_fastscore

    monkeypatch.setattr(fastscore, "attention_bias", lambda seg, dtype: causal_only(seg.clamp(max=0), dtype))
    evaluator = Evaluator(model, tokenizer, _piqa(data_root))
    assert evaluator.scorer == "hflm"
    assert {m.task for m in evaluator.run()} == {"piqa"}
    with pytest.raises(fastscore.PackingRefused):  # asked for by name: refused, never replaced
        Evaluator(model, tokenizer, _piqa(data_root), scorer="fast")


def test_workers_share_one_inductor_cache_under_kbit_cache(tmp_path, monkeypatch):
    from pipeline.worker import INDUCTOR_CACHE_ENV, ModelWorker, use_compile_cache

    monkeypatch.setenv("KBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(INDUCTOR_CACHE_ENV, raising=False)
    ModelWorker(str(tmp_path / "results"))
    assert Path(os.environ[INDUCTOR_CACHE_ENV]) == tmp_path / "cache" / "inductor"
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "mine"))  # the user's own setting is kept
    assert use_compile_cache() == tmp_path / "mine"
