"""Shared fixtures for the pipeline tests: tiny random-weight models saved like real checkpoints.

`tiny_model_dir` is a 2-layer Llama (hidden 64) with a byte-level BPE trained on a slice of the
corpus, saved with `save_pretrained` next to its tokenizer, so `AutoModelForCausalLM` and
`AutoTokenizer` load it like any local model. `tiny_neox_dir` is the same for GPT-NeoX (Pythia's
architecture). Both are built once per test session from fixed seeds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_VOCAB = 512
TINY_CORPUS_CHARS = 200_000


@pytest.fixture(scope="session")
def tiny_tokenizer(data_root: Path):
    """A small deterministic BPE trained on the first characters of the corpus' training split."""
    from pipeline.ladders.corpus import split_corpus
    from pipeline.ladders.tokenizer import train_tokenizer

    train_text, _ = split_corpus(data_root)
    return train_tokenizer([train_text[:TINY_CORPUS_CHARS]], TINY_VOCAB)


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A saved 2-layer Llama (hidden 64, 4 heads, random seeded weights) with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    return _save(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_neox_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A saved 2-layer GPT-NeoX (Pythia's architecture; hidden 64, random seeded weights)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).eval()
    return _save(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny-neox"))
