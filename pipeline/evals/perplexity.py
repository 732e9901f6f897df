"""Strided-window perplexity of a text, tokenized once and scored many times.

Windows follow the Hugging Face perplexity guide: a window of `context_length` tokens starts every
`stride` tokens, and only the tokens not scored by an earlier window count (a window's first token
has no context inside it, so it is never scored). With `stride == context_length` the windows are
disjoint and each window's first token goes unscored; with a smaller stride every token after the
first is scored once, with at least `context_length - stride` tokens of context.

bits/byte = total nats / ln 2 / UTF-8 bytes of the tokenized text (the `max_tokens` slice when one
is set), which compares across tokenizers. If the tokenizer has a BOS token, it is prepended
(0 bytes), so the text's first token is scored too.

The nats/token and perplexity rows carry per-chunk NLL sums and token counts over
`units.TEXT_CHUNKS` chunks of the scored tokens in text order (`pipeline.evals.units`). With
`kl_tokens` set, `kl_to_16bit` is the mean per-token KL(p16 || pq) over the first `kl_tokens` scored
tokens, against the logits the model gave there when `kl_reference` was taken (the pristine weights:
the worker builds its `Evaluator` before any quantization). Exact, not top-k: the reference holds
kl_tokens x vocab logits in the model's dtype (2 bytes each in bf16; `KL_MAX_BYTES` at most); a job
computes the same logits in the same forward as its NLL, so the unquantized model's KL is exactly 0.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.evals.units import TEXT_CHUNKS, chunk_counts, chunk_of_items
from pipeline.specs import MetricValue, PerplexitySpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

KL_MAX_BYTES = 8 << 30  # a KL reference (kl_tokens x vocab logits) larger than this is refused
KL_ROW_ELEMENTS = 1 << 25  # logits per step of the KL computation (float64 temporaries of 256 MB)


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
    offset: int = 0  # text-order index of the batch's first scored token (batches follow the text)


@dataclass(frozen=True)
class Partition:
    """Contiguous chunks of scored tokens: the chunk of each token (on the device) and tokens per chunk."""

    chunk_of: Tensor  # [tokens] int64
    counts: tuple[float, ...]

    @classmethod
    def of(cls, n: int, device: torch.device, k: int = TEXT_CHUNKS) -> Partition:
        """`units.chunk_bounds(n, k)` as a Partition on `device`."""
        return cls(torch.from_numpy(chunk_of_items(n, k)).to(device), chunk_counts(n, k))


@dataclass(frozen=True)
class TokenizedText:
    """A perplexity set ready to score: its window batches (on the model's device) and byte count."""

    spec: PerplexitySpec
    batches: tuple[WindowBatch, ...]
    n_scored: int
    n_bytes: int
    chunks: Partition  # of the n_scored tokens: the units of the NLL rows
    kl_chunks: Partition | None = None  # of the first kl_tokens scored tokens; None: no KL


@dataclass(frozen=True)
class TextScore:
    """One pass over a text: summed NLL per chunk and, with a reference, summed KL per KL chunk."""

    nats: tuple[float, ...]
    kl: tuple[float, ...] | None


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
    if spec.kl_tokens is not None and spec.kl_tokens < 1:
        raise ValueError(f"perplexity {spec.name!r}: kl_tokens must be >= 1 or None, got {spec.kl_tokens}")


def perplexity_text(path: str, data_root: Path) -> str:
    """The text a perplexity set scores: `corpus:heldout`, a text file, `file.jsonl:field`,
    `file.parquet:column` or `saved_dataset_folder:column` (`pipeline.textsources`), documents joined
    by `DOC_SEPARATOR`."""
    from pipeline.textsources import DOC_SEPARATOR, source_texts

    return DOC_SEPARATOR.join(source_texts(path, data_root, "perplexity"))


def text_problems(path: str, data_root: Path) -> list[str]:
    """Pre-flight problems of a perplexity text, from its first rows (`textsources.check_source`)."""
    from pipeline.textsources import check_source

    return check_source(path, data_root, "perplexity")


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
    offset = 0
    for window in [*windows, None]:
        key = None if window is None else (window.end - window.begin, window.n_scored)
        if group and (key != (group[0].end - group[0].begin, group[0].n_scored) or len(group) == batch_size):
            stacked = torch.stack([ids[w.begin : w.end] for w in group])
            batches.append(WindowBatch(stacked, group[0].n_scored, offset))
            offset += len(group) * group[0].n_scored
            group = []
        if window is not None:
            group.append(window)
    return tuple(batches)


def tokenize_text(
    spec: PerplexitySpec,
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    device: torch.device,
    encoded: tuple[list[int], int] | None = None,
) -> TokenizedText:
    """Tokenize a text once and cut it into window batches on `device`; `encoded`: what
    `encode_text(text, tokenizer, spec.max_tokens)` returns, when the caller has it already."""
    check_perplexity_spec(spec)
    ids, n_bytes = encoded if encoded is not None else encode_text(text, tokenizer, spec.max_tokens)
    if len(ids) < 2:
        raise ValueError(f"perplexity {spec.name!r}: the text has fewer than 2 tokens")
    windows = strided_windows(len(ids), spec.context_length, spec.stride)
    tensor = torch.tensor(ids, dtype=torch.long, device=device)
    batches = batch_windows(tensor, windows, batch_size)
    n_scored = sum(w.n_scored for w in windows)
    log.info("perplexity %s: %d tokens, %d windows, %d scored", spec.name, len(ids), len(windows), n_scored)
    kl_chunks = None if spec.kl_tokens is None else Partition.of(min(spec.kl_tokens, n_scored), device)
    return TokenizedText(spec, batches, n_scored, n_bytes, Partition.of(n_scored, device), kl_chunks)


def accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    """Whether the model's forward can skip the LM head at unscored positions."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def scored_logits(model: PreTrainedModel, batch: WindowBatch) -> Tensor:
    """[batch * n_scored, vocab] logits in the model's dtype, row r predicting scored token offset + r."""
    n = batch.n_scored
    kwargs = {"logits_to_keep": n + 1} if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=batch.input_ids, use_cache=False, **kwargs).logits
    return logits[:, -(n + 1) : -1].flatten(0, 1)  # position j predicts token j + 1


def kl_per_token(reference: Tensor, logits: Tensor) -> Tensor:
    """[rows] float64 KL(softmax(reference) || softmax(logits)) per row (nats), both given as logits.

    In float64 (float32 loses ~1e-6 nats a token to cancellation, 0.1% of a small KL), computed
    `KL_ROW_ELEMENTS` logits at a time, so its temporaries stay ~256 MB each.
    """
    step = max(1, KL_ROW_ELEMENTS // logits.shape[-1])
    out = []
    for start in range(0, len(logits), step):
        log_p = F.log_softmax(reference[start : start + step].double(), -1)
        log_q = F.log_softmax(logits[start : start + step].double(), -1)
        out.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(out)


def kl_reference_bytes(text: TokenizedText, vocab: int, element_size: int) -> int:
    """Device memory a text's KL reference takes (0 without KL)."""
    return 0 if text.kl_chunks is None else len(text.kl_chunks.chunk_of) * vocab * element_size


@torch.inference_mode()
def kl_reference(model: PreTrainedModel, text: TokenizedText) -> Tensor | None:
    """The model's logits (its dtype) at the first kl_tokens scored tokens, [kl_tokens, vocab]; None: no KL.

    Take it from the 16-bit model: every later `score_text` measures KL against it.
    """
    if text.kl_chunks is None:
        return None
    n = len(text.kl_chunks.chunk_of)
    size = kl_reference_bytes(text, model.get_output_embeddings().weight.shape[0], model.dtype.itemsize)
    if size > KL_MAX_BYTES:
        raise ValueError(
            f"perplexity {text.spec.name!r}: kl_tokens={text.spec.kl_tokens} keeps {size / 2**30:.1f} GiB "
            f"of 16-bit logits (allowed {KL_MAX_BYTES / 2**30:.0f} GiB); lower kl_tokens"
        )
    parts = [
        scored_logits(model, batch)[: n - batch.offset].clone()  # clone: free the batch's logits
        for batch in text.batches
        if batch.offset < n
    ]
    return torch.cat(parts)


@torch.inference_mode()
def score_text(model: PreTrainedModel, text: TokenizedText, reference: Tensor | None = None) -> TextScore:
    """Summed NLL per chunk of the text and, given the 16-bit `reference`, summed KL per KL chunk."""
    zeros = functools.partial(torch.zeros, dtype=torch.float64, device=model.device)
    nats = zeros(len(text.chunks.counts))
    kl_chunks = None if reference is None else text.kl_chunks
    kl = None if kl_chunks is None else zeros(len(kl_chunks.counts))
    for batch in text.batches:
        logits = scored_logits(model, batch)
        targets = batch.input_ids[:, -batch.n_scored :].flatten()
        nll = F.cross_entropy(logits.float(), targets, reduction="none")
        start, end = batch.offset, batch.offset + len(nll)
        nats.index_add_(0, text.chunks.chunk_of[start:end], nll.double())
        if kl is not None and kl_chunks is not None and reference is not None and start < len(reference):
            end = min(end, len(reference))
            per_token = kl_per_token(reference[start:end], logits[: end - start])
            kl.index_add_(0, kl_chunks.chunk_of[start:end], per_token)
    return TextScore(tuple(nats.tolist()), None if kl is None else tuple(kl.tolist()))


def total_nats(model: PreTrainedModel, text: TokenizedText) -> float:
    """Sum of the negative log-likelihoods (nats) of every scored token."""
    return math.fsum(score_text(model, text).nats)


def perplexity_metrics(
    model: PreTrainedModel, text: TokenizedText, reference: Tensor | None = None
) -> list[MetricValue]:
    """nats/token, perplexity and bits/byte of a tokenized text under the model as it is now (the first
    two with the per-chunk NLL as units), and `kl_to_16bit` when a reference is given."""
    score = score_text(model, text, reference)
    nats = math.fsum(score.nats)
    per_token = nats / text.n_scored
    name, n = text.spec.name, text.n_scored
    units = (score.nats, text.chunks.counts)
    metrics = [
        MetricValue(name, "nats_per_token", per_token, None, n, *units),
        MetricValue(name, "perplexity", math.exp(per_token), None, n, *units),
        MetricValue(name, "bits_per_byte", nats / math.log(2) / text.n_bytes, None, n),  # = ce x constant
    ]
    if score.kl is not None and text.kl_chunks is not None:
        n_kl = len(text.kl_chunks.chunk_of)
        kl = math.fsum(score.kl) / n_kl
        metrics.append(MetricValue(name, "kl_to_16bit", kl, None, n_kl, score.kl, text.kl_chunks.counts))
    return metrics
