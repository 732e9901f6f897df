"""The host side of the fused quantizer's codebook tables (`kernels.triton_fused`): the bucketed search
(`SEARCH_BUCKET`): how float32 xn splits into buckets by its bits, per codebook the table of each bucket's
first code and the window of compares that finishes it, and for windows of one midpoint the per-bucket
tables of the independent lookup (`bucket_pairs`), the pair lookup's two values a bucket (`mean_pairs`)
and the packed lookup's one word a bucket (`packed_table`); the int grid's uniform search (`uniform_m`)
and its table-free form (`arithmetic_grid`);
the Eytzinger order of the shared-memory binary search; the padded values; the launch geometry (rows a
program, launches, persistent programs).
Pure torch (no Triton), so it is tested and reasoned about on its own; the kernel's `_bucket` mirrors
`bucket_index` step for step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from kernels.codebooks import Levels

BUCKET_MAX_LEVELS_LOG2 = 8  # the bucketed search takes codebooks of up to 2^8 entries (uint8 starts)
MAX_BUCKETS_LOG2 = 11  # buckets per sign: tables of <= 4096 entries (bytes), copied by every program
MAX_WINDOW = 4  # a bucketed search comparing more midpoints than this falls back to the binary search
# The independent lookup copies 12 bytes a bucket per program (held in registers: 24 per thread at 1024
# buckets and 128 threads); codebooks whose table has more buckets keep the chained lookup.
MAX_PAIR_BUCKETS = 1024
# The packed lookup copies 4 bytes a bucket per program (`packed_table`): 8 KB at most.
MAX_PACKED_BUCKETS = 2048


@dataclass(frozen=True)
class Buckets:
    """How the bucketed search splits float32 xn by its bits (`bucket_index`; in the kernel `_bucket`).

    Per sign, 2^log2_buckets buckets of |xn|: one for every 2^-mantissa_bits of each power-of-two interval
    below 1.0 (the top M mantissa bits and the exponent), one for [1, +inf], and bucket 0 for everything
    below the lowest interval the others reach. The table lists the positive buckets by rising |xn|, then
    the negative ones by rising xn (a rotation of their order by xn).
    """

    mantissa_bits: int
    log2_buckets: int

    @property
    def shift(self) -> int:
        """Bits of |xn| below the mantissa bits kept."""
        return 23 - self.mantissa_bits

    @property
    def first(self) -> int:
        """|xn|'s bits >> shift in bucket 0's lowest interval; bucket 2^log2_buckets - 2 then ends at 1.0."""
        return (127 << self.mantissa_bits) - (1 << self.log2_buckets) + 1


@dataclass(frozen=True, eq=False)
class BucketTable:
    """The bucketed search's first guess for one codebook (see `triton_search._bucket_lookup`).

    Attributes:
        buckets: the bucket geometry.
        starts: uint8 [2 x 2^log2_buckets] on the codebook's device, in `Buckets` order: per bucket,
            #(mids < its smallest float), at most 2^k - window (mids[2^k - 1] is +inf: codes stay < 2^k).
        window: J, the most midpoints between a bucket's start and any xn in it (0 <= code - start <= J).
    """

    buckets: Buckets
    starts: Tensor
    window: int


@functools.lru_cache(maxsize=64)
def host_levels(levels: Levels) -> tuple[Tensor, Tensor]:
    """(values, mids) on the host, copied in one transfer and cached per Levels object: the choices below
    all read them, and a per-tensor quantile codebook is new for every weight (on a GPU each separate
    copy is a synchronization)."""
    n = levels.values.numel()
    both = torch.cat([levels.values, levels.mids]).cpu()
    return both[:n], both[n:]


def clamped_bits(xn: Tensor, buckets: Buckets) -> Tensor:
    """The bits (int64) of each float32 |xn| clamped to [bucket 0's lowest float, 1.0], as the kernel's
    `_clamped_bits` computes them: fmin/fmax keep the number of a quiet NaN as PTX's min/max do (xn is a
    product, so its NaNs are quiet; torch's CPU fmin returns a signalling NaN), so NaN's are 1.0's."""
    low = torch.tensor(buckets.first << buckets.shift, dtype=torch.int32).view(torch.float32)
    return torch.fmax(torch.fmin(xn.abs(), torch.ones(())), low).view(torch.int32).long()


def bucket_index(xn: Tensor, buckets: Buckets) -> Tensor:
    """The kernel's bucket (`_bucket`) of each float32 xn, with the same steps."""
    local = (clamped_bits(xn, buckets) >> buckets.shift) - buckets.first
    return torch.where(xn >= 0, local, local ^ ((2 << buckets.log2_buckets) - 1))


@functools.lru_cache(maxsize=128)
def bucket_bounds(buckets: Buckets) -> tuple[Tensor, Tensor]:
    """The smallest and the largest float32 (not NaN) of each bucket, in `Buckets` order: float32
    [2 x 2^log2_buckets] each. Cached per geometry (they do not depend on a codebook; not to be
    written to)."""
    step = 1 << buckets.shift
    low = (buckets.first + torch.arange(1 << buckets.log2_buckets, dtype=torch.int64)) * step  # |xn| bits
    high = torch.cat([low[1:] - 1, torch.tensor([0x7F800000])])  # the top bucket up to +inf
    low[0] = 0  # bucket 0 from +0; -0.0 is in it (`xn >= 0`), so its negative twin ends at -2^-149

    def floats(bits: Tensor) -> Tensor:
        return bits.to(torch.int32).view(torch.float32)

    smallest = torch.cat([floats(low), -floats(high.flip(0))])
    return smallest, torch.cat([floats(high), -floats(low.clamp(min=1).flip(0))])


def _starts_and_window(mids: Tensor, buckets: Buckets) -> tuple[Tensor, int]:
    """(#(mids < each bucket's smallest float), the most mids any bucket holds below its largest float)."""
    smallest, largest = bucket_bounds(buckets)
    first, last = torch.searchsorted(mids, smallest), torch.searchsorted(mids, largest)  # #(mids < v)
    return first, int((last - first).max())


@functools.lru_cache(maxsize=1)
def _geometries() -> tuple[Buckets, ...]:
    """Every geometry a table may use, bucket 0 starting at |xn| = 0, whose buckets cover at least
    [1/2, 1] (2^M of them; fewer leave most mids in bucket 0). Cached: built for every new codebook."""
    geometries = [Buckets(m, p) for p in range(1, MAX_BUCKETS_LOG2 + 1) for m in range(p)]
    return tuple(g for g in geometries if g.first >= 0)


@functools.lru_cache(maxsize=1)
def _all_bounds() -> tuple[Tensor, Tensor, Tensor]:
    """`bucket_bounds` of every `_geometries()` entry end to end (smallest, largest), and each bucket's
    geometry (its index in the list)."""
    bounds = [bucket_bounds(g) for g in _geometries()]
    owner = torch.cat([torch.full((len(low),), i) for i, (low, _) in enumerate(bounds)])
    return torch.cat([low for low, _ in bounds]), torch.cat([high for _, high in bounds]), owner


def _windows(mids: Tensor) -> dict[Buckets, int]:
    """`_starts_and_window`'s window of every geometry, in two searches over all their buckets at once
    (one pair of searches a geometry was ~10 ms a codebook, paid for every weight of a per-tensor
    quantile codebook)."""
    smallest, largest, owner = _all_bounds()
    held = torch.searchsorted(mids, largest) - torch.searchsorted(mids, smallest)
    most = torch.zeros(int(owner[-1]) + 1, dtype=held.dtype).scatter_reduce(0, owner, held, "amax")
    return dict(zip(_geometries(), most.tolist(), strict=True))


@functools.lru_cache(maxsize=64)
def bucket_table(levels: Levels) -> BucketTable | None:
    """The bucket table with the smallest window, then the fewest entries, for these levels.

    None if every table of at most 2 x 2^MAX_BUCKETS_LOG2 entries needs a window over MAX_WINDOW (e.g.
    a quantile codebook with many equal values). Cached per Levels object, as `eytzinger_mids` is; the
    choice reads the mids on the host (`host_levels`: one device-to-host copy per new codebook, shared by
    every choice).
    """
    mids = host_levels(levels)[1]
    windows = _windows(mids)
    buckets = min(windows, key=lambda g: (windows[g], g.log2_buckets, g.mantissa_bits))
    window = windows[buckets]
    if window > MAX_WINDOW:
        return None
    starts = _starts_and_window(mids, buckets)[0].clamp(max=mids.numel() - window)
    return BucketTable(buckets, starts.to(torch.uint8).to(levels.mids.device), window)


@dataclass(frozen=True, eq=False)
class BucketPairs:
    """Per-bucket tables of the independent lookup (window 1; see `triton_search._bucket_lookup`).

    With one midpoint in the window, code = start + (mids[start] < xn), so every table the lookup reads
    can be indexed by the bucket: no gather waits for another.

    Attributes:
        starts: `BucketTable.starts`.
        mids: float32 [2 x 2^log2_buckets]: mids[start[b]], the reference's own compare operand.
        values: int64 [2 x 2^log2_buckets]: the float32 bits of values[start[b]] (low 32 bits) and of
            values[start[b] + 1] (high 32 bits; +inf past the last value, which only a +inf midpoint can
            lead to, and it never does).
    """

    starts: Tensor
    mids: Tensor
    values: Tensor


def _float_bits(v: Tensor) -> Tensor:
    return v.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def pair_floats(words: Tensor) -> tuple[Tensor, Tensor]:
    """(low, high) float32 of int64 pair words (`_value_pairs`: values[start] in the low 32 bits)."""
    low = words.to(torch.int32).view(torch.float32)  # the low 32 bits (a truncating cast)
    return low, (words >> 32).to(torch.int32).view(torch.float32)


@functools.lru_cache(maxsize=64)
def bucket_pairs(levels: Levels) -> BucketPairs | None:
    """The independent lookup's tables for these levels; None where `bucket_table` has none, its window
    is over one midpoint, or it has more than MAX_PAIR_BUCKETS buckets. Cached per Levels object."""
    table = bucket_table(levels)
    if table is None or table.window != 1 or table.starts.numel() > MAX_PAIR_BUCKETS:
        return None
    starts = table.starts.long()
    return BucketPairs(table.starts, levels.mids[starts].contiguous(), _value_pairs(levels, starts))


def _value_pairs(levels: Levels, starts: Tensor) -> Tensor:
    """int64 per bucket: values[start] in the low 32 bits, values[start + 1] in the high ones (+inf past
    the last value: then mids[start] is +inf padding, and the pair lookup's computed midpoint is +inf too,
    so xn > 1 by an ulp still takes values[start])."""
    last = levels.values.numel() - 1
    low = _float_bits(levels.values[starts.clamp(max=last)])
    beyond = torch.full_like(levels.values[:1], float("inf"))
    high = _float_bits(torch.cat([levels.values, beyond])[(starts + 1).clamp(max=last + 1)])
    return low | (high << 32)  # << wraps


def mids_are_means(levels: Levels) -> bool:
    """Whether each midpoint between two values is the kernel's float32 (values[j] + values[j + 1]) * 0.5
    (an add and a multiply, each rounded; no subnormal result). `levels_from_value_rows` rounds the exact
    mean once, which is the same float wherever the sum is exact in float64: the pair lookup checks it."""
    values, mids = host_levels(levels)
    means = (values[:-1] + values[1:]) * 0.5
    normal = (means == 0) | (means.abs() >= torch.finfo(torch.float32).tiny)
    return bool(torch.equal(means, mids[: means.numel()]) and normal.all())


@dataclass(frozen=True, eq=False)
class MeanPairs:
    """The pair lookup's table (`triton_search._pair_lookup`) for one codebook: one 64-bit read a value.

    Where the window is one midpoint and every midpoint is the float32 mean of its neighbours
    (`mids_are_means`), a bucket's pair (values[start], values[start + 1]) is all it needs: the midpoint
    between them is computed, so value = high if (low + high) * 0.5 < xn else low, with the reference's
    own compare. The code, where it is stored, is starts[bucket] + that compare.

    Attributes:
        buckets: `BucketTable.buckets`.
        starts: `BucketTable.starts` (read only where codes are stored).
        values: int64 [2 x 2^log2_buckets], `Buckets` order (as `BucketPairs.values`).
    """

    buckets: Buckets
    starts: Tensor
    values: Tensor


@functools.lru_cache(maxsize=64)
def mean_pairs(levels: Levels, max_buckets: int = MAX_PAIR_BUCKETS) -> MeanPairs | None:
    """The pair lookup's table for these levels; None where `bucket_table` has none, its window is over
    one midpoint, it has more than max_buckets buckets (both signs; 8 bytes each a program) or the
    midpoints are not the computed means. Cached per Levels object."""
    table = bucket_table(levels)
    if table is None or table.window != 1 or table.starts.numel() > max_buckets:
        return None
    if not mids_are_means(levels):
        return None
    return MeanPairs(table.buckets, table.starts, _value_pairs(levels, table.starts.long()))


def pair_values(xn: Tensor, levels: Levels, max_buckets: int = MAX_PAIR_BUCKETS) -> tuple[Tensor, Tensor]:
    """(#(mids < xn), values[code]) of each float32 xn as the pair lookup computes them (`_pair_lookup`,
    step for step). For tests; `mean_pairs` must exist for the levels."""
    table = mean_pairs(levels, max_buckets)
    assert table is not None
    bucket = bucket_index(xn, table.buckets)
    low, high = pair_floats(table.values.cpu()[bucket])
    above = (low + high) * 0.5 < xn
    return table.starts.cpu().long()[bucket] + above.long(), torch.where(above, high, low)


PACKED_START_SHIFT = 24  # a packed word: the bucket's start code in bits 24..31, its threshold below


def bucket_key(xn: Tensor, buckets: Buckets) -> Tensor:
    """Each float32 xn's key inside its bucket: the bits of |xn| clamped as `bucket_index` clamps it, below
    the bucket's (its low `shift` bits), flipped for negative xn, so that it rises with xn in every bucket
    (int64; `_packed_words` finds the thresholds with it)."""
    mask = (1 << buckets.shift) - 1
    low_bits = clamped_bits(xn, buckets) & mask
    return torch.where(xn >= 0, low_bits, low_bits ^ mask)


@dataclass(frozen=True, eq=False)
class PackedTable:
    """The packed lookup's table (`triton_search._packed_lookup`) for one codebook.

    Attributes:
        buckets: its bucket geometry (not always `bucket_table`'s: see `packed_table`).
        words: int32 [2 x 2^log2_buckets] on the codebook's device, the positive buckets by rising |xn|,
            then the negative ones by rising |xn| (`packed_index`, not `Buckets` order): per bucket its
            start code, #(mids < its smallest float), << PACKED_START_SHIFT | its threshold (`_packed_words`).
    """

    buckets: Buckets
    words: Tensor


def packed_index(xn: Tensor, buckets: Buckets) -> tuple[Tensor, Tensor, Tensor]:
    """(word index, |xn|'s low bits, negative) of each float32 xn as `_packed_lookup` computes them: |xn|
    clamped as `bucket_index` clamps it, its bucket by rising |xn| (+ 2^log2_buckets where not xn >= 0,
    NaN included), the clamped |xn|'s bits below the bucket's."""
    bits = clamped_bits(xn, buckets)
    negative = ~(xn >= 0)
    index = (bits >> buckets.shift) - buckets.first + negative.long() * (1 << buckets.log2_buckets)
    return index, bits & ((1 << buckets.shift) - 1), negative


def _packed_words(mids: Tensor, buckets: Buckets) -> Tensor | None:
    """The packed words of one geometry (`PackedTable.words`), or None where it has a window over one
    midpoint or the clamp of |xn| into bucket 0 gives floats on both sides of mids[start] one key.

    In each bucket the key `bucket_key` rises with xn; t is the least key of the bucket's floats above
    mids[start] (0: all are, 2^shift: none is), so xn > mids[start] exactly when key >= t. The kernel
    compares |xn|'s low bits instead: for a negative bucket key = mask - low, so key >= t exactly when
    not low >= mask + 1 - t, and the word holds mask + 1 - t there (the kernel flips the compare).
    """
    starts, window = _starts_and_window(mids, buckets)
    if window > 1:
        return None
    smallest, largest = bucket_bounds(buckets)
    mid = mids[starts]
    # Within a bucket, the largest float <= mid (mid itself where it lies inside) and the next one up.
    below = torch.where(mid >= largest, largest, mid)
    above = torch.where(mid < smallest, smallest, torch.nextafter(mid, torch.tensor(float("inf"))))
    has_below, has_above = mid >= smallest, mid < largest
    key_below, key_above = bucket_key(below, buckets), bucket_key(above, buckets)
    if bool((has_below & has_above & (key_above <= key_below)).any()):
        return None
    t = torch.where(has_above, torch.where(has_below, key_below + 1, 0), 1 << buckets.shift)
    half = 1 << buckets.log2_buckets  # Buckets order -> packed order: the negative buckets reversed
    t = torch.cat([t[:half], (1 << buckets.shift) - t[half:].flip(0)])
    return (torch.cat([starts[:half], starts[half:].flip(0)]) << PACKED_START_SHIFT) | t


@functools.lru_cache(maxsize=64)
def packed_table(levels: Levels) -> PackedTable | None:
    """The packed lookup's table with the fewest buckets for these levels, or None (no geometry of at most
    MAX_PACKED_BUCKETS buckets has a window of one midpoint and no clamped key on both sides of one).

    One table read gives what the bucketed search reads from two tables (the start, then the midpoint),
    and a compare of integers replaces the float compare: within a bucket the key rises with xn, so
    key >= t exactly when xn > mids[start] (t = 0: every float of the bucket is above it; t = 2^shift:
    none is). The clamp puts every |xn| below bucket 0's lowest float on that float's key, so a geometry
    whose bucket 0 holds a midpoint below it is skipped (the bucketed search's table may have one).
    Cached per Levels object; reads the mids on the host, as `bucket_table` does.
    """
    if levels.mids.numel() > 1 << BUCKET_MAX_LEVELS_LOG2:
        return None
    mids = host_levels(levels)[1]
    windows = _windows(mids)
    for buckets in sorted(windows, key=lambda g: (g.log2_buckets, g.mantissa_bits)):
        if windows[buckets] > 1 or 2 << buckets.log2_buckets > MAX_PACKED_BUCKETS:
            continue
        words = _packed_words(mids, buckets)
        if words is not None:  # start >= 128 wraps to a negative int32, as the kernel reads it
            words32 = words.to(torch.uint32).view(torch.int32)
            return PackedTable(buckets, words32.to(levels.mids.device))
    return None


def packed_codes(xn: Tensor, levels: Levels) -> Tensor:
    """#(mids < xn) as the packed lookup computes it (`_packed_lookup`, step for step): the bucket's word,
    then start + ((low >= t) xor negative). For tests; `packed_table` must exist for the levels."""
    table = packed_table(levels)
    assert table is not None
    index, low_bits, negative = packed_index(xn, table.buckets)
    word = table.words.cpu()[index].long() & 0xFFFFFFFF
    start, t = word >> PACKED_START_SHIFT, word & ((1 << PACKED_START_SHIFT) - 1)
    return start + ((low_bits >= t) ^ negative).long()


@functools.lru_cache(maxsize=16)
def _eytzinger_order(log2_levels: int) -> Tensor:
    """Sorted index of each node 1..2^k - 1 of a complete binary search tree, level by level, after the
    +inf padding entry (index 2^k - 1) at position 0, which the search never reads."""
    nodes = torch.arange(1, 1 << log2_levels)  # node i: level = bit length - 1, position = the rest
    level = torch.floor(torch.log2(nodes.double())).long()
    position = nodes - (1 << level)
    return torch.cat([nodes[-1:], (2 * position + 1) * (1 << (log2_levels - 1 - level)) - 1])


@functools.lru_cache(maxsize=64)
def eytzinger_mids(levels: Levels) -> Tensor:
    """levels.mids in the order `triton_search._nearest_code_shared` reads them (the +inf padding first).

    Cached per Levels object, as static levels are; levels must not be modified after the first call.
    """
    log2_levels = levels.mids.numel().bit_length() - 1
    return levels.mids[_eytzinger_order(log2_levels).to(levels.mids.device)]


UNIFORM_TOLERANCE = 1e-6  # how far a uniform codebook's float32 midpoints may lie from their rationals


@functools.lru_cache(maxsize=64)
def uniform_m(levels: Levels) -> int | None:
    """m when the codebook is the int grid (j - m) / m, j = 0..2m, with m = 2^(k-1) - 1 for its 2^k padded
    midpoints, each within UNIFORM_TOLERANCE of (2j + 1 - 2m) / 2m, the padding +inf; else None.

    Then the uniform search (`triton_search._uniform_lookup`, `uniform_codes`) finds a code by arithmetic and
    one compare: its guess can be one off only where xn lies near a value, half a step from any midpoint.
    Cached per Levels object (reads the mids on the host, as `bucket_table` does).
    """
    mids = host_levels(levels)[1].double()
    m = (1 << (mids.numel().bit_length() - 2)) - 1
    if m < 1 or levels.values.numel() != 2 * m + 1:
        return None
    rational = (2 * torch.arange(2 * m, dtype=torch.float64) + 1 - 2 * m) / (2 * m)
    close = bool((mids[: 2 * m] - rational).abs().max() <= UNIFORM_TOLERANCE)
    return m if close and bool(torch.isinf(mids[2 * m :]).all()) else None


def grid_index(xn: Tensor, m: int) -> Tensor:
    """xn's index among the int grid's midpoints, rounded, as the kernel's `_grid_index` computes it:
    t = xn * m + m in float32 (a multiply, then an add), clamped to [0, 2m] (NaN to 0), j = trunc(t)
    (= floor(t)); int64."""
    t = xn.float() * m + m
    t = torch.where(t > 0, t, 0.0)
    return torch.where(t < 2 * m, t, float(2 * m)).long()


def uniform_codes(xn: Tensor, m: int, mids: Tensor) -> Tensor:
    """#(mids < xn) as the uniform search computes it (the kernel's `_uniform_lookup`, step for step):
    j = `grid_index`, then j + (mids[j] < xn)."""
    j = grid_index(xn, m)
    return j + (mids[j] < xn).long()


def grid_values(j: Tensor, m: int) -> Tensor:
    """The int grid's value (j - m) / m in float32 for integer-valued float32 j, IEEE-rounded once."""
    return (j - m) / torch.tensor(float(m), dtype=torch.float32)


def _round32(exact: Fraction) -> float:
    """`exact` rounded to the nearest float32 (ties to even), as a float."""
    near = torch.tensor(float(exact), dtype=torch.float32)
    pick = [torch.nextafter(near, torch.tensor(s * math.inf)) for s in (-1.0, 1.0)] + [near]
    key = lambda c: (abs(Fraction(float(c)) - exact), int(c.view(torch.int32)) & 1)  # noqa: E731
    return float(min(pick, key=key))


def _markstein(a: int, m: int) -> float:
    """`triton_search._grid_value` of a / m in exact rationals: q = a * r, q + (a - q * m) * r, each
    operation (the product, then the two FMAs) rounded once to float32, r = 1 / m rounded."""
    r = Fraction(_round32(Fraction(1, m)))
    q = Fraction(_round32(a * r))
    remainder = Fraction(_round32(a - q * m))
    return _round32(remainder * r + q)


@functools.lru_cache(maxsize=64)
def arithmetic_grid(levels: Levels) -> int | None:
    """m where the kernel can compute the int grid's tables without reading them
    (`triton_search._arithmetic_lookup`, mirrored by `arithmetic_codes`): each float32 value is
    (j - m) / m rounded once, each midpoint (values[j] + values[j + 1]) * 0.5 in float32, and the kernel's
    three-instruction quotient (`_markstein`) gives exactly those values for every numerator it meets
    (-m .. m + 1); else None.

    Checked entry by entry, not assumed: the codebook's values come from float64 and are cast once, its
    midpoints are float32 sums, and the quotient is exact only where the remainder step corrects it; the
    int grids of 2-8 bits pass (a test), any other construction must pass here.
    """
    m = uniform_m(levels)
    if m is None:
        return None
    quotients = torch.tensor([_markstein(a, m) for a in range(-m, m + 2)], dtype=torch.float32)
    values = grid_values(torch.arange(2 * m + 2, dtype=torch.float32), m)
    mids = (values[:-2] + values[1:-1]) * 0.5
    as_bits = lambda t: t.float().cpu().contiguous().view(torch.int32)  # noqa: E731
    exact = torch.equal(as_bits(quotients), as_bits(values))
    held_values, held_mids = host_levels(levels)
    exact = exact and torch.equal(as_bits(held_values), as_bits(values[:-1]))
    return m if exact and torch.equal(as_bits(held_mids[: 2 * m]), as_bits(mids)) else None


def arithmetic_codes(xn: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(#(mids < xn), values[code]) of the int grid as `_arithmetic_lookup` computes them, step for step:
    j = `grid_index`, values[j] and values[j + 1] by `grid_values`, their midpoint, one compare (none at
    j = 2m, whose midpoint is the +inf padding). The IEEE quotient stands for the kernel's
    (`arithmetic_grid` proved them equal for this grid)."""
    j = grid_index(xn, m)
    low, high = grid_values(j.float(), m), grid_values(j.float() + 1, m)
    above = ((low + high) * 0.5 < xn) & (j < 2 * m)
    return j + above.long(), torch.where(above, high, low)


@functools.lru_cache(maxsize=64)
def padded_values(levels: Levels) -> Tensor:
    """levels.values padded with its last value to levels.mids.numel() entries (the chain reads them all)."""
    values, size = levels.values, levels.mids.numel()
    return torch.cat([values, values[-1:].expand(size - values.numel())]) if values.numel() < size else values


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_absmax(flat: Tensor, block: int) -> Tensor:
    """float32 absmax of each block of a flat tensor (tail block included); NaN/Inf propagate."""
    n = flat.numel()
    n_full = n // block
    parts = []
    if n_full:
        lo, hi = torch.aminmax(flat[: n_full * block].view(n_full, block), dim=1)
        parts.append(torch.maximum(-lo, hi))
    if n_full * block < n:
        lo, hi = torch.aminmax(flat[n_full * block :])
        parts.append(torch.maximum(-lo, hi).reshape(1))
    return torch.cat(parts).to(torch.float32)


def fused_config(block: int, n_blocks: int, values_per_thread: int, num_warps: int) -> tuple[int, int]:
    """(rows per program, num_warps) of the one-pass kernel for this block size."""
    block_p2 = _next_power_of_2(block)
    tile = values_per_thread * 32 * num_warps
    rows = max(1, min(tile // block_p2, _next_power_of_2(n_blocks)))
    return rows, num_warps if rows * block_p2 >= tile else 4


def fused_launches(n: int, block: int, rows: int) -> list[tuple[int, int, bool]]:
    """(first row, programs, masked) per launch: programs of whole blocks run unmasked, the rest masked."""
    n_blocks = math.ceil(n / block)
    if block != _next_power_of_2(block):
        return [(0, _cdiv(n_blocks, rows), True)]
    whole = n // (rows * block)
    launches = [(0, whole, False)] if whole else []
    if whole * rows < n_blocks:
        launches.append((whole * rows, _cdiv(n_blocks - whole * rows, rows), True))
    return launches


def persistent_programs(kernel: Any, num_warps: int, per_sm: int) -> int:
    """Programs of a persistent launch: per_sm a streaming multiprocessor, at most as many as it holds at
    once (registers, shared memory, threads), so none waits for another to finish its loop. A CPU
    (interpreter) counts as 4 multiprocessors, so the test loops run over a few tiles."""
    if kernel is None:
        return 4 * per_sm
    _ = kernel.run  # loads the binary, which sets n_regs
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    warp_regs = -(-kernel.n_regs * 32 // 256) * 256  # registers are allocated 256 to a warp at a time
    held = min(
        getattr(props, "regs_per_multiprocessor", 65536) // (warp_regs * num_warps),
        props.max_threads_per_multi_processor // (32 * num_warps),
        getattr(props, "shared_memory_per_multiprocessor", 233472) // (kernel.metadata.shared + 1024),
    )
    return props.multi_processor_count * max(1, min(per_sm, held))
