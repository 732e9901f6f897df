"""The bucketed search (`triton_fused.SEARCH_BUCKET`, `FusedChoice(bucket_from_log2=...)`).

On the host: the buckets partition the float32 line in order, and each codebook's table brackets every
code, start <= #(mids < xn) <= start + window, for random bit patterns and adversarial xn (each midpoint
and its float32 neighbours, +-0, subnormals, +-1 and just above, +-inf, NaN). Under TRITON_INTERPRET=1 (a
subprocess, as in test_triton_interpret.py): the kernel's codes and outputs equal the reference's bit for
bit for every codebook data type at 6..8 bits, and its codes on NaN/Inf blocks equal the binary search's.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kernels import CODEBOOKS, QuantSpec
from kernels import buckets as kb
from kernels.codebooks import Levels, levels_from_values
from tests.kernels.interpreter import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

CASES = [(dtype, bits) for dtype in CODEBOOKS for bits in (6, 7, 8)] + [("close", 2), ("close", 3)]


def _levels(dtype: str, bits: int) -> Levels:
    """The codebook of (dtype, bits); ("close", n): 256 values whose top n + 1 lie within 1e-6 of 1.0, so
    n midpoints share every bucket that holds one: the window is n, the top bucket's start is clamped."""
    from kernels.blockwise import levels_for

    if dtype == "close":
        top = 1 - 2e-7 * torch.arange(bits, 0, -1, dtype=torch.float64)
        return levels_from_values(
            torch.cat([torch.linspace(-1, 0.9, 255 - bits, dtype=torch.float64), top, torch.ones(1)])
        )
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))  # quantile needs data
    return levels_for(w, QuantSpec(dtype, bits, 64))


def _adversarial(mids: torch.Tensor) -> torch.Tensor:
    finite = mids[mids.isfinite()]
    specials = [0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.1754944e-38, -1.1754944e-38, 2.0**-64, 1.0, -1.0]
    specials += [1.0000001, -1.0000001, 3.0, float("inf"), float("-inf"), float("nan"), -float("nan")]
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31, (50_000,), generator=g, dtype=torch.int64).to(torch.int32)
    anything = bits.view(torch.float32) * 1.0  # a product, as xn is: NaNs (any payload, sign) are quiet
    up, down = torch.nextafter(finite, torch.tensor(2.0)), torch.nextafter(finite, torch.tensor(-2.0))
    ordinary = torch.cat([torch.randn(20_000, generator=g), torch.randn(20_000, generator=g) * 1e-3])
    return torch.cat([finite, up, down, torch.tensor(specials), ordinary, anything])


def _count_below(mids: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
    """#(mids < xn), the definition (NaN: 0), one float32 compare per pair."""
    return torch.cat([(mids[None, :] < part[:, None]).sum(1) for part in xn.split(8192)])


@pytest.mark.parametrize(("dtype", "bits"), CASES)
def test_table_brackets_every_code(dtype: str, bits: int) -> None:

    levels = _levels(dtype, bits)
    table = kb.bucket_table(levels)
    assert table is not None, (dtype, bits)
    assert table.starts.dtype == torch.uint8 and table.starts.numel() == 2 << table.buckets.log2_buckets
    assert table.starts.numel() <= 2 << kb.MAX_BUCKETS_LOG2 and 1 <= table.window <= kb.MAX_WINDOW
    assert dtype != "close" or table.window == bits
    xn = _adversarial(levels.mids)
    start = table.starts.long()[kb.bucket_index(xn, table.buckets)]
    code = _count_below(levels.mids, xn)
    assert bool(((start <= code) & (code <= start + table.window)).all()), (dtype, bits)
    assert int(table.starts.max()) + table.window <= levels.mids.numel()  # the window stays inside the mids
    # The window is the exact need, not a guess: some bucket's largest float needs all of it.
    largest = kb.bucket_bounds(table.buckets)[1]
    assert int((_count_below(levels.mids, largest) - table.starts.long()).max()) == table.window


@pytest.mark.parametrize("bits", range(2, 9))
def test_uniform_search_counts_every_midpoint_below_for_the_int_grid(bits: int) -> None:
    # The int grid's arithmetic guess and one compare (`uniform_codes`, the kernel's `_uniform_lookup`)
    # against the definition on midpoints, their float neighbours, specials (NaN, +-inf, > 1) and noise.
    levels = _levels("int", bits)
    m = kb.uniform_m(levels)
    assert m is not None and m == 2 ** (bits - 1) - 1
    xn = _adversarial(levels.mids)
    assert torch.equal(kb.uniform_codes(xn, m, levels.mids), _count_below(levels.mids, xn))


@pytest.mark.parametrize("bits", range(2, 9))
def test_arithmetic_search_computes_the_int_grid_tables_bit_for_bit(bits: int) -> None:
    # The table-free int grid (`arithmetic_codes`, the kernel's `_arithmetic_lookup`): the codebook's
    # values and midpoints are the computed quotients (`arithmetic_grid` checks every entry), so codes and
    # values equal the definition's on midpoints, their float neighbours, specials (NaN, +-inf, > 1), noise.
    levels = _levels("int", bits)
    m = kb.arithmetic_grid(levels)
    assert m is not None and m == kb.uniform_m(levels)
    xn = _adversarial(levels.mids)
    codes, values = kb.arithmetic_codes(xn, m)
    assert torch.equal(codes, _count_below(levels.mids, xn))
    assert torch.equal(values.view(torch.int32), levels.values[codes].view(torch.int32))


def test_arithmetic_search_refuses_a_grid_one_float_off() -> None:
    # within the uniform search's tolerance, but one value or one midpoint an ulp away from its quotient:
    # the kernel would compute another float than the table holds, so the tables are read instead
    levels = _levels("int", 6)
    for field in ("values", "mids"):
        moved = {"values": levels.values.clone(), "mids": levels.mids.clone()}
        moved[field][7] = torch.nextafter(moved[field][7], torch.tensor(2.0))
        shifted = Levels(moved["values"], moved["mids"])
        assert kb.uniform_m(shifted) is not None and kb.arithmetic_grid(shifted) is None, field
    assert all(kb.arithmetic_grid(_levels(dtype, 6)) is None for dtype in CODEBOOKS if dtype != "int")


@pytest.mark.parametrize(("dtype", "bits"), [(d, b) for d in CODEBOOKS for b in range(3, 9)] + [("close", 1)])
def test_packed_lookup_counts_every_midpoint_below(dtype: str, bits: int) -> None:
    # One word a bucket (`packed_table`, the kernel's `_packed_lookup`, mirrored by `packed_codes`): start
    # and threshold give #(mids < xn) on midpoints, their float neighbours, each bucket's smallest and
    # largest floats and theirs, specials (NaN of either sign, +-inf, +-0, subnormals, > 1) and noise.
    levels = _levels(dtype, bits)
    table = kb.packed_table(levels)
    if table is None:  # no geometry within MAX_PACKED_BUCKETS has a window of one
        assert (dtype, bits) in {("dynamic", 8), ("close", 1)}, (dtype, bits)
        return
    assert table.words.dtype == torch.int32 and table.words.numel() == 2 << table.buckets.log2_buckets
    assert table.words.numel() <= kb.MAX_PACKED_BUCKETS
    smallest, largest = kb.bucket_bounds(table.buckets)
    inf = torch.tensor(float("inf"))
    edges = torch.cat([smallest, largest, torch.nextafter(smallest, -inf), torch.nextafter(largest, inf)])
    xn = torch.cat([_adversarial(levels.mids), edges])
    assert torch.equal(kb.packed_codes(xn, levels), _count_below(levels.mids, xn)), (dtype, bits)


def test_packed_lookup_skips_a_midpoint_the_clamp_hides() -> None:
    # A midpoint below bucket 0's lowest float: every |xn| under that float has its key, so no threshold
    # splits them; the smallest geometry that puts the midpoint above bucket 0's clamp is chosen.
    levels = levels_from_values(torch.tensor([-1.0, -1e-3, 1e-3, 1.0], dtype=torch.float64))
    table = kb.packed_table(levels)
    assert table is not None
    low = torch.tensor(table.buckets.first << table.buckets.shift, dtype=torch.int32).view(torch.float32)
    assert float(low) <= 5e-4 or table.buckets.first == 0  # the midpoint 0.0 aside, +-5e-4 above the clamp
    xn = _adversarial(levels.mids)
    assert torch.equal(kb.packed_codes(xn, levels), _count_below(levels.mids, xn))


@pytest.mark.parametrize("dtype", [d for d in CODEBOOKS if d != "int"] + ["close"])
def test_uniform_search_is_only_for_the_int_grid(dtype: str) -> None:
    assert kb.uniform_m(_levels(dtype, 6 if dtype != "close" else 2)) is None
    # an int grid whose midpoints moved by more than the tolerance is not uniform any more
    levels = _levels("int", 6)
    moved = levels.mids.clone()
    moved[10] += 4 * kb.UNIFORM_TOLERANCE
    assert kb.uniform_m(Levels(levels.values, moved)) is None


@pytest.mark.parametrize("geometry", [(0, 1), (0, 5), (3, 8), (6, 9), (6, 11), (10, 11)])
def test_buckets_partition_the_floats_in_order(geometry: tuple[int, int]) -> None:
    from kernels.buckets import Buckets, bucket_bounds, bucket_index

    buckets = Buckets(*geometry)
    half = 1 << buckets.log2_buckets
    smallest, largest = bucket_bounds(buckets)
    index = torch.arange(2 * half)
    assert torch.equal(bucket_index(smallest, buckets), index) and torch.equal(
        bucket_index(largest, buckets), index
    )
    # By rising xn (the negative half of the table first), each bucket starts one float above the last.
    order = torch.cat([index[half:], index[:half]])
    lo, hi = smallest[order], largest[order]
    assert lo[0] == float("-inf") and hi[-1] == float("inf") and bool((lo <= hi).all())
    assert torch.equal(torch.nextafter(hi[:-1], torch.tensor(float("inf"))), lo[1:])  # -0.0 == +0.0
    nan = torch.tensor([float("nan"), -float("nan")])
    assert torch.equal(bucket_index(nan, buckets), torch.tensor([half, half]))  # start 0: NaN's code
    assert torch.equal(bucket_index(torch.tensor([0.0, -0.0]), buckets), torch.tensor([0, 0]))


@pytest.mark.parametrize(("dtype", "bits"), [c for c in CASES if c[0] != "close"] + [("int", 4), ("nf", 5)])
def test_bucket_pairs_give_each_code_and_value(dtype: str, bits: int) -> None:
    # The independent lookup in torch: start[b] + (pair mid < xn) is #(mids < xn), and the pair's value
    # is values[code], for every xn; tables only for windows of one and up to MAX_PAIR_BUCKETS buckets.
    levels = _levels(dtype, bits)
    table, pairs = kb.bucket_table(levels), kb.bucket_pairs(levels)
    assert table is not None
    if table.window != 1 or table.starts.numel() > kb.MAX_PAIR_BUCKETS:
        assert pairs is None
        return
    assert pairs is not None and pairs.mids.dtype == torch.float32 and pairs.values.dtype == torch.int64
    xn = _adversarial(levels.mids)
    bucket = kb.bucket_index(xn, table.buckets)
    above = pairs.mids[bucket] < xn
    code = table.starts.long()[bucket] + above.long()
    assert torch.equal(code, _count_below(levels.mids, xn)), (dtype, bits)
    pair = pairs.values[bucket]
    bits32 = torch.where(above, pair >> 32, pair).to(torch.int32)  # the kernel's halves, truncated
    assert torch.equal(bits32.view(torch.float32), levels.values[code]), (dtype, bits)


@pytest.mark.parametrize(("dtype", "bits"), [(d, b) for d in CODEBOOKS for b in range(4, 9)] + [("close", 2)])
def test_pair_lookup_gives_each_code_and_value(dtype: str, bits: int) -> None:
    # The pair lookup in torch (`pair_values`, the kernel's `_pair_lookup` step for step): the bucket's
    # value pair, the midpoint between them computed, one compare: #(mids < xn) and values[code] for every
    # xn; tables only where the window is one, within the size limit, and every midpoint is the mean.
    levels = _levels(dtype, bits)
    table = kb.bucket_table(levels)
    assert kb.mids_are_means(levels), (dtype, bits)  # every codebook the project builds
    pairs = kb.mean_pairs(levels, 4096)
    if table is None or table.window != 1:
        assert pairs is None and dtype == "close"
        return
    assert pairs is not None and pairs.values.dtype == torch.int64 and pairs.buckets == table.buckets
    small = kb.mean_pairs(levels)  # MAX_PAIR_BUCKETS
    assert (small is None) == (table.starts.numel() > kb.MAX_PAIR_BUCKETS), (dtype, bits)
    xn = _adversarial(levels.mids)
    codes, values = kb.pair_values(xn, levels, 4096)
    expected = _count_below(levels.mids, xn)
    assert torch.equal(codes, expected), (dtype, bits)
    assert torch.equal(values.view(torch.int32), levels.values[expected].view(torch.int32)), (dtype, bits)


def test_pair_lookup_refuses_a_midpoint_that_is_not_the_mean() -> None:
    # one midpoint an ulp above its neighbours' float32 mean: the kernel would compare with another float
    # than the reference, so there is no pair table (the other searches read the midpoints themselves)
    levels = _levels("nf", 6)
    assert kb.mean_pairs(levels) is not None
    mids = levels.mids.clone()
    mids[20] = torch.nextafter(mids[20], torch.tensor(2.0))
    moved = Levels(levels.values, mids)
    assert not kb.mids_are_means(moved) and kb.mean_pairs(moved) is None
    assert kb.bucket_table(moved) is not None  # the bucketed and packed searches still take it
    # a subnormal mean: the kernel's add and multiply could flush it; refused
    tiny = levels_from_values(torch.tensor([-1.0, 0.0, 1e-39, 1.0]))
    assert not kb.mids_are_means(tiny)


def test_search_kind_and_fallback() -> None:
    from kernels import triton_fused as tf

    bucket = tf.FusedChoice(bucket_from_log2=6, packed_from_buckets=0, pairs_from_log2=0)
    chain, shared, global_, by_bucket = 0, 1, 2, 3
    assert (tf.SEARCH_CHAIN, tf.SEARCH_SHARED, tf.SEARCH_GLOBAL, tf.SEARCH_BUCKET) == (0, 1, 2, 3)
    assert [tf.search_kind(k, bucket) for k in (5, 6, 8, 9)] == [shared, by_bucket, by_bucket, global_]
    # the default (bucket_from_log2=4, the faster on one H200): k = 3 keeps the binary search
    assert [tf.search_kind(k, tf.DEFAULT_CHOICE) for k in (3, 4, 8)] == [shared, by_bucket, by_bucket]
    assert tf.search_kind(8, tf.FusedChoice(bucket_from_log2=0)) == shared  # 0: off
    assert tf.search_kind(6, tf.FusedChoice(bucket_from_log2=6, max_chain_log2=6)) == chain
    assert tf.search_kind(8, tf.FusedChoice(bucket_from_log2=6, max_shared_log2=7)) == global_
    # 40 equal midpoints (a quantile codebook of mostly zeros) need a window of 40: the binary search.
    crowded = levels_from_values(
        torch.cat([torch.linspace(-1, -0.5, 12), torch.zeros(41), torch.linspace(0.5, 1, 11)])
    )
    assert kb.bucket_table(crowded) is None
    x = torch.zeros(4)
    assert tf._flags(x, crowded, True, False, bucket)["SEARCH"] == shared
    assert tf._flags(x, _levels("nf", 8), True, False, bucket)["SEARCH"] == by_bucket


PRELUDE = r"""
import itertools, torch
from kernels import CODEBOOKS, QuantSpec
from kernels import buckets as kb
from kernels import triton_fused as tf
from kernels.blockwise import _codes_torch, levels_for, normalize_rows, reference_fake_quantize
from kernels.codebooks import levels_from_values
from tests.kernels.test_bucket_search import _levels

no = {"uniform_from_log2": 0, "packed_from_buckets": 0, "pairs_from_log2": 0}
bucket = tf.FusedChoice(bucket_from_log2=6, **no)  # int too; not packed, no pairs
g = torch.Generator().manual_seed(99)
checked = 0

def edges(levels):
    # float32 blocks whose absmax is 1.0, so xn == x: each midpoint and its neighbours, +-0, subnormals;
    # blocks that put xn just above 1 (absmax 3: 3 * fl(1/3) > 1) and tiny blocks (absmax < 2^-64).
    mids = levels.mids[levels.mids.isfinite()]
    up, down = torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))
    specials = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39, 1.1754944e-38])
    values = torch.cat([mids, up, down, specials])
    blocks = torch.nn.functional.pad(values, (0, -values.numel() % 63)).view(-1, 63)
    ones = torch.ones(blocks.shape[0], 1)
    ones[1::2] = -1.0
    above_one = torch.tensor([3.0, -3.0, 1.0, -1.0, 2.9999998, 0.0] * 8)
    tiny = torch.tensor([1e-39, -5e-40, 7e-45, 0.0] * 16)
    return torch.cat([torch.cat([blocks, ones], 1).reshape(-1), above_one, tiny])

def same(x, spec, levels, choice=bucket, codes=True):
    bucketed = tf.SEARCH_BUCKET_L1 if choice.l1_tables else tf.SEARCH_BUCKET
    log2 = levels.mids.numel().bit_length() - 1
    uniform = 0 < choice.uniform_from_log2 <= log2 and kb.uniform_m(levels) is not None
    table = kb.bucket_table(levels)
    packs = table is not None and 0 < choice.packed_from_buckets <= table.starts.numel()
    packed = packs and not choice.l1_tables and kb.packed_table(levels) is not None
    computed = 0 < choice.arithmetic_from_log2 <= log2 and kb.arithmetic_grid(levels) is not None
    pairs = 0 < choice.pairs_from_log2 <= log2 and not choice.l1_tables and table is not None
    paired = pairs and kb.mean_pairs(levels, choice.pairs_max_buckets) is not None
    kind = tf.SEARCH_PAIRS if paired else tf.SEARCH_PACKED if packed else bucketed
    valued = 0 < choice.computed_value_from_log2 <= log2 and kb.arithmetic_grid(levels) is not None
    grid = tf.SEARCH_ARITHMETIC if computed else tf.SEARCH_GRID_VALUE if valued else tf.SEARCH_UNIFORM
    kind = grid if uniform else kind
    assert tf._flags(x, levels, True, False, choice)["SEARCH"] == kind.value, spec
    ref = reference_fake_quantize(x, spec, levels)
    assert torch.equal(tf.fused_fake_quantize(x, spec, levels, choice=choice), ref), (spec, choice)
    if not codes:
        return
    codes, absmax = tf.fused_quantize(x, spec, levels, choice=choice)
    ref_codes, ref_absmax, _ = _codes_torch(x, spec, levels, check_finite=True)
    assert torch.equal(codes.long(), ref_codes.reshape(-1)[: x.numel()].long()), spec
    assert torch.equal(absmax, ref_absmax), spec

"""

SCRIPT = (
    PRELUDE
    + r"""
# Every codebook data type at 6..8 bits; a power-of-two block (whole-block programs and a masked tail) and
# one that is not, bf16 and float32; the two-pass kernel (block None) and `edges` once per data type.
for dtype, bits in itertools.product(CODEBOOKS, (6, 7, 8)):
    for block, torch_dtype in itertools.product((64, 100), (torch.bfloat16, torch.float32)):
        x = (torch.randn(5, 77, generator=g) * 0.02).to(torch_dtype)
        spec = QuantSpec(dtype, bits, block)
        same(x, spec, levels_for(x, spec))
        checked += 1
    spec = QuantSpec(dtype, bits, None)
    x = torch.randn(3, 50, generator=g)
    same(x, spec, levels_for(x, spec))

    levels = levels_for(x, QuantSpec(dtype, bits, 64))
    same(edges(levels), QuantSpec(dtype, bits, 64), levels)
    checked += 1

# Windows of 2 and 3 midpoints (the top bucket's start clamped so the window stays inside the mids).
for n in (2, 3):
    levels = _levels("close", n)
    assert kb.bucket_table(levels).window == n
    for block, torch_dtype in ((64, torch.float32), (100, torch.bfloat16)):
        x = (torch.randn(5, 77, generator=g) * 0.02).to(torch_dtype)
        same(x, QuantSpec("quantile", 8, block), levels)
    same(edges(levels), QuantSpec("quantile", 8, 64), levels)
    checked += 1

# NaN and Inf blocks (check_finite off): the absmax is NaN for those blocks only; the codes are
# #(mids < xn) (NaN: 0, all compares false), the outputs are the binary search's. (A NaN block is scaled
# by 1, so its xn reach beyond 1; an Inf block by 0, so its xn are +-0 and NaN for the +-inf.)
for dtype, bits in itertools.product(("int", "nf", "fp"), (6, 8)):
    x = torch.randn(6, 64, generator=g)
    x[1, 5], x[3, 7], x[4, 0] = float("nan"), float("inf"), float("-inf")
    spec = QuantSpec(dtype, bits, 64)
    levels = levels_for(torch.randn(6, 64, generator=g), spec)
    for block in (64, None):
        spec = QuantSpec(dtype, bits, block)
        out, codes, absmax = tf._launch(x, spec, levels, True, torch.uint8, bucket)
        base_out, base_codes, base_absmax = tf._launch(x, spec, levels, True, torch.uint8)
        torch.testing.assert_close(out, base_out, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(codes, base_codes) and torch.equal(absmax.isnan(), base_absmax.isnan())
        if block == 64:
            assert torch.equal(absmax.isnan(), torch.tensor([False, True, False, True, True, False]))
            xn = normalize_rows(x, None, False)[0].reshape(-1)
            expected = (levels.mids[None, :] < xn[:, None]).sum(1)
            assert torch.equal(codes.long(), expected), (dtype, bits)
            assert codes[64 + 5] == codes[3 * 64 + 7] == codes[4 * 64] == 0 and codes.max() > 0
        checked += 1

# The fallback: a codebook of many equal values has no table and takes the binary search.
crowded = torch.cat([torch.linspace(-1, -0.5, 100), torch.zeros(101), torch.linspace(0.5, 1, 55)])
crowded = levels_from_values(crowded)
x = torch.randn(4, 64, generator=g)
spec = QuantSpec("quantile", 8, 64)
out = tf.fused_fake_quantize(x, spec, crowded, choice=bucket)
assert torch.equal(out, reference_fake_quantize(x, spec, crowded))
print("checked", checked)
"""
)


def test_bucket_search_matches_reference_under_interpreter() -> None:
    run_interpreted(SCRIPT)


CHOICES_SCRIPT = (
    PRELUDE
    + r"""
# The opt-in launch choices (FusedChoice.independent, tables_first, programs_per_sm, l1_tables) at 4..8
# bits for every codebook data type: ordinary blocks and those of `edges` in one float32 weight long
# enough that each of the 4 persistent programs (the interpreter counts 4 multiprocessors) loops over
# several tiles of 256 values, then a masked tail launch.
small = dict(values_per_thread=4, num_warps=2, uniform_from_log2=0, packed_from_buckets=0, pairs_from_log2=0)
ind = tf.FusedChoice(independent=True, **small)
first = tf.FusedChoice(tables_first=False, **small)  # the default loads them first
persist = tf.FusedChoice(programs_per_sm=1, **small)
ind_persist = tf.FusedChoice(independent=True, programs_per_sm=1, **small)
l1 = tf.FusedChoice(l1_tables=True, **small)  # the tables read by loads, not from shared memory
ind_l1 = tf.FusedChoice(l1_tables=True, independent=True, **small)
# the int grid's search with its two tables
grid = {"uniform_from_log2": 1, "arithmetic_from_log2": 0, "computed_value_from_log2": 0}
uniform = tf.FusedChoice(**small | grid)
uniform_late = tf.FusedChoice(tables_first=False, **small | grid)
arithmetic = tf.FusedChoice(**small | {"uniform_from_log2": 1, "arithmetic_from_log2": 1})  # no tables
packed = tf.FusedChoice(**small | {"packed_from_buckets": 1})  # one word a bucket where a packed table exists
late = {"packed_from_buckets": 1, "tables_first": False, "programs_per_sm": 1}
packed_late_persist = tf.FusedChoice(**small | late)
pairs = tf.FusedChoice(**small | {"pairs_from_log2": 1, "pairs_max_buckets": 4096})  # 8-bit dynamic too
pairs_late_persist = tf.FusedChoice(**small | late | {"packed_from_buckets": 0, "pairs_from_log2": 1})
grid_value = tf.FusedChoice(**small | {"uniform_from_log2": 1, "computed_value_from_log2": 1})
for dtype, bits in itertools.product(CODEBOOKS, range(4, 9)):
    spec = QuantSpec(dtype, bits, 64)
    levels = levels_for(torch.randn(64, 64, generator=g), spec)
    x = torch.cat([torch.randn(1024, generator=g) * 0.02, edges(levels)])  # 16 whole blocks first
    choices = (ind_persist, persist) + (ind, first) * (bits % 2 == 0) + (l1, ind_l1) * (bits % 2 == 1)
    choices += (uniform, uniform_late, arithmetic, grid_value) * (dtype == "int")
    choices += (packed, packed_late_persist) + (pairs, pairs_late_persist) * (dtype != "int")
    for choice in choices:
        same(x, spec, levels, choice, codes=choice.programs_per_sm > 0)
        flags = tf._flags(x, levels, True, False, choice)
        assert flags["INDEPENDENT"] == (choice.independent and kb.bucket_pairs(levels) is not None)
        assert (flags["SEARCH"] == tf.SEARCH_BUCKET_L1.value) == choice.l1_tables
        paired = choice.pairs_from_log2 > 0 and kb.mean_pairs(levels, choice.pairs_max_buckets) is not None
        packs = choice.packed_from_buckets > 0 and kb.packed_table(levels) is not None and not paired
        assert (flags["SEARCH"] == tf.SEARCH_PACKED.value) == packs
        assert (flags["SEARCH"] == tf.SEARCH_PAIRS.value) == paired
        checked += 1
    # every table of up to MAX_PAIR_BUCKETS buckets here (all but 8-bit dynamic and quantile) has pairs
    assert kb.bucket_pairs(levels) is not None or bits == 8 and dtype in ("quantile", "dynamic")
    if bits == 8:  # the two-pass kernel (block None) with the independent lookup and the tables first
        spec = QuantSpec(dtype, bits, None)
        ind = tf.FusedChoice(independent=True, uniform_from_log2=0, packed_from_buckets=0, pairs_from_log2=0)
        same(x, spec, levels, ind, codes=False)
        if dtype == "int":
            same(x, spec, levels, tf.FusedChoice(uniform_from_log2=1), codes=False)
            two_tables = tf.FusedChoice(uniform_from_log2=1, computed_value_from_log2=0)
            same(x, spec, levels, two_tables, codes=False)
        packed_only = tf.FusedChoice(packed_from_buckets=1, uniform_from_log2=0, pairs_from_log2=0)
        same(x, spec, levels, packed_only, codes=False)
        same(x, spec, levels, tf.FusedChoice(pairs_from_log2=1, pairs_max_buckets=4096), codes=False)
        if dtype == "int":
            same(x, spec, levels, tf.FusedChoice(computed_value_from_log2=1), codes=False)
# Split blocks (FusedChoice.split_from_block): power-of-two blocks of 512 and 1024 held as [SPLIT, ROWS, 256]
# tiles (with the pair lookup, the int grid's and a persistent loop), a block that is not a power of two
# (not split), a masked tail; a NaN block (check_finite off) gives NaN's absmax and code 0.
splits = (tf.FusedChoice(split_from_block=512), tf.FusedChoice(split_from_block=512, programs_per_sm=1))
split_cases = [("nf", 8, 512), ("int", 4, 1024), ("fp", 6, 1024), ("quantile", 7, 1024), ("nf", 4, 600)]
for choice, (dtype, bits, block) in itertools.product(splits, split_cases):
    spec = QuantSpec(dtype, bits, block)
    x = torch.randn(block * 5 + 77, generator=g)
    levels = levels_for(x, spec)
    assert tf.split_of(block, choice) == (block // 256 if block in (512, 1024) else 1)
    same(x, spec, levels, choice)
    x[block + 3] = float("nan")
    out, codes, absmax = tf._launch(x, spec, levels, True, torch.uint8, choice)
    base_out, base_codes, _ = tf._launch(x, spec, levels, True, torch.uint8)
    torch.testing.assert_close(out, base_out, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(codes, base_codes) and bool(absmax[1].isnan()) and int(codes[block + 3]) == 0
    checked += 1
# The uniform search at 3 bits too (below the bucketed search's 4; the other data types' default there is
# the shared-memory binary search)
spec = QuantSpec("int", 3, 64)
levels = levels_for(torch.randn(64, 64, generator=g), spec)
same(torch.cat([torch.randn(1024, generator=g), edges(levels)]), spec, levels, uniform)
same(torch.cat([torch.randn(1024, generator=g), edges(levels)]), spec, levels, arithmetic)

# NaN and Inf blocks (check_finite off): codes and outputs equal the binary search's, absmax NaN there.
for dtype, bits in itertools.product(("int", "nf", "fp"), (4, 8)):
    x = torch.randn(40, 64, generator=g)
    x[1, 5], x[13, 7], x[34, 0] = float("nan"), float("inf"), float("-inf")
    spec = QuantSpec(dtype, bits, 64)
    levels = levels_for(torch.randn(6, 64, generator=g), spec)
    base_out, base_codes, base_absmax = tf._launch(x, spec, levels, True, torch.uint8, bucket)
    for choice in (ind_persist, persist, l1, ind_l1, packed) + (uniform, arithmetic) * (dtype == "int"):
        out, codes, absmax = tf._launch(x, spec, levels, True, torch.uint8, choice)
        torch.testing.assert_close(out, base_out, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(codes, base_codes) and torch.equal(absmax.isnan(), base_absmax.isnan())
        assert int(absmax.isnan().sum()) == 3 and codes[64 + 5] == codes[13 * 64 + 7] == 0
        checked += 1
print("checked", checked)
"""
)


def test_launch_choices_match_reference_under_interpreter() -> None:
    run_interpreted(CHOICES_SCRIPT)
