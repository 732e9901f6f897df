"""LAMBADA's greedy-match path end to end, with a model that gets some continuations right.

A tiny Llama is trained for a few seconds on short sentences whose last word follows from the rest
(it memorizes them); the LAMBADA file of a temporary data root holds those sentences and others whose
last word it has never seen. Both scorers must then find exactly the documents whose last word greedy
decoding reproduces, computed here token by token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.evals.evaluate import Evaluator
from pipeline.specs import EvalSpec

SUBJECTS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
OBJECTS = ("apples", "bread", "cheese", "dates", "eggs", "figs", "grapes", "honey")
LEARNED = [f"{s} always eats fresh {o}" for s, o in zip(SUBJECTS, OBJECTS, strict=True)]
UNSEEN = [
    f"{s} always eats fresh {o}"
    for s, o in zip(SUBJECTS[:4], ("kiwis", "lemons", "mangos", "nuts"), strict=True)
]


@pytest.fixture(scope="module")
def lambada_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lambada-root")
    path = root / "eval" / "lambada_openai" / "test.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in LEARNED + UNSEEN))
    return root


@pytest.fixture(scope="module")
def trained(tiny_tokenizer):
    """A 2-layer Llama that has memorized LEARNED (full-batch AdamW until the loss is ~0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    encoded = [tiny_tokenizer(text, add_special_tokens=False)["input_ids"] for text in LEARNED]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [0] * (width - len(e)) for e in encoded])
    labels = torch.tensor([e + [-100] * (width - len(e)) for e in encoded])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 0.01:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tiny_tokenizer


@torch.no_grad()
def greedy_matches(model, tokenizer, texts: list[str]) -> list[float]:
    """1.0 where greedy decoding after the context reproduces the last word's tokens, computed plainly."""
    out = []
    for text in texts:
        context, word = text.rsplit(" ", 1)
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        target = tokenizer(context + " " + word, add_special_tokens=False)["input_ids"][len(ids) :]
        decoded = list(ids)
        for _ in target:
            decoded.append(int(model(input_ids=torch.tensor([decoded])).logits[0, -1].argmax()))
        out.append(1.0 if decoded[len(ids) :] == target else 0.0)
    return out


@pytest.mark.parametrize("scorer", ["hflm", "fast"])
def test_lambada_accuracy_is_greedy_decoding_of_the_last_word(trained, lambada_root, scorer):
    model, tokenizer = trained
    spec = EvalSpec(tasks=("lambada_openai",), batch_size=4, data_root=str(lambada_root), scorer=scorer)
    metrics = {m.metric: m for m in Evaluator(model, tokenizer, spec).run()}
    want = greedy_matches(model, tokenizer, LEARNED + UNSEEN)
    assert (
        sum(want[: len(LEARNED)]) >= 6 and sum(want[len(LEARNED) :]) == 0
    )  # the model learned; it can't guess
    acc = metrics["acc"]
    assert acc.unit_sums == tuple(want) and acc.unit_counts == (1.0,) * len(want)
    assert acc.value == pytest.approx(sum(want) / len(want)) and acc.n_examples == len(want)
    nll = metrics["perplexity"].unit_sums  # per-document NLL of the last word
    assert metrics["perplexity"].value == pytest.approx(math.exp(sum(nll) / len(nll)))
    assert all(0 < x < 1 for x, right in zip(nll, want, strict=True) if right)
