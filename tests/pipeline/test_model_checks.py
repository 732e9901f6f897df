"""Pre-flight refuses what is not a loadable causal LM, before anything runs (real tiny models on disk)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.models import check_model_ref
from pipeline.run import main, plan_run
from pipeline.specs import ModelRef
from pipeline.sweep import ConfigError


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 1-layer BERT masked LM (bidirectional attention)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    path = tmp_path_factory.mktemp("bert")
    BertForMaskedLM(config).save_pretrained(path)
    return path


def _t5_dir(path: Path) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(config).save_pretrained(path)
    return path


def test_a_causal_llama_passes(tiny_model_dir: Path):
    check_model_ref(ModelRef(str(tiny_model_dir)))


def test_bert_and_t5_are_refused_as_not_causal(bert_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"is not a causal LM \(architectures \['BertForMaskedLM'\]"):
        check_model_ref(ModelRef(str(bert_dir)))
    with pytest.raises(ValueError, match=r"is not a causal LM .*encoder-decoder"):
        check_model_ref(ModelRef(str(_t5_dir(tmp_path / "t5"))))


def test_bert_as_a_decoder_is_causal(tmp_path: Path):
    from transformers import BertConfig, BertLMHeadModel

    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertLMHeadModel(config).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match="attends both ways unless its config sets is_decoder=true"):
        check_model_ref(ModelRef(str(tmp_path / "encoder")))
    config.is_decoder = True
    BertLMHeadModel(config).save_pretrained(tmp_path / "decoder")
    check_model_ref(ModelRef(str(tmp_path / "decoder")))


def test_a_folder_without_weights_or_config_is_refused(tiny_model_dir: Path, tmp_path: Path):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights)
    with pytest.raises(ValueError, match="has a config but no weights"):
        check_model_ref(ModelRef(str(no_weights)))
    with pytest.raises(ValueError, match=r"has no config\.json"):
        check_model_ref(ModelRef(str(tmp_path)))


def test_a_missing_hub_looking_path_is_refused_offline_with_both_readings(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        check_model_ref(ModelRef("models/my-model"))
    text = str(err.value)
    assert f"no local directory {str(tmp_path / 'models/my-model')!r}" in text
    assert "not in the hub cache" in text and "HF_HUB_OFFLINE=1" in text


def test_preflight_gives_one_short_line_per_bad_model(bert_dir: Path, tmp_path: Path, capsys):
    argv = ["-m", f"model.name_or_path={bert_dir},{tmp_path}", f"results_root={tmp_path / 'r'}"]
    assert main([*argv, "quant.bits=4,5"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  - ")]
    assert len(lines) == 2, lines
    assert "is not a causal LM" in lines[0] and "has no config.json" in lines[1]
    assert not (tmp_path / "r").exists()


def test_a_hub_id_in_the_hub_cache_passes_offline(monkeypatch, tmp_path: Path, tiny_model_dir: Path):
    from tests.pipeline.hub_cache import cache_model

    cache_model(tmp_path / "hub", "org/tiny", tiny_model_dir, "a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    check_model_ref(ModelRef("org/tiny"))
    with pytest.raises(ConfigError, match=r"org/other.*not in the hub cache"):
        plan_run(["model.name_or_path=org/other", f"results_root={tmp_path / 'r'}", "dry_run=true"])
