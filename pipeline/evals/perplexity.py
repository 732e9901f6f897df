"""Strided-window perplexity of a text, tokenized once and scored many times.

Windows follow the Hugging Face perplexity guide: a window of `context_length` tokens starts every
`stride` tokens, and only the tokens not scored by an earlier window count (a window's first token
has no context inside it, so it is never scored). With `stride == context_length` the windows are
disjoint and each window's first token goes unscored; with a smaller stride every token after the
first is scored once, with at least `context_length - stride` tokens of context.

bits/byte = total nats / ln 2 / UTF-8 bytes of the tokenized text (the `max_tokens` slice when one
is set), which compares across tokenizers. If the tokenizer has a BOS token, it is prepended
(0 bytes), so the text's first token is scored too.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.specs import MetricValue, PerplexitySpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go in; the last `n_scored` of them are scored."""

    begin: int
    end: int
    n_scored: int


@dataclass(frozen=True)
class WindowBatch:
    """Windows of equal length and equal scored count, stacked: `input_ids` is [batch, length]."""

    input_ids: Tensor
    n_scored: int


@dataclass(frozen=True)
class TokenizedText:
    """A perplexity set ready to score: its window batches (on the model's device) and byte count."""

    spec: PerplexitySpec
    batches: tuple[WindowBatch, ...]
    n_scored: int
    n_bytes: int


def check_perplexity_spec(spec: PerplexitySpec) -> None:
    """Context length >= 2, 1 <= stride <= context length, max_tokens >= 2 when set."""
    if spec.context_length < 2:
        raise ValueError(f"perplexity {spec.name!r}: context_length must be >= 2, got {spec.context_length}")
    if not 1 <= spec.stride <= spec.context_length:
        raise ValueError(
            f"perplexity {spec.name!r}: stride must be in [1, context_length={spec.context_length}], "
            f"got {spec.stride}"
        )
    if spec.max_tokens is not None and spec.max_tokens < 2:
        raise ValueError(f"perplexity {spec.name!r}: max_tokens must be >= 2 or None, got {spec.max_tokens}")


def strided_windows(n_tokens: int, context_length: int, stride: int) -> list[Window]:
    """The windows over `n_tokens` tokens; each token after the first is scored at most once."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context_length, n_tokens)
        n_scored = end - max(prev_end, begin + 1)
        if n_scored > 0:
            windows.append(Window(begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def encode_text(
    text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int | None
) -> tuple[list[int], int]:
    """(token ids with BOS first when the tokenizer has one, UTF-8 bytes of the text they cover)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        text = str(tokenizer.decode(ids, clean_up_tokenization_spaces=False))
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids), len(text.encode("utf-8"))


def batch_windows(ids: Tensor, windows: list[Window], batch_size: int) -> tuple[WindowBatch, ...]:
    """Stack consecutive windows of the same (length, n_scored) into batches of at most batch_size."""
    batches: list[WindowBatch] = []
    group: list[Window] = []
    for window in [*windows, None]:
        key = None if window is None else (window.end - window.begin, window.n_scored)
        if group and (key != (group[0].end - group[0].begin, group[0].n_scored) or len(group) == batch_size):
            batches.append(WindowBatch(torch.stack([ids[w.begin : w.end] for w in group]), group[0].n_scored))
            group = []
        if window is not None:
            group.append(window)
    return tuple(batches)


def tokenize_text(
    spec: PerplexitySpec, text: str, tokenizer: PreTrainedTokenizerBase, batch_size: int, device: torch.device
) -> TokenizedText:
    """Tokenize a text once and cut it into window batches on `device`."""
    check_perplexity_spec(spec)
    ids, n_bytes = encode_text(text, tokenizer, spec.max_tokens)
    if len(ids) < 2:
        raise ValueError(f"perplexity {spec.name!r}: the text has fewer than 2 tokens")
    windows = strided_windows(len(ids), spec.context_length, spec.stride)
    tensor = torch.tensor(ids, dtype=torch.long, device=device)
    batches = batch_windows(tensor, windows, batch_size)
    n_scored = sum(w.n_scored for w in windows)
    log.info("perplexity %s: %d tokens, %d windows, %d scored", spec.name, len(ids), len(windows), n_scored)
    return TokenizedText(spec, batches, n_scored, n_bytes)


def accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    """Whether the model's forward can skip the LM head at unscored positions."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def total_nats(model: PreTrainedModel, batches: tuple[WindowBatch, ...]) -> float:
    """Sum of the negative log-likelihoods (nats) of every scored token, logits only where scored."""
    keep = accepts_logits_to_keep(model)
    total = torch.zeros((), dtype=torch.float64, device=model.device)
    for batch in batches:
        n = batch.n_scored
        kwargs = {"logits_to_keep": n + 1} if keep else {}
        logits = model(input_ids=batch.input_ids, use_cache=False, **kwargs).logits
        logits = logits[:, -(n + 1) : -1].float()  # position j predicts token j + 1
        targets = batch.input_ids[:, -n:]
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").double()
    return float(total.item())


def perplexity_metrics(model: PreTrainedModel, text: TokenizedText) -> list[MetricValue]:
    """nats/token, perplexity and bits/byte of a tokenized text under the model as it is now."""
    nats = total_nats(model, text.batches)
    per_token = nats / text.n_scored
    name, n = text.spec.name, text.n_scored
    return [
        MetricValue(name, "nats_per_token", per_token, n_examples=n),
        MetricValue(name, "perplexity", math.exp(per_token), n_examples=n),
        MetricValue(name, "bits_per_byte", nats / math.log(2) / text.n_bytes, n_examples=n),
    ]
