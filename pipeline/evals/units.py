"""The units a paired bootstrap resamples: fixed partitions of a metric's scored tokens or documents.

Each metric row may carry `unit_sums` and `unit_counts` (one value per unit, see `MetricValue`):
- perplexity sets (`nats_per_token`, `perplexity`, `kl_to_16bit`; not `bits_per_byte`, nats/token
  times a constant of the text): `TEXT_CHUNKS` contiguous chunks of the scored tokens in text order
  (fewer when fewer tokens are scored); a chunk's sum is its tokens' summed NLL (nats) or, on
  `kl_to_16bit`, their summed KL, and its count the number of tokens. The partition depends only on
  how many tokens are scored, so it is the same for every configuration of one model, text and
  window setting, and chunk i of one job pairs with chunk i of another;
- lm-eval tasks: one unit per document in document order, its sum the metric's per-document value
  (acc/acc_norm: 0 or 1) and its count 1; on a `perplexity` row (LAMBADA) the document's NLL, minus
  lm-eval's per-document log-likelihood, so that every perplexity row reads exp(sum / count); past
  `DOC_UNITS_MAX` documents, `DOC_CHUNKS` contiguous chunks of documents (sums and counts summed),
  so a row stays a few KB.

So every row's value is sum(unit_sums) / sum(unit_counts), or exp of it on `perplexity` rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TEXT_CHUNKS = 100  # units of a perplexity set
DOC_UNITS_MAX = 2000  # documents a task row lists one by one
DOC_CHUNKS = 1000  # units of a task with more documents than that

Units = tuple[tuple[float, ...], tuple[float, ...]]  # (unit_sums, unit_counts)


def chunk_bounds(n: int, k: int) -> list[int]:
    """Boundaries of min(k, n) contiguous, near-equal chunks of n items: chunk i is [b[i], b[i + 1])."""
    if n < 1 or k < 1:
        raise ValueError(f"need n >= 1 items and k >= 1 chunks, got n={n}, k={k}")
    k = min(k, n)
    return [i * n // k for i in range(k + 1)]


def chunk_of_items(n: int, k: int) -> np.ndarray:
    """[n] int64: the chunk (of `chunk_bounds(n, k)`) each item falls in."""
    return np.repeat(np.arange(min(k, n)), np.diff(chunk_bounds(n, k)))


def chunk_counts(n: int, k: int) -> tuple[float, ...]:
    """Items per chunk of `chunk_bounds(n, k)`, as floats (the `unit_counts` column's type)."""
    return tuple(float(c) for c in np.diff(chunk_bounds(n, k)))


def document_units(metric: str, values: Sequence[float]) -> Units:
    """A task metric's per-document values (lm-eval's) as units: one per document, or `DOC_CHUNKS`
    chunks past `DOC_UNITS_MAX`; `perplexity`'s log-likelihoods negated (NLL)."""
    array = np.asarray(values, dtype=np.float64)
    if metric == "perplexity":
        array = -array
    if len(array) <= DOC_UNITS_MAX:
        return tuple(array.tolist()), (1.0,) * len(array)
    bounds = chunk_bounds(len(array), DOC_CHUNKS)
    return tuple(np.add.reduceat(array, bounds[:-1]).tolist()), chunk_counts(len(array), DOC_CHUNKS)
