"""The nearest-code searches of the fused quantizer (`kernels.triton_fused`): Triton device functions
that return (#(mids < xn), codebook[code]) for a program's normalized values, every one with the
reference's own float32 compares, so every search gives the same codes bit for bit.

The nearest code, #(mids < xn), is found by a branchless binary search: k probes for 2^k (padded)
entries, each one of the reference's own float32 compares (see `_nearest`). The top two levels are scalar
loads; below them the probes and the value lookup read a per-program copy of the codebook that tl.gather
keeps in shared memory (k <= 8; midpoints sorted up to 2^5 entries, in Eytzinger order above that so a
level's probes do not collide in one bank); larger codebooks (up to 2^16) are read from global memory.
`FusedChoice` also offers a compare-select chain over midpoints held in registers (no lookups at all),
which costs 2 x (2^k - 1) instructions per value, and for large codebooks a bucketed search: a table
indexed by xn's sign, exponent and top mantissa bits gives the code of the bucket's lowest float, and one
to four compares finish it (see `_bucket_lookup`; the default from 4 bits, in programs of twice the values
from 6). The int grid (j - m) / m needs no bucket table: arithmetic on xn gives the one midpoint to
compare (`_uniform_lookup`, the default for int at every bit width; at 8 bits the compared midpoint is
read and the value computed, `_grid_value_lookup`). Where a codebook's midpoints are the float32 means of
their neighbours, one 64-bit read of the bucket's value pair finishes the bucketed search: the midpoint
between the two is computed (`_pair_lookup`, the default from 4 bits). Opt-in: the int grid without any
table where the codebook's floats are exactly the computed quotients (`_arithmetic_lookup`), per-bucket
tables read in independent gathers, tables read through L1, tables loaded after the weights, persistent
programs. Fixed choices, compared by the benchmark, no autotuning.
"""

from __future__ import annotations

import triton
import triton.language as tl

SEARCH_CHAIN, SEARCH_SHARED, SEARCH_GLOBAL = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
SEARCH_BUCKET, SEARCH_BUCKET_L1 = tl.constexpr(3), tl.constexpr(4)  # the latter: `FusedChoice.l1_tables`
SEARCH_UNIFORM = tl.constexpr(5)  # the int grid (`FusedChoice.uniform_from_log2`)
SEARCH_PACKED = tl.constexpr(6)  # one word a bucket: start and threshold (`FusedChoice.packed_from_buckets`)
SEARCH_ARITHMETIC = tl.constexpr(7)  # the int grid without tables (`FusedChoice.arithmetic_from_log2`)
# one 64-bit value pair a bucket, the midpoint computed (`FusedChoice.pairs_from_log2`)
SEARCH_PAIRS = tl.constexpr(8)
# the int grid: its midpoint read, its value computed (`FusedChoice.computed_value_from_log2`)
SEARCH_GRID_VALUE = tl.constexpr(9)
PACKED_START_SHIFT = tl.constexpr(24)  # `buckets.PACKED_START_SHIFT`: the start's bits, t's below
PACKED_T_MASK = tl.constexpr((1 << 24) - 1)
EYTZINGER_FROM_LOG2 = tl.constexpr(6)  # the shared-memory search reads larger codebooks in Eytzinger order


@triton.jit
def _first_two_levels(xn, mids_ptr, LOG2_LEVELS: tl.constexpr):
    # The search's first two levels over sorted midpoints: at most three fixed midpoints, scalar loads
    # and a select, no gather.
    top = 1 << (LOG2_LEVELS - 1)
    code = tl.where(tl.load(mids_ptr + (top - 1)) < xn, top, 0)
    if LOG2_LEVELS >= 2:
        quarter = top // 2
        low = tl.load(mids_ptr + (quarter - 1))
        high = tl.load(mids_ptr + (top + quarter - 1))
        code = tl.where(tl.where(code == 0, low, high) < xn, code + quarter, code)
    return code


@triton.jit
def _nearest_code(xn, mids_ptr, LOG2_LEVELS: tl.constexpr):
    # #(mids < xn) over 2^LOG2_LEVELS sorted midpoints padded with +inf: exactly LOG2_LEVELS probes.
    code = _first_two_levels(xn, mids_ptr, LOG2_LEVELS)
    for s in tl.static_range(2, LOG2_LEVELS):
        half = 1 << (LOG2_LEVELS - 1 - s)
        probe = tl.load(mids_ptr + code + (half - 1))
        code = tl.where(probe < xn, code + half, code)
    return code


@triton.jit
def _nearest_code_shared(xn, table_ptr, LOG2_LEVELS: tl.constexpr):
    # `_nearest_code`'s search on a 1-D xn, with the probes below the first two levels read from a copy of
    # the table that tl.gather keeps in shared memory (32-bit addresses, no L1 tag lookups).
    table = tl.load(table_ptr + tl.arange(0, 1 << LOG2_LEVELS))
    if LOG2_LEVELS <= EYTZINGER_FROM_LOG2 - 1:  # sorted midpoints: up to 32 words, one per bank
        code = _first_two_levels(xn, table_ptr, LOG2_LEVELS)
        for s in tl.static_range(2, LOG2_LEVELS):
            half = 1 << (LOG2_LEVELS - 1 - s)
            code = tl.where(tl.gather(table, code + (half - 1), 0) < xn, code + half, code)
    else:
        # Sorted, one level's probes are 2^(k-s) words apart, in one bank. So the midpoints' complete
        # binary search tree is stored level by level from index 1 (Eytzinger order: node i has
        # children 2i and 2i + 1; see `eytzinger_mids`), a level's nodes side by side in different
        # banks. Going right past node m means m < xn, and then so is every node of m's left subtree
        # (all <= m); going left means m >= xn, and so is every node of its right subtree. After k
        # levels, node - 2^k counts the midpoints below xn exactly.
        node = tl.where(tl.load(table_ptr + 1) < xn, 3, 2)
        probe = tl.where(node == 2, tl.load(table_ptr + 2), tl.load(table_ptr + 3))
        node = 2 * node + (probe < xn).to(tl.int32)
        for _ in tl.static_range(2, LOG2_LEVELS):
            node = 2 * node + (tl.gather(table, node, 0) < xn).to(tl.int32)
        code = node - (1 << LOG2_LEVELS)
    return code


@triton.jit
def _clamped_bits(xn, BUCKET_SHIFT: tl.constexpr, BUCKET_FIRST: tl.constexpr):
    # The int32 bits of |xn| clamped to [bucket 0's lowest float, 1.0] (`buckets.clamped_bits` is the
    # torch mirror). min and max keep the number of a NaN (PTX min/max, minnumf): NaN's are 1.0's.
    low = tl.full([], BUCKET_FIRST << BUCKET_SHIFT, tl.int32).to(tl.float32, bitcast=True)
    return tl.maximum(tl.minimum(tl.abs(xn), 1.0), low).to(tl.int32, bitcast=True)


@triton.jit
def _bucket(xn, BUCKET_SHIFT: tl.constexpr, BUCKET_FIRST: tl.constexpr, BUCKET_LOG2: tl.constexpr):
    # xn's bucket (see `kernels.buckets.Buckets`; `buckets.bucket_index` is the torch mirror). A float's
    # bits rise with it, so clamped to [bucket 0's lowest float, 1.0], |xn|'s bits >> SHIFT (exponent and
    # top mantissa bits) minus FIRST count the buckets below. min and max keep the number of a NaN (PTX
    # min/max, minnumf), so NaN goes to the top bucket; `xn >= 0` is false for it, so it takes the negative
    # top bucket, whose start is 0: NaN's code, as compares say. Negative xn: the bits flipped, table order
    # (2P - 1 - local).
    local = (_clamped_bits(xn, BUCKET_SHIFT, BUCKET_FIRST) >> BUCKET_SHIFT) - BUCKET_FIRST
    return tl.where(xn >= 0, local, local ^ ((2 << BUCKET_LOG2) - 1))


@triton.jit
def _sorted_tables(mids_ptr, values_ptr, LOG2_LEVELS: tl.constexpr):
    # The sorted midpoints and the (padded) values, each 2^LOG2_LEVELS entries, for tl.gather.
    mids = tl.load(mids_ptr + tl.arange(0, 1 << LOG2_LEVELS))
    return mids, tl.load(values_ptr + tl.arange(0, 1 << LOG2_LEVELS))


@triton.jit
def _bucket_tables(
    starts_ptr, mids_ptr, values_ptr, LOG2_LEVELS: tl.constexpr, BUCKET_LOG2: tl.constexpr,
    INDEPENDENT: tl.constexpr,
):  # fmt: skip
    # The bucketed search's tables (tl.gather copies each into shared memory where it is read): the starts
    # and, INDEPENDENT, each bucket's midpoint and value pair, else the sorted mids and the values.
    buckets = tl.arange(0, 2 << BUCKET_LOG2)
    starts = tl.load(starts_ptr + buckets)
    if INDEPENDENT:
        mids = tl.load(mids_ptr + buckets)
        values = tl.load(values_ptr + buckets)
    else:
        mids, values = _sorted_tables(mids_ptr, values_ptr, LOG2_LEVELS)
    return starts, mids, values


@triton.jit
def _packed_tables(words_ptr, values_ptr, LOG2_LEVELS: tl.constexpr, BUCKET_LOG2: tl.constexpr):
    # The packed lookup's words (one a bucket) and the (padded) values, for tl.gather.
    words = tl.load(words_ptr + tl.arange(0, 2 << BUCKET_LOG2))
    return words, tl.load(values_ptr + tl.arange(0, 1 << LOG2_LEVELS))


@triton.jit
def _pair_tables(starts_ptr, values_ptr, BUCKET_LOG2: tl.constexpr):
    # The pair lookup's starts (gathered only where codes are stored; unused, the load is dead code) and
    # value pairs, for tl.gather.
    buckets = tl.arange(0, 2 << BUCKET_LOG2)
    return tl.load(starts_ptr + buckets), tl.zeros([1], tl.float32), tl.load(values_ptr + buckets)


@triton.jit
def _tables_first(
    starts_ptr, mids_ptr, values_ptr, LOG2_LEVELS: tl.constexpr, SEARCH: tl.constexpr,
    BUCKET_LOG2: tl.constexpr, INDEPENDENT: tl.constexpr, TABLES_FIRST: tl.constexpr,
):  # fmt: skip
    # TABLES_FIRST: the bucketed search's tables, loaded before the weights so that their latency hides
    # behind the weights'. Else placeholders: the searches load their tables where they use them.
    if SEARCH == SEARCH_BUCKET and TABLES_FIRST:
        starts, mids, values = _bucket_tables(
            starts_ptr, mids_ptr, values_ptr, LOG2_LEVELS, BUCKET_LOG2, INDEPENDENT
        )  # fmt: skip
    elif (SEARCH == SEARCH_UNIFORM or SEARCH == SEARCH_GRID_VALUE) and TABLES_FIRST:  # noqa: SIM109
        starts = tl.zeros([1], tl.uint8)
        mids, values = _sorted_tables(mids_ptr, values_ptr, LOG2_LEVELS)
    elif SEARCH == SEARCH_PACKED and TABLES_FIRST:
        starts = tl.zeros([1], tl.uint8)
        mids, values = _packed_tables(mids_ptr, values_ptr, LOG2_LEVELS, BUCKET_LOG2)
    elif SEARCH == SEARCH_PAIRS and TABLES_FIRST:
        starts, mids, values = _pair_tables(starts_ptr, values_ptr, BUCKET_LOG2)
    else:
        starts, mids, values = tl.zeros([1], tl.uint8), tl.zeros([1], tl.float32), tl.zeros([1], tl.float32)
    return starts, mids, values


@triton.jit
def _bucket_lookup(
    xn, starts, mids, values, values_ptr, LOG2_LEVELS: tl.constexpr, BUCKET_SHIFT: tl.constexpr,
    BUCKET_FIRST: tl.constexpr, BUCKET_LOG2: tl.constexpr, WINDOW: tl.constexpr, INDEPENDENT: tl.constexpr,
    TABLES_FIRST: tl.constexpr,
):  # fmt: skip
    # (#(mids < xn), values[code]) over sorted mids: the starts table gives start = #(mids below xn's
    # bucket) (clamped to at most 2^k - WINDOW), and at most WINDOW mids lie between it and xn
    # (`bucket_table` computes both from the mids), so WINDOW of the reference's own compares count the
    # rest, then values[code]: gathers that each wait for the last. INDEPENDENT (a window of one): the
    # same compare, mids[start] < xn, and values[start] or values[start + 1], from per-bucket tables
    # (`bucket_pairs`), all indexed by the bucket. The value pair is one int64 gather (one 64-bit shared
    # load, its halves two registers) rather than two float32 ones: one load and address less a value.
    # Without TABLES_FIRST the values are loaded after the search, as the default search does.
    bucket = _bucket(xn, BUCKET_SHIFT, BUCKET_FIRST, BUCKET_LOG2)
    if INDEPENDENT:
        above = tl.gather(mids, bucket, 0) < xn
        pair = tl.gather(values, bucket, 0)
        value = tl.where(above, (pair >> 32).to(tl.int32), pair.to(tl.int32)).to(tl.float32, bitcast=True)
        code = tl.gather(starts, bucket, 0).to(tl.int32) + above.to(tl.int32)
    else:
        start = tl.gather(starts, bucket, 0).to(tl.int32)
        code = start
        for j in tl.static_range(WINDOW):
            code += (tl.gather(mids, start + j, 0) < xn).to(tl.int32)
        if TABLES_FIRST:
            value = tl.gather(values, code, 0)
        else:
            value = tl.gather(tl.load(values_ptr + tl.arange(0, 1 << LOG2_LEVELS)), code, 0)
    return code, value


@triton.jit
def _bucket_lookup_l1(
    xn, starts_ptr, mids_ptr, values_ptr, BUCKET_SHIFT: tl.constexpr, BUCKET_FIRST: tl.constexpr,
    BUCKET_LOG2: tl.constexpr, WINDOW: tl.constexpr, INDEPENDENT: tl.constexpr,
):  # fmt: skip
    # `_bucket_lookup`'s compares and results, its tables read by plain loads (L1) instead of gathers from
    # shared memory. INDEPENDENT: three loads indexed by the bucket, none waiting for another.
    bucket = _bucket(xn, BUCKET_SHIFT, BUCKET_FIRST, BUCKET_LOG2)
    if INDEPENDENT:
        above = tl.load(mids_ptr + bucket) < xn
        pair = tl.load(values_ptr + bucket)
        value = tl.where(above, (pair >> 32).to(tl.int32), pair.to(tl.int32)).to(tl.float32, bitcast=True)
        code = tl.load(starts_ptr + bucket).to(tl.int32) + above.to(tl.int32)
    else:
        start = tl.load(starts_ptr + bucket).to(tl.int32)
        code = start
        for j in tl.static_range(WINDOW):
            code += (tl.load(mids_ptr + start + j) < xn).to(tl.int32)
        value = tl.load(values_ptr + code)
    return code, value


@triton.jit
def _grid_index(xn, LOG2_LEVELS: tl.constexpr):
    # xn's index among the int grid's 2M midpoints, rounded (`buckets.grid_index` is the torch mirror):
    # t = xn * M + M, clamped to [0, 2M] (max.f32 and min.f32 take NaN to 0), truncated (= floored).
    M: tl.constexpr = (1 << (LOG2_LEVELS - 1)) - 1
    t = xn * M + M
    return tl.minimum(tl.maximum(t, 0.0), 2.0 * M).to(tl.int32)


@triton.jit
def _uniform_lookup(xn, mids, values, LOG2_LEVELS: tl.constexpr):
    # (#(mids < xn), values[code]) for the int grid (j - M) / M (`buckets.uniform_codes` is the torch
    # mirror): xn sits at index t - 1/2 among the midpoints, t = xn * M + M, so every midpoint below
    # j = floor(t) is below xn and every one above it above xn (half a step of margin against float32's
    # error in t); one of the reference's compares settles midpoint j. Clamped to [0, 2M], t >= 0 and its
    # truncation is its floor: a multiply, an add (never fused: `COMPILE_OPTIONS`), max, min and one
    # conversion. NaN: t -> 0, code 0 (as compares).
    j = _grid_index(xn, LOG2_LEVELS)
    code = j + (tl.gather(mids, j, 0) < xn).to(tl.int32)
    return code, tl.gather(values, code, 0)


@triton.jit
def _grid_divisor(M: tl.constexpr):
    # (m, 1 / m rounded) as float32 for `_grid_value`: once a program.
    m = tl.full([], M, tl.float32)
    return m, tl.div_rn(tl.full([], 1.0, tl.float32), m)


@triton.jit
def _grid_value(a, m, r):
    # a / m rounded once, for the integer-valued float32 a: the quotient a * r (r = 1 / m rounded) and one
    # Markstein correction by the exact remainder, two explicit FMAs (3 instructions; an IEEE division
    # compiles to ~17, and two of them doubled the kernel's SASS a value). Exact for every a the int grid
    # uses: `buckets.arithmetic_grid` checks each one before the kernel takes this path.
    q = a * r
    return tl.fma(tl.fma(-q, m, a), r, q)


@triton.jit
def _arithmetic_lookup(xn, LOG2_LEVELS: tl.constexpr):
    # `_uniform_lookup` without its two gathers (`buckets.arithmetic_codes` is the torch mirror): where
    # `buckets.arithmetic_grid` proved the codebook's values are (j - m) / m rounded once and its
    # midpoints their float32 means, values[j], values[j + 1] and mids[j] are computed (`_grid_value`,
    # an add, a multiply) instead of read: no table, so none of the shared-memory bank conflicts that
    # bound the 8-bit grid's two random reads. j = 2M compares nothing (its midpoint is padding).
    M: tl.constexpr = (1 << (LOG2_LEVELS - 1)) - 1
    j = _grid_index(xn, LOG2_LEVELS)
    jf = j.to(tl.float32)
    m, r = _grid_divisor(M)
    low = _grid_value(jf - M, m, r)
    high = _grid_value(jf + (1 - M), m, r)
    above = ((low + high) * 0.5 < xn) & (j < 2 * M)
    return j + above.to(tl.int32), tl.where(above, high, low)


@triton.jit
def _grid_value_lookup(xn, mids, LOG2_LEVELS: tl.constexpr):
    # `_uniform_lookup`'s code (one midpoint read), its value computed as `_arithmetic_lookup` computes
    # values (`buckets.arithmetic_grid` proved every (code - M) / M the kernel meets): one table read a
    # value instead of two, for one conversion and three arithmetic instructions.
    M: tl.constexpr = (1 << (LOG2_LEVELS - 1)) - 1
    j = _grid_index(xn, LOG2_LEVELS)
    code = j + (tl.gather(mids, j, 0) < xn).to(tl.int32)
    m, r = _grid_divisor(M)
    return code, _grid_value(code.to(tl.float32) - M, m, r)


@triton.jit
def _packed_lookup(
    xn, words, values, BUCKET_SHIFT: tl.constexpr, BUCKET_FIRST: tl.constexpr, BUCKET_LOG2: tl.constexpr
):  # fmt: skip
    # (#(mids < xn), values[code]) from one word a bucket (`buckets.packed_table`; `packed_codes` is the
    # torch mirror): |xn| clamped as `_bucket` clamps it, its bucket by rising |xn| (the negative ones
    # after the positive ones), and its bits below the bucket's. The word holds the start and a threshold
    # t of those bits: code = start + ((low >= t) xor negative) (a negative bucket's t is stored for the
    # flipped compare), then the value. Two gathers (the word, the value) where the bucketed search makes
    # three, and an integer compare. NaN: a negative top bucket, |xn| as 1.0: code = its start, 0.
    bits = _clamped_bits(xn, BUCKET_SHIFT, BUCKET_FIRST)
    negative = ~(xn >= 0)
    bucket = (bits >> BUCKET_SHIFT) - BUCKET_FIRST + tl.where(negative, 1 << BUCKET_LOG2, 0)
    word = tl.gather(words, bucket, 0).to(tl.uint32, bitcast=True)
    above = (bits & ((1 << BUCKET_SHIFT) - 1)).to(tl.uint32) >= (word & PACKED_T_MASK)
    code = (word >> PACKED_START_SHIFT).to(tl.int32) + (above ^ negative).to(tl.int32)
    return code, tl.gather(values, code, 0)


@triton.jit
def _pair_lookup(
    xn, starts, pairs, BUCKET_SHIFT: tl.constexpr, BUCKET_FIRST: tl.constexpr, BUCKET_LOG2: tl.constexpr,
    STORE_CODES: tl.constexpr,
):  # fmt: skip
    # (#(mids < xn) where STORE_CODES else 0, values[code]) from one 64-bit read a value
    # (`buckets.mean_pairs`; `pair_values` is the torch mirror): the bucket's pair (values[start],
    # values[start + 1]) and the midpoint between them computed as the codebook computed it
    # (`buckets.mids_are_means`: the host checks every one), so mid < xn is the reference's own compare.
    # The value needs no second read; the code, where it is stored, is the bucket's start + that compare.
    # NaN: the negative top bucket (start 0), the compare false: values[0], code 0.
    bucket = _bucket(xn, BUCKET_SHIFT, BUCKET_FIRST, BUCKET_LOG2)
    pair = tl.gather(pairs, bucket, 0)
    low = pair.to(tl.int32).to(tl.float32, bitcast=True)
    high = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    above = (low + high) * 0.5 < xn  # never fused (`COMPILE_OPTIONS`)
    code = tl.zeros(xn.shape, tl.int32)
    if STORE_CODES:
        code = tl.gather(starts, bucket, 0).to(tl.int32) + above.to(tl.int32)
    return code, tl.where(above, high, low)


@triton.jit
def _nearest(
    xn, mids_ptr, values_ptr, starts_ptr, starts, mids, values,
    LOG2_LEVELS: tl.constexpr, SEARCH: tl.constexpr, STORE_OUT: tl.constexpr, STORE_CODES: tl.constexpr,
    BUCKET_SHIFT: tl.constexpr, BUCKET_FIRST: tl.constexpr, BUCKET_LOG2: tl.constexpr, WINDOW: tl.constexpr,
    INDEPENDENT: tl.constexpr, TABLES_FIRST: tl.constexpr,
):  # fmt: skip
    # (code, codebook[code]) of a 1-D xn with code = #(mids < xn); each only when its STORE_* flag is set.
    # SEARCH_CHAIN: the mids are sorted, so `mids[j] < xn` holds exactly for j < code: walking j upward,
    # the last select that fires is j = code - 1 and leaves values[code] (values[0] if none fires). The
    # 2^k - 1 compares are the reference's own float32 compares; mids[2^k - 1] is always +inf padding.
    # The binary searches make the same compares in another order (k probes; see `_nearest_code`), the
    # bucketed search a few of them after a table lookup, from the tables `_bucket_tables` loaded (before
    # the weights with TABLES_FIRST, else here).
    code = tl.zeros(xn.shape, tl.int32)
    value = tl.zeros(xn.shape, tl.float32)
    if SEARCH == SEARCH_CHAIN:
        if STORE_OUT:
            value += tl.load(values_ptr)
        for j in tl.static_range((1 << LOG2_LEVELS) - 1):
            above = tl.load(mids_ptr + j) < xn
            if STORE_OUT:
                value = tl.where(above, tl.load(values_ptr + (j + 1)), value)
            if STORE_CODES:
                code = tl.where(above, j + 1, code)
    elif SEARCH == SEARCH_GLOBAL:
        code = _nearest_code(xn, mids_ptr, LOG2_LEVELS)
        if STORE_OUT:
            value = tl.load(values_ptr + code)
    elif SEARCH == SEARCH_SHARED:  # the codebook in shared memory
        code = _nearest_code_shared(xn, mids_ptr, LOG2_LEVELS)
        if STORE_OUT:
            value = tl.gather(tl.load(values_ptr + tl.arange(0, 1 << LOG2_LEVELS)), code, 0)
    elif SEARCH == SEARCH_UNIFORM:
        if not TABLES_FIRST:
            mids, values = _sorted_tables(mids_ptr, values_ptr, LOG2_LEVELS)
        code, value = _uniform_lookup(xn, mids, values, LOG2_LEVELS)
    elif SEARCH == SEARCH_ARITHMETIC:
        code, value = _arithmetic_lookup(xn, LOG2_LEVELS)
    elif SEARCH == SEARCH_GRID_VALUE:
        if not TABLES_FIRST:
            mids, values = _sorted_tables(mids_ptr, values_ptr, LOG2_LEVELS)
        code, value = _grid_value_lookup(xn, mids, LOG2_LEVELS)
    elif SEARCH == SEARCH_PACKED:
        if not TABLES_FIRST:
            mids, values = _packed_tables(mids_ptr, values_ptr, LOG2_LEVELS, BUCKET_LOG2)
        code, value = _packed_lookup(xn, mids, values, BUCKET_SHIFT, BUCKET_FIRST, BUCKET_LOG2)
    elif SEARCH == SEARCH_PAIRS:
        if not TABLES_FIRST:
            starts, mids, values = _pair_tables(starts_ptr, values_ptr, BUCKET_LOG2)
        code, value = _pair_lookup(xn, starts, values, BUCKET_SHIFT, BUCKET_FIRST, BUCKET_LOG2, STORE_CODES)
    elif SEARCH == SEARCH_BUCKET_L1:
        code, value = _bucket_lookup_l1(
            xn, starts_ptr, mids_ptr, values_ptr, BUCKET_SHIFT, BUCKET_FIRST, BUCKET_LOG2, WINDOW, INDEPENDENT
        )  # fmt: skip
    else:
        if not TABLES_FIRST:
            starts, mids, values = _bucket_tables(
                starts_ptr, mids_ptr, values_ptr, LOG2_LEVELS, BUCKET_LOG2, INDEPENDENT
            )
        code, value = _bucket_lookup(
            xn, starts, mids, values, values_ptr, LOG2_LEVELS, BUCKET_SHIFT, BUCKET_FIRST, BUCKET_LOG2,
            WINDOW, INDEPENDENT, TABLES_FIRST,
        )  # fmt: skip
    return code, value
