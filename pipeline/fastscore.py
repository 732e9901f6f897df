"""`FastScorer`: an lm-eval `LM` that scores log-likelihood requests with shared contexts run once.

It answers `loglikelihood` exactly as lm-eval's HFLM defines it (the same tokenization: it encodes
through a memoized HFLM, and the same left truncation to `max_length + 1` tokens), but computes it
differently:
- requests are grouped by context; each distinct context runs once (with the KV cache kept), and
  all of its continuations run after it in one batch, reading the cache (`batch_select_indices`
  repeats a context's cache for each of its continuations);
- distinct contexts are sorted by length and batched (little padding); contexts and continuations
  are right-padded, which cannot change their real tokens under causal attention, and the
  continuations read the cache through an attention mask that hides the contexts' padding;
- logits are computed only where scored: the context's last position, and the continuation's
  positions but its last.
Because it is an lm-eval `LM`, lm-eval's own `evaluate` turns its answers into metrics.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
from lm_eval.api.model import LM
from torch import Tensor

from pipeline.lmeval import make_lm
from pipeline.perplexity import accepts_logits_to_keep

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Pair = tuple[tuple[int, ...], tuple[int, ...]]  # (context ids, continuation ids)


class FastScorer(LM):
    """Batched log-likelihood scoring of an in-memory causal LM (loglikelihood requests only)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> None:
        super().__init__()
        self.model, self.batch_size = model, batch_size
        self.hf = make_lm(model, tokenizer, batch_size)  # tokenization identical to HFLM's, memoized
        self.keep_logits = accepts_logits_to_keep(model)
        self.encoded: dict[tuple[str, str], Pair] = {}

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
        pairs = [self.encode(*request.args[:2]) for request in requests]
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, (ctx, _) in enumerate(pairs):
            by_context[ctx].append(index)
        contexts = sorted(by_context, key=len, reverse=True)  # batches of similar length: little padding
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for chunk_rows in length_batches([len(c) for c in contexts], self.batch_size):
            chunk = [contexts[i] for i in chunk_rows]
            rows = [index for ctx in chunk for index in by_context[ctx]]
            owners = [i for i, ctx in enumerate(chunk) for _ in by_context[ctx]]
            conts = [pairs[index][1] for index in rows]
            for index, answer in zip(rows, self.score(chunk, owners, conts), strict=True):
                answers[index] = answer
        return answers

    @torch.inference_mode()
    def score(
        self, contexts: list[tuple[int, ...]], owners: list[int], conts: list[tuple[int, ...]]
    ) -> list[tuple[float, bool]]:
        """Score continuations `conts`, each after `contexts[owners[i]]`.

        Contexts are right-padded: their real tokens never see the padding (causal attention), and
        the first continuation token is predicted at each context's own last position. The other
        continuation tokens run in sub-batches of similar length that read the contexts' cache
        through an attention mask hiding its padding, at explicit positions `len(context) + j`.
        """
        if not all(contexts):  # the whole input was truncated away (len(cont) == max_length + 1)
            raise ValueError("a continuation as long as the model's max_length is not supported")
        device = self.model.device
        ctx_ids, ctx_mask = _right_pad(contexts, device)
        ctx_len = ctx_mask.sum(1)
        last = ctx_len - 1
        kwargs: dict[str, Any] = {}
        if self.keep_logits:  # the LM head runs only at the batch's distinct last positions
            keep = torch.unique(last)
            kwargs["logits_to_keep"] = keep
            last = torch.searchsorted(keep, last)
        needs_cache = max(len(c) for c in conts) > 1
        out = self.model(input_ids=ctx_ids, use_cache=needs_cache, **kwargs)
        first = out.logits[torch.arange(len(contexts), device=device), last].float().log_softmax(-1)
        order = sorted(range(len(conts)), key=lambda i: len(conts[i]), reverse=True)
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(conts)
        for batch in length_batches([len(conts[i]) for i in order], self.batch_size):
            rows = [order[i] for i in batch]
            owner = torch.tensor([owners[i] for i in rows], device=device)
            targets, valid = _right_pad([conts[i] for i in rows], device)
            logprobs = [first[owner].unsqueeze(1)]  # predicts continuation token 0
            if targets.shape[1] > 1:
                logits = self._continue(out.past_key_values, owner, ctx_mask, ctx_len, targets[:, :-1])
                logprobs.append(logits.float().log_softmax(-1))
            for i, answer in zip(rows, _sum_scored(torch.cat(logprobs, 1), targets, valid), strict=True):
                answers[i] = answer
        return answers

    def _continue(
        self, cache: Any, owner: Tensor, ctx_mask: Tensor, ctx_len: Tensor, inputs: Tensor
    ) -> Tensor:
        """Logits of `inputs` (continuations minus their last token) after their contexts' cache."""
        from transformers import DynamicCache

        rows_cache = DynamicCache([(layer.keys[owner], layer.values[owner]) for layer in cache.layers])
        mask = torch.cat([ctx_mask[owner], torch.ones_like(inputs, dtype=torch.bool)], 1)
        positions = ctx_len[owner, None] + torch.arange(inputs.shape[1], device=inputs.device)
        return self.model(
            input_ids=inputs,
            past_key_values=rows_cache,
            attention_mask=mask.long(),
            position_ids=positions,
            use_cache=False,
        ).logits

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        raise NotImplementedError("FastScorer scores loglikelihood requests only; use HFLM for rolling")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("FastScorer scores loglikelihood requests only; use HFLM for generation")


def length_batches(
    lengths: list[int], batch_size: int, max_padding: float = 0.25, free_padding: int = 8
) -> list[list[int]]:
    """Split positions of `lengths` (sorted longest first) into batches of at most `batch_size` whose
    padding (to each batch's first, longest entry) stays within `max_padding` of the padded area, or
    within `free_padding` tokens a row (short rows: a few pad tokens cost less than another call).

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
            if area - (real + length) <= max(max_padding * area, free_padding * batch_size):
                batches[-1].append(index)
                real += length
                continue
        batches.append([index])
        real = length
    return batches


def _sum_scored(logprobs: Tensor, targets: Tensor, valid: Tensor) -> list[tuple[float, bool]]:
    """Per row: summed log-prob of the real target tokens, and whether each is the argmax."""
    token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    greedy = (logprobs.argmax(-1) == targets) | ~valid
    return list(zip((token_lp * valid).sum(-1).tolist(), greedy.all(-1).tolist(), strict=True))


def _right_pad(sequences: list[tuple[int, ...]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n, longest] padded with 0, mask [n, longest] True at real tokens)."""
    longest = max(len(seq) for seq in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = True
    return ids.to(device), mask.to(device)
