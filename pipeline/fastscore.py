"""`FastScorer`: an lm-eval `LM` that scores log-likelihood requests with shared contexts run once.

It answers `loglikelihood` exactly as lm-eval's HFLM defines it (the same tokenization: it encodes
through a memoized HFLM, and the same left truncation to `max_length + 1` tokens), but computes it
differently:
- requests are grouped by context; each distinct context runs once (with the KV cache kept), and
  all of its continuations run after it in one batch, reading the cache (`batch_select_indices`
  repeats a context's cache for each of its continuations);
- contexts are batched by exact length (no padding); continuations are right-padded, which cannot
  change their real tokens under causal attention;
- logits are computed only where scored: the context's last position, and the continuation's
  positions but its last.
Because it is an lm-eval `LM`, lm-eval's own `evaluate` turns its answers into metrics.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
from lm_eval.api.model import LM

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
        by_length: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        for ctx in by_context:
            by_length[len(ctx)].append(ctx)
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for length in sorted(by_length, reverse=True):
            contexts = by_length[length]
            for start in range(0, len(contexts), self.batch_size):
                chunk = contexts[start : start + self.batch_size]
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
        """Score continuations `conts`, each after `contexts[owners[i]]` (contexts of equal length)."""
        device = self.model.device
        owner = torch.tensor(owners, device=device)
        n_max = max(len(c) for c in conts)
        targets = torch.zeros(len(conts), n_max, dtype=torch.long)
        for i, cont in enumerate(conts):
            targets[i, : len(cont)] = torch.tensor(cont)
        targets = targets.to(device)
        lengths = torch.tensor([len(c) for c in conts], device=device)
        if not contexts[0]:  # the whole input was truncated away (len(cont) == max_length + 1)
            raise ValueError("a continuation as long as the model's max_length is not supported")
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self.keep_logits else {}
        out = self.model(input_ids=torch.tensor(contexts, device=device), use_cache=n_max > 1, **kwargs)
        logprobs = [out.logits[:, -1:].float().log_softmax(-1)[owner]]  # predicts continuation token 0
        if n_max > 1:
            cache = out.past_key_values
            cache.batch_select_indices(owner)
            rest = self.model(input_ids=targets[:, :-1], past_key_values=cache, use_cache=False).logits
            logprobs.append(rest.float().log_softmax(-1))
        logprobs_t = torch.cat(logprobs, dim=1)  # [rows, n_max, vocab]: position j predicts token j
        token_lp = logprobs_t.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        greedy = logprobs_t.argmax(-1) == targets
        valid = torch.arange(n_max, device=device)[None, :] < lengths[:, None]
        total = (token_lp * valid).sum(-1)
        all_greedy = (greedy | ~valid).all(-1)
        return list(zip(total.tolist(), all_greedy.tolist(), strict=True))

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        raise NotImplementedError("FastScorer scores loglikelihood requests only; use HFLM for rolling")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("FastScorer scores loglikelihood requests only; use HFLM for generation")
