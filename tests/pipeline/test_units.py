"""`pipeline.evals.units`: the fixed partitions a paired bootstrap resamples."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.evals.units import (
    DOC_CHUNKS,
    DOC_UNITS_MAX,
    chunk_bounds,
    chunk_counts,
    chunk_of_items,
    document_units,
)
from pipeline.specs import MetricValue


@pytest.mark.parametrize(
    ("n", "k"), [(1, 100), (7, 100), (100, 100), (101, 100), (82_000, 100), (5153, 1000)]
)
def test_chunks_cover_every_item_once_contiguously_and_near_equally(n, k):
    bounds = chunk_bounds(n, k)
    assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == min(n, k) + 1
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    chunk = chunk_of_items(n, k)
    assert len(chunk) == n and (np.diff(chunk) >= 0).all()
    assert np.bincount(chunk).tolist() == sizes == list(map(int, chunk_counts(n, k)))


def test_chunk_bounds_refuse_empty_partitions():
    with pytest.raises(ValueError, match="n >= 1"):
        chunk_bounds(0, 100)


def test_documents_are_units_one_by_one_up_to_the_cap():
    values = [1.0, 0.0, 1.0]
    assert document_units("acc", values) == ((1.0, 0.0, 1.0), (1.0, 1.0, 1.0))
    assert document_units("perplexity", [-2.5, -0.5]) == ((2.5, 0.5), (1.0, 1.0))  # NLL: exp(mean) is ppl
    sums, counts = document_units("acc", [1.0] * DOC_UNITS_MAX)
    assert len(sums) == DOC_UNITS_MAX and set(counts) == {1.0}


def test_more_documents_than_the_cap_become_contiguous_chunks():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2, 5153).astype(float).tolist()
    sums, counts = document_units("acc", values)
    assert len(sums) == len(counts) == DOC_CHUNKS
    assert sum(counts) == 5153 and sum(sums) == sum(values)
    assert sums[0] == sum(values[: int(counts[0])])


def test_a_metric_value_needs_sums_and_counts_of_one_length():
    MetricValue("t", "acc", 0.5, unit_sums=(1.0, 0.0), unit_counts=(1.0, 1.0))
    with pytest.raises(ValueError, match="equal lengths"):
        MetricValue("t", "acc", 0.5, unit_sums=(1.0,), unit_counts=(1.0, 1.0))
    with pytest.raises(ValueError, match="equal lengths"):
        MetricValue("t", "acc", 0.5, unit_sums=(1.0,))
