"""`FastScorer`: an lm-eval `LM` that scores log-likelihood requests in large packed batches.

It answers `loglikelihood` exactly as lm-eval's HFLM defines it (the same tokenization: it encodes
through a memoized HFLM, and the same left truncation to `max_length + 1` tokens), but computes it
differently:
- requests are grouped by context, and each distinct context becomes one packed row: the context
  once, then every continuation of it (minus its last token) one after another. A 4-D attention
  mask lets each continuation see the context and itself only, and `position_ids` restart at the
  context's length for every continuation, so each one is scored as if it ran alone after the
  context; the shared context runs once, in the same forward as its continuations;
- rows are sorted by length and batched by padding and by tokens (`length_batches`): a forward
  holds up to `batch_size * 256` tokens however short the rows, so it is one large forward;
- the LM head runs only at the scored positions (the context's last one and every continuation
  position), on the decoder's hidden states, in chunks; `kernels.logprobs.token_logprobs` reads each
  chunk's logits once (a fused Triton kernel on CUDA) for the log-probabilities and the argmax;
- the layout (ids, positions, segments, gather indices) is built once per request list and kept on
  the device, so a later call with the same requests (every configuration of a study) only runs the
  forwards.
`check_packing` verifies on a probe, when the scorer is built, that the model honours the mask and
the positions and that its logits are its LM head applied to its decoder's output; an architecture
that does not (ALiBi from a 2-D mask, soft-capped logits) gets a clear error naming `scorer=hflm`.
Because it is an lm-eval `LM`, lm-eval's own `evaluate` can turn its answers into metrics.

Numerics: the forward runs in the model's dtype and the log-softmax and sums in float32. HFLM (its
default `softmax_dtype`) rounds each token's log-probability and each sum to the model's dtype, so in
bfloat16 the two differ by HFLM's rounding (up to ~5e-3 relative; docs/ARCHITECTURE.md, "Scorer
numerics"), and answers flip between them only on near ties; in float32 they agree to 1e-5.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from lm_eval.api.model import LM
from torch import Tensor

from kernels.logprobs import token_logprobs
from pipeline.evals.lmeval import make_lm

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Pair = tuple[tuple[int, ...], tuple[int, ...]]  # (context ids, continuation ids)
TOKENS_PER_ROW = 256  # a batch holds at most batch_size * TOKENS_PER_ROW tokens (padding included)
# Padding a batch may hold, as a share of its area. On an H200 forward MFU was the same with ~24k- and
# ~39k-token forwards (40%), so padding is the cost to cut: the paper suite at 500 documents packs into
# 14 forwards of 279k tokens at 0.1, against 8 of 315k at 0.25 (244k real tokens; docs/benchmarks.md).
MAX_PADDING = 0.1
LOGIT_CHUNK = 1 << 28  # logits materialized at once (positions x vocab): 0.5 GB in bf16
PAD_MULTIPLE = 8  # rows are padded to a multiple of 8 tokens (aligned attention masks, tensor cores)


@dataclass(frozen=True)
class PackedRow:
    """One context and its continuations laid out as one sequence (plain lists, built on the CPU)."""

    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0: the context; k >= 1: the k-th continuation
    scored: list[int]  # indices into `tokens` whose logits are needed, ascending
    entries: list[tuple[int, int, int]]  # (index into `scored`, target token, request) per scored token


def pack_row(context: tuple[int, ...], continuations: list[tuple[int, tuple[int, ...]]]) -> PackedRow:
    """Lay out `context` followed by each (request, continuation)'s tokens but its last.

    The context's last position predicts every continuation's first token; position
    `len(context) + j` of continuation k (its own token j) predicts its token j + 1.
    """
    c = len(context)
    tokens, positions, segments = list(context), list(range(c)), [0] * c
    scored = [c - 1]
    entries = [(0, cont[0], request) for request, cont in continuations]
    for k, (request, cont) in enumerate(continuations, start=1):
        for j, token in enumerate(cont[:-1]):
            scored.append(len(tokens))
            entries.append((len(scored) - 1, cont[j + 1], request))
            tokens.append(token)
            positions.append(c + j)
            segments.append(k)
    return PackedRow(tokens, positions, segments, scored, entries)


@dataclass(frozen=True)
class PackedBatch:
    """Rows of one forward, right-padded to `width`, with the gather indices of what is scored."""

    input_ids: Tensor  # [rows, width]
    position_ids: Tensor  # [rows, width]
    segments: Tensor  # [rows, width]; -1 at padding
    scored: Tensor  # [P] flat indices into rows * width
    chunks: tuple[tuple[int, int, int, int], ...]  # (scored start, end, entries start, end) per LM-head chunk
    entry_position: Tensor  # [E] index into its chunk's slice of `scored`
    entry_target: Tensor  # [E]
    entry_request: Tensor  # [E]
    real_tokens: int


def batch_rows(rows: list[PackedRow], device: torch.device, chunk_positions: int) -> PackedBatch:
    """Pad `rows` into one batch (tensors on `device`), LM-head work cut into chunks of positions."""
    width = -(-max(len(r.tokens) for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    scored: list[int] = []
    entries: list[tuple[int, int, int]] = []
    for b, row in enumerate(rows):
        n = len(row.tokens)
        ids[b, :n] = torch.tensor(row.tokens)
        positions[b, :n] = torch.tensor(row.positions)
        positions[b, n:] = torch.arange(row.positions[-1] + 1, row.positions[-1] + 1 + width - n)
        segments[b, :n] = torch.tensor(row.segments)
        entries += [(len(scored) + s, target, request) for s, target, request in row.entries]
        scored += [b * width + i for i in row.scored]
    entry = torch.tensor(entries, dtype=torch.long).reshape(-1, 3)
    starts = list(range(0, len(scored), chunk_positions))
    bounds = torch.searchsorted(entry[:, 0].contiguous(), torch.tensor([*starts, len(scored)])).tolist()
    chunks = tuple(
        (start, min(start + chunk_positions, len(scored)), bounds[i], bounds[i + 1])
        for i, start in enumerate(starts)
    )
    entry[:, 0] %= chunk_positions  # chunks start at multiples of chunk_positions: index within one
    position, target, request = (entry[:, i].to(device) for i in range(3))
    return PackedBatch(
        input_ids=ids.to(device),
        position_ids=positions.to(device),
        segments=segments.to(device),
        scored=torch.tensor(scored, dtype=torch.long, device=device),
        chunks=chunks,
        entry_position=position,
        entry_target=target,
        entry_request=request,
        real_tokens=sum(len(r.tokens) for r in rows),
    )


def attention_bias(segments: Tensor, dtype: torch.dtype) -> Tensor:
    """[rows, 1, width, width] additive mask: a token sees earlier tokens of its context or its own segment.

    Padding (segment -1) sees earlier padding and the context, so no query row is fully masked.
    """
    n = segments.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    key, query = segments[:, None, :], segments[:, :, None]
    allowed = causal & ((key == 0) | (key == query))
    bias = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


class FastScorer(LM):
    """Batched log-likelihood scoring of an in-memory causal LM (loglikelihood requests only)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> None:
        super().__init__()
        self.model, self.batch_size = model, batch_size
        self.body, self.head = model.base_model, model.get_output_embeddings()
        if self.body is model or self.head is None:
            name = type(model).__name__
            raise PackingRefused(f"{name} has no separate decoder and LM head; use scorer=hflm")
        self.hf = make_lm(model, tokenizer, batch_size)  # tokenization identical to HFLM's, memoized
        self.encoded: dict[tuple[str, str], Pair] = {}
        self._plan: tuple[tuple[Pair, ...], list[PackedBatch]] | None = None
        check_packing(self)

    def encode(self, context: str, continuation: str) -> Pair:
        """Context and continuation ids as HFLM builds them, context left-truncated like HFLM's input."""
        key = (context, continuation)
        if key not in self.encoded:
            if context:
                ctx, cont = self.hf._encode_pair(context, continuation)
            else:  # HFLM conditions an empty context on its prefix (BOS/EOS) token
                cont = self.hf.tok_encode(continuation, add_special_tokens=False)
                ctx = [self.hf.prefix_token_id]
            if not cont:
                raise ValueError(f"empty continuation for context {context[-40:]!r}")
            budget = self.hf.max_length + 1 - len(cont)
            self.encoded[key] = (tuple(ctx[-budget:]) if budget > 0 else (), tuple(cont))
        return self.encoded[key]

    def pretokenize(self, context: str, continuation: str) -> None:
        """Encode one request ahead of scoring (the encodings are kept)."""
        self.encode(context, continuation)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether every continuation token is the argmax) per request."""
        return self.score_pairs([self.encode(*request.args[:2]) for request in requests])

    def score_pairs(self, pairs: list[Pair]) -> list[tuple[float, bool]]:
        """Answers for (context ids, continuation ids) pairs; the layout is kept for the same pairs."""
        key = tuple(pairs)
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, self.plan(pairs))
        return self.run(self._plan[1], len(pairs))

    def plan(self, pairs: list[Pair]) -> list[PackedBatch]:
        """Pack the pairs one row per distinct context, sorted longest first, into batches."""
        if any(not ctx for ctx, _ in pairs):  # the whole input was truncated away
            raise ValueError("a continuation as long as the model's max_length is not supported")
        by_context: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
        for index, (ctx, cont) in enumerate(pairs):
            by_context[ctx].append((index, cont))
        rows = sorted(
            (pack_row(ctx, conts) for ctx, conts in by_context.items()), key=lambda r: -len(r.tokens)
        )
        vocab = self.head.weight.shape[0]
        chunk = max(1, LOGIT_CHUNK // vocab)
        budget = self.batch_size * TOKENS_PER_ROW  # tokens, not rows: short rows fill a large forward
        return [
            batch_rows([rows[i] for i in batch], self.model.device, chunk)
            for batch in length_batches(
                [len(r.tokens) for r in rows], budget, max_padding=MAX_PADDING, max_tokens=budget
            )
        ]

    def layout_stats(self) -> dict[str, int]:
        """Size of the kept layout: batches, rows, real and padded tokens, LM-head positions."""
        batches = self._plan[1] if self._plan is not None else []
        return {
            "batches": len(batches),
            "rows": sum(b.input_ids.shape[0] for b in batches),
            "real_tokens": sum(b.real_tokens for b in batches),
            "padded_tokens": sum(b.input_ids.numel() for b in batches),
            "scored_positions": sum(b.scored.numel() for b in batches),
        }

    def hidden(self, batch: PackedBatch) -> Tensor:
        """The decoder's output for a batch, flattened to [rows * width, hidden]."""
        hidden = self.body(
            input_ids=batch.input_ids,
            attention_mask=attention_bias(batch.segments, self.model.dtype),
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])

    @torch.inference_mode()
    def run(self, batches: list[PackedBatch], n_requests: int) -> list[tuple[float, bool]]:
        """Forward every batch; sum each request's token log-probs and count its non-argmax tokens."""
        device = self.model.device
        logprob = torch.zeros(n_requests, dtype=torch.float32, device=device)
        misses = torch.zeros(n_requests, dtype=torch.int32, device=device)
        for batch in batches:
            hidden = self.hidden(batch)
            for start, end, first, last in batch.chunks:
                logits = self.head(hidden[batch.scored[start:end]])
                rows = batch.entry_position[first:last]
                lp, greedy = token_logprobs(logits, rows, batch.entry_target[first:last])
                request = batch.entry_request[first:last]
                logprob.index_add_(0, request, lp)
                misses.index_add_(0, request, (~greedy).int())
        return list(zip(logprob.tolist(), (misses == 0).tolist(), strict=True))

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        raise NotImplementedError("FastScorer scores loglikelihood requests only; use HFLM for rolling")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("FastScorer scores loglikelihood requests only; use HFLM for generation")


def probe_pairs(vocab: int) -> list[Pair]:
    """Two continuations sharing a context, and one of them alone after another context."""
    ids = [(7 * i + 3) % vocab for i in range(12)]
    context, first, second = tuple(ids[:4]), tuple(ids[4:7]), tuple(ids[7:10])
    return [(context, first), (context, second), (tuple(ids[10:12]) + context, second)]


@torch.inference_mode()
def packed_logits(scorer: FastScorer, pairs: list[Pair]) -> list[Tensor]:
    """Per pair, the [len(continuation), vocab] logits predicting its tokens, from packed batches."""
    per_request: dict[int, list[Tensor]] = defaultdict(list)
    for batch in scorer.plan(pairs):
        hidden = scorer.hidden(batch)
        for start, end, first, last in batch.chunks:
            logits = scorer.head(hidden[batch.scored[start:end]]).float()
            rows, requests = batch.entry_position[first:last], batch.entry_request[first:last]
            for row, request in zip(rows.tolist(), requests.tolist(), strict=True):
                per_request[request].append(logits[row])
    return [torch.stack(per_request[i]) for i in range(len(pairs))]


@torch.inference_mode()
def plain_logits(model: PreTrainedModel, pairs: list[Pair]) -> list[Tensor]:
    """The same logits from one plain, unpadded forward per pair (HFLM's way): the reference."""
    return [
        model(input_ids=torch.tensor([list(ctx + cont)[:-1]], device=model.device))
        .logits[0, len(ctx) - 1 :]
        .float()
        for ctx, cont in pairs
    ]


class PackingRefused(ValueError):
    """The model's packed logits differ from its plain forwards' (`eval.scorer=auto` then uses HFLM)."""


def check_packing(scorer: FastScorer) -> None:
    """Raise ValueError unless packed logits equal plain forwards' on a probe (in the model's dtype).

    A model that ignores the 4-D mask lets a continuation see its siblings, one that ignores
    `position_ids` shifts every continuation after the first: either moves the logits far more than
    rounding does (relative L2 distance; bf16 rounding stays well under the tolerance).
    """
    model = scorer.model
    pairs = probe_pairs(scorer.head.weight.shape[0])
    tolerance = 1e-4 if model.dtype == torch.float32 else 2e-2
    try:
        distances = [
            float((got - want).norm() / want.norm().clamp_min(1e-12))
            for got, want in zip(packed_logits(scorer, pairs), plain_logits(model, pairs), strict=True)
        ]
    except Exception as err:  # e.g. an ALiBi model that builds its bias from a 2-D mask
        raise PackingRefused(
            f"FastScorer cannot score {type(model).__name__}: a packed forward failed ({err}); "
            "use eval.scorer=hflm"
        ) from err
    if max(distances) > tolerance:
        raise PackingRefused(
            f"FastScorer cannot score {type(model).__name__}: packed logits differ from plain forwards' by "
            f"{max(distances):.2e} (relative; allowed {tolerance:.0e}): the model ignores a 4-D attention "
            "mask or position_ids, or its logits are not its LM head on its decoder's output; "
            "use eval.scorer=hflm"
        )


def length_batches(
    lengths: list[int],
    batch_size: int,
    max_padding: float = 0.25,
    free_padding: int = 8,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Split positions of `lengths` (sorted longest first) into batches of at most `batch_size` rows
    and `max_tokens` padded tokens (a longer row goes alone), whose padding (to each batch's first,
    longest entry) stays within `max_padding` of the padded area, or within `free_padding` tokens a
    row (short rows: a few pad tokens cost less than another call).

    A fixed count would pad a batch holding one long outlier and many short rows to the outlier's
    length (PIQA's solutions range from a few tokens to hundreds); the padding bound starts a new
    batch instead, so a few long rows run in small batches and the rest stay full.
    """
    if any(a < b for a, b in itertools.pairwise(lengths)):
        raise ValueError("lengths must be sorted longest first")
    batches: list[list[int]] = []
    real = 0
    for index, length in enumerate(lengths):
        if batches and len(batches[-1]) < batch_size:
            longest = lengths[batches[-1][0]]
            area = longest * (len(batches[-1]) + 1)
            padding_ok = area - (real + length) <= max(
                max_padding * area, free_padding * (len(batches[-1]) + 1)
            )
            if padding_ok and (max_tokens is None or area <= max_tokens):
                batches[-1].append(index)
                real += length
                continue
        batches.append([index])
        real = length
    return batches
