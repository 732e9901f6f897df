"""The fused Triton `fake_quantize` for CUDA tensors (also runs under TRITON_INTERPRET=1 on CPU).

One pass per block for block sizes up to `MAX_FUSED_BLOCK`: each program loads ROWS whole blocks (the
block size is a compile-time constant), takes their absmax, normalizes, finds the nearest code,
dequantizes and stores. Larger blocks and block_size=None take two passes: torch computes the block
absmax (exact: a max) and its IEEE reciprocal, then `_scaled_kernel` quantizes with them.

The nearest code, #(mids < xn), and its value come from `kernels.triton_search` (which search:
`FusedChoice`, `search_kind`, `_flags`).

Programs that cover only whole blocks run without masks (one launch); a second, masked launch takes the
tail. Offsets inside a program are int32 from an int64 base pointer, so address arithmetic stays cheap;
one NaN-propagating max gives both the absmax and the non-finite flag.

The arithmetic is the torch reference's, operation for operation (see kernels/blockwise.py):
inv = 1 / (absmax * s) with IEEE round-to-nearest (`tl.div_rn`; Triton's `/` is approximate),
code = #(mids < (x * s) * inv), codebook[code] * absmax, cast with round-to-nearest-even. So the codes and
outputs equal the reference's bit for bit. Written for Triton 3.6 and 3.9.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import cuda_pairs, scaling
from kernels.buckets import (
    BUCKET_MAX_LEVELS_LOG2,
    MeanPairs,
    arithmetic_grid,
    block_absmax,
    bucket_pairs,
    bucket_table,
    eytzinger_mids,
    fused_config,
    fused_launches,
    mean_pairs,
    packed_table,
    padded_values,
    persistent_programs,
    uniform_m,
)
from kernels.codebooks import Levels
from kernels.scaling import check_finite_absmax, effective_block_size
from kernels.spec import QuantSpec
from kernels.triton_search import (
    EYTZINGER_FROM_LOG2,
    SEARCH_ARITHMETIC,
    SEARCH_BUCKET,
    SEARCH_BUCKET_L1,
    SEARCH_CHAIN,
    SEARCH_GLOBAL,
    SEARCH_GRID_VALUE,
    SEARCH_PACKED,
    SEARCH_PAIRS,
    SEARCH_SHARED,
    SEARCH_UNIFORM,
    _nearest,
    _tables_first,
)

TINY_ABSMAX = tl.constexpr(scaling.TINY_ABSMAX)  # blocks with a smaller absmax are scaled by 2^64 first
TINY_SCALE = tl.constexpr(scaling.TINY_SCALE)
# No fused multiply-add anywhere: the reference rounds every product and sum on its own (Triton 3.9 warns
# that its default, fusion on, changes in 3.10; this pins it for every version).
COMPILE_OPTIONS = {"enable_fp_fusion": False}
MAX_FUSED_BLOCK = 8192  # widest (padded) block one program holds in registers
SPLIT_SPAN = 256  # values a warp's lanes hold in one 16-byte vector each (bf16): a split block's slice
MAX_SPLIT_BLOCK = 1024  # a split block's warp holds it whole: 32 values a thread at 1024
TILE = 4096  # elements per program of the two-pass kernel


@dataclass(frozen=True)
class FusedChoice:
    """Fixed launch choices of the one-pass kernel (no autotuning, so no tuning cost per job).

    Attributes:
        max_chain_log2: codebooks of up to 2^this entries use the compare-select chain (0: never);
            the others a binary search.
        max_shared_log2: the binary search reads codebooks of up to 2^this entries from shared memory
            (2 x 4 x 2^this bytes per program), larger ones from global memory (L1).
        values_per_thread: values each thread holds (16: two 16-byte bf16 loads; registers stay <= 64).
        num_warps: warps per program; a program holds values_per_thread * 32 * num_warps values. 4 (2048
            values a program) beat 8 at every bit width and block size on one H200 (ninth session,
            `benchmarks/quantize_kernels.py --quick --choices w4`: 3 bits 0.078 -> 0.074 ms, 8 bits 0.166
            -> 0.145 ms on 8192x8192).
        bucket_from_log2: codebooks of 2^k entries with this <= k <= min(max_shared_log2, 8) use the
            bucketed search where `bucket_table` finds a table for them, else the binary search (0: never).
            4 (tenth session, one H200, `--choices bucket6,bucket4`): at 4 bits 0.078 -> 0.076 ms, at 8
            bits 0.144 -> 0.109 ms (int) and 0.140 -> 0.087 ms (fp) on 8192x8192, 3 bits unchanged.
        independent: a bucketed search with a window of one reads per-bucket tables (`bucket_pairs`, <=
            1024 buckets, 12 bytes each a program) in two gathers that wait for nothing (`_bucket_lookup`).
        tables_first: the bucketed search's tables are loaded before the weights, not after the absmax.
            On (tenth session, one H200, `--choices first`): 4 bits 0.81 -> 0.83 of copy, 6 bits 0.73 ->
            0.75, 3 and 8 bits unchanged; `independent` and `programs_per_sm` were slower everywhere.
        programs_per_sm: 0: a program a tile. Else the unmasked launch runs this many persistent programs a
            multiprocessor (fewer where they do not fit), each loading its tables once and looping over
            tiles, the next tile's weights loaded while it quantizes the current one.
        l1_tables: the bucketed search reads its tables with plain loads (through L1) where it uses
            them, not from a per-program copy in shared memory: no table set-up per program (at 8 bits
            up to 1,536 entries against the program's 2,048 values), L1 tag lookups instead.
        uniform_from_log2: the int grid (`buckets.uniform_m`) of 2^k >= 2^this entries finds its code by
            arithmetic and one compare (`_uniform_lookup`; 0: never): no bucket table, two gathers (the
            midpoint, the value) instead of three. 1 (twelfth session, one H200, 53e39da, fusion off and
            the add-and-truncate form, `--choices uniform` against the bucketed search then the default
            from 4 bits): int at 3-5 bits 0.80-0.90 -> 0.90-0.94 of copy, 6-7 bits 0.83-0.91 -> 0.87-0.92,
            8 bits 0.75-0.82 -> 0.76-0.82.
        packed_from_buckets: codebooks whose bucket table has at least this many entries (both signs)
            use the packed lookup where `packed_table` finds a table (0: never): one word a bucket holds
            the start code and an integer threshold, so two gathers (the word, the value) instead of
            three, for ~9 more instructions a value; in programs of values_per_thread (never wide).
            512 (twelfth session, one H200, 1a95577, `--choices packed+narrow`, medians over shapes and
            blocks 64/1024): nf 7 bits 0.68 -> 0.74 of copy, quantile 7 bits 0.67 -> 0.74, nf 8 bits
            0.61 -> 0.64, fp 8 bits 0.74 -> 0.77; within 0.01 at dynamic 6-7, quantile 8 and nf 6 (which
            has 256). Below, the byte table of starts hardly conflicts (fp 6-7 lose 0.01-0.02).
        arithmetic_from_log2: the int grid of 2^k >= 2^this entries whose float32 values and midpoints
            are the quotients the kernel computes (`buckets.arithmetic_grid`, checked entry by entry) reads
            no table (`_arithmetic_lookup`: two three-instruction quotients instead of two gathers; 0:
            never, the default). Thirteenth session, one H200, 2f6f902, `--choices arith,noarith`: 0.71-0.75
            of copy at every width (38.5 SASS a value against 32.5), the tables' 0.92-0.95 at 3-5 bits,
            0.86-0.94 at 6-7 and 0.75-0.82 at 8: the kernel is bound by instruction issue near 30 SASS a
            value, so six more instructions cost more than the 8-bit tables' bank conflicts.
        pairs_from_log2: codebooks of 2^k >= 2^this entries whose bucket table has a window of one and
            at most pairs_max_buckets entries, and whose midpoints are the float32 means of their
            neighbours (`buckets.mean_pairs`), use the pair lookup (0: never): one 64-bit read a value,
            the bucket's (values[start], values[start + 1]), and the midpoint computed, where the packed
            lookup reads a word and then the value. Codes, where stored, read the bucket's start too.
            4 (fourteenth session, one H200, 0636920, against the thirteenth session's defaults in the same
            run, blocks 64/1024): fp 4-8 bits 0.74-0.89 -> 0.81-0.95 of copy, nf 6 0.75-0.82 -> 0.80-0.86,
            nf 8 0.62-0.67 -> 0.70-0.77, dynamic 7 0.67-0.73 -> 0.71-0.78; dynamic 5 0.84-0.89 -> 0.83-0.86
            (the one loss).
        computed_value_from_log2: the int grid of 2^k >= 2^this entries (where arithmetic_from_log2 does
            not take it and `buckets.arithmetic_grid` proves its values) reads its midpoint and computes
            its value (`_grid_value_lookup`): one table read a value instead of two, for ~4 instructions.
            8 (same run): int 8 0.76-0.82 -> 0.83; at 4-7 bits it lost 0.04-0.11 (8e35693).
        pairs_max_buckets: the largest pair table (both signs; 8 bytes a bucket, copied by every program):
            2048 takes 8-bit quantile (0.62-0.63 -> 0.63-0.70); 4096 (8-bit dynamic's, 32 KB) was slower
            than its bucketed search (0.39-0.43 against 0.60-0.63, 8e35693).
        split_from_block: power-of-two blocks of at least this many values (and over SPLIT_SPAN) are
            held as [SPLIT, ROWS, SPLIT_SPAN] tiles (0: never; see `_tile_offsets`), so that Triton lays
            each block in one warp and its absmax is reduced without a barrier; up to MAX_SPLIT_BLOCK, with
            at least block / 32 values a thread (a warp holds one whole block). Opt-in: at block 1024 it
            gained at 7 bits (quantile 0.64 -> 0.71) and lost where the search is cheap (int 6 0.91 -> 0.88,
            3 bits 0.86 -> 0.74: 32 values a thread), 25fee39.
        wide_from_log2: the bucketed and the pair searches of codebooks of 2^k >= 2^this entries run
            programs of twice values_per_thread (0: never), so each program's table set-up covers twice the
            values. For the pair lookup 6 beat 7 at 6 bits (nf 0.77-0.83 -> 0.78-0.85, 599c372) and 8 bits
            gained (nf 0.63-0.71 -> 0.69-0.77, 8e35693). For the bucketed search (tenth session, as
            bucket_from_log2, `--choices vpt32`): 6 bits 0.73-0.77 -> 0.75-0.80, 8 bits 0.55-0.72 ->
            0.58-0.74; at 3 bits twice the values were slower (0.81-0.84 -> 0.76).
        resident_from_buckets: fake quantization of bf16 weights with a pair table (`buckets.mean_pairs`)
            of at least this many buckets (both signs; up to 4,096) runs the CUDA kernel that keeps the
            table resident for the launch (`kernels.cuda_pairs`; 0: never), where NVRTC and an sm_80+ GPU
            are there; the Triton kernel quantizes the tail past its whole turns of 1,024 values. The int
            grid: resident_grid_wide_from_buckets. resident_wide_from_buckets: the same from this many
            buckets for blocks of at least resident_wide_block values. 512 / 256 / 512 (fifteenth
            session, one H200, d7dd413 and da5b0b1, `--choices triton`, two shapes): 7-8-bit nf,
            quantile, dynamic at block 64 0.63-0.82 -> 0.80-0.83 of copy, at block 1024 0.60-0.76 ->
            0.83-0.86; 6 bits at 1024 0.78-0.80 -> 0.86-0.87; at block 64 Triton led below 512 buckets
            (0.84-0.94 against 0.81-0.83) and at 512 lost little by it (fp 8 0.87 -> 0.82, dynamic 6
            0.84 -> 0.82, both over 0.80).
        resident_grid_wide_from_buckets: the int grid goes resident only at blocks of at least
            resident_wide_block values and at most resident_grid_max_block, from this many buckets:
            int 8 at block 512 0.78-0.79 on Triton, 0.83-0.84 resident; at 1,024 Triton led (0.83
            against 0.80, sixteenth session, e2bedca `--choices grid1024`), and at blocks 64 and 1024
            its own search beat the fifteenth session's resident kernel (int 6-7: 0.87-0.94 against
            0.81-0.87, d7dd413).
        resident_streaming: the resident kernel's loads and stores marked evict-first (.cs): 0.96-1.03x
            (e2bedca), not taken.
        resident_constant_geometry: the resident kernel compiled per bucket geometry (shift, first and
            flip as constants: 1.5 fewer SASS a value, `benchmarks/kernel_anatomy.py`): 0.98-1.03x, not
            taken.
        resident_fast: the resident kernel's fast path for turns whose blocks allow it (the same bits;
            `cuda_pairs.quantize8`): 1.03x median on the resident rows (b678a9d); False: the exact path.
        resident_threads, resident_per_sm, resident_pipeline: the resident kernel's program size,
            programs a multiprocessor, and each warp's next turn loaded before this one is quantized
            (`cuda_pairs.Variant`). 256 x 4 pipelined (sixteenth session, H200, two shapes, 300 rows):
            rows under 0.80 of copy 58 at the fifteenth session's 1,024 x 1 unpipelined, 24 pipelined,
            2 at 512 x 2 pipelined (669b6d6), 0 at 256 x 4 (e2bedca, b678a9d twice: min 0.816).
    """

    max_chain_log2: int = 0
    max_shared_log2: int = 8
    values_per_thread: int = 16
    num_warps: int = 4
    bucket_from_log2: int = 4
    independent: bool = False
    tables_first: bool = True
    programs_per_sm: int = 0
    l1_tables: bool = False
    uniform_from_log2: int = 1
    wide_from_log2: int = 6
    packed_from_buckets: int = 512
    arithmetic_from_log2: int = 0
    pairs_from_log2: int = 4
    computed_value_from_log2: int = 8
    pairs_max_buckets: int = 2048
    split_from_block: int = 0
    resident_from_buckets: int = 512
    resident_wide_from_buckets: int = 256
    resident_wide_block: int = 512
    resident_grid_wide_from_buckets: int = 1024
    resident_streaming: bool = False
    resident_constant_geometry: bool = False
    resident_fast: bool = True
    resident_grid_max_block: int = 512
    resident_threads: int = 256
    resident_per_sm: int = 4
    resident_pipeline: bool = True


DEFAULT_CHOICE = FusedChoice()


@triton.jit
def _cast_out(y, out_ptr, BF16_BY_HAND: tl.constexpr):
    # float32 -> the output dtype, round-to-nearest-even (as torch's .to()). Triton's interpreter truncates
    # a float32 -> bf16 cast, so there bf16 is rounded by hand; compiled, cvt.rn.bf16.f32 does the same.
    if BF16_BY_HAND:
        bits = y.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        bits = (bits + ((bits >> 16) & 1) + 0x7FFF) >> 16
        out = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = y.to(out_ptr.dtype.element_ty)
    return out


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _tile_offsets(
    row0, n, BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_P2: tl.constexpr, SPLIT: tl.constexpr
):
    # Offsets of a program's ROWS blocks from row0's first value (int32), and the mask of those inside
    # the weight (only the masked launch uses it). SPLIT > 1 (a power-of-two block, `split_from_block`):
    # [SPLIT, ROWS, BLOCK / SPLIT], each block's SPLIT slices along the first axis, so that Triton lays a
    # block in one warp (its warps go along the rows) and the absmax needs no exchange between warps.
    if SPLIT == 1:
        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_P2)
        offs = rows[:, None] * BLOCK + cols[None, :]
        inside = cols[None, :] < BLOCK
    else:
        W: tl.constexpr = BLOCK_P2 // SPLIT
        slices = tl.arange(0, SPLIT)[:, None, None] * W
        offs = tl.arange(0, ROWS)[None, :, None] * BLOCK + slices + tl.arange(0, W)[None, None, :]
        inside = offs >= 0  # BLOCK == BLOCK_P2: every column is inside its block
    limit = tl.minimum(n - row0 * BLOCK, ROWS * BLOCK).to(tl.int32)
    return offs, inside & (offs < limit)


@triton.jit
def _row_absmax(x, SPLIT: tl.constexpr):
    # Each block's NaN-propagating max of |x| (one reduction gives the absmax and flags NaN and Inf blocks).
    if SPLIT == 1:
        m = tl.reduce(tl.abs(x), 1, _max_nan)
    else:
        m = tl.reduce(tl.reduce(tl.abs(x), 2, _max_nan), 0, _max_nan)
    return m


@triton.jit
def _per_value(v, SPLIT: tl.constexpr):
    # A per-block vector broadcast against the tile (`_tile_offsets`' shape).
    if SPLIT == 1:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        b = v[:, None]
    else:
        b = v[None, :, None]
    return b


@triton.jit
def _quantize_rows(
    x, row0, out_ptr, codes_ptr, absmax_ptr, values_ptr, mids_ptr, starts_ptr, starts, mids, values, n,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_P2: tl.constexpr, LOG2_LEVELS: tl.constexpr,
    SEARCH: tl.constexpr, MASKED: tl.constexpr, STORE_OUT: tl.constexpr, STORE_CODES: tl.constexpr,
    BF16_BY_HAND: tl.constexpr, BUCKET_SHIFT: tl.constexpr, BUCKET_FIRST: tl.constexpr,
    BUCKET_LOG2: tl.constexpr, WINDOW: tl.constexpr, INDEPENDENT: tl.constexpr, TABLES_FIRST: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    # Quantize the ROWS blocks from row0 (x: their float32 values, 0 where masked) and store them.
    base = row0 * BLOCK  # int64: the pointers move once per program, offsets are int32
    offs, mask = _tile_offsets(row0, n, BLOCK, ROWS, BLOCK_P2, SPLIT)
    absmax = _row_absmax(x, SPLIT)
    tiny = absmax < TINY_ABSMAX
    scale = tl.where(tiny, TINY_SCALE, 1.0)
    inv = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.where(absmax > 0, absmax, 1.0) * scale)
    # Both multiplies always: x * 1 is exact, and a branch to skip it was compiled as both sides and a
    # select per value (a multiply and a select more than this, and a barrier for the branch's test).
    xn = (x * _per_value(scale, SPLIT)) * _per_value(inv, SPLIT)
    # 1-D for tl.gather (a row-major reshape: the same values in the same places), then back.
    code, value = _nearest(
        tl.reshape(xn, [ROWS * BLOCK_P2]), mids_ptr, values_ptr, starts_ptr, starts, mids, values,
        LOG2_LEVELS, SEARCH, STORE_OUT, STORE_CODES, BUCKET_SHIFT, BUCKET_FIRST, BUCKET_LOG2, WINDOW,
        INDEPENDENT, TABLES_FIRST,
    )  # fmt: skip
    code, value = tl.reshape(code, x.shape), tl.reshape(value, x.shape)
    if STORE_OUT:
        y = _cast_out(value * _per_value(absmax, SPLIT), out_ptr, BF16_BY_HAND)
        tl.store(out_ptr + base + offs, y, mask=mask if MASKED else None)
    if STORE_CODES:
        tl.store(codes_ptr + base + offs, code.to(codes_ptr.dtype.element_ty), mask=mask if MASKED else None)
    stored = tl.where(absmax < float("inf"), absmax, float("nan"))  # NaN for any non-finite block
    rows = tl.arange(0, ROWS)
    tl.store(absmax_ptr + row0 + rows, stored, mask=rows.to(tl.int64) * BLOCK < n - base if MASKED else None)


@triton.jit
def _fused_blocks_kernel(
    x_ptr, out_ptr, codes_ptr, absmax_ptr, values_ptr, mids_ptr, starts_ptr, n, first_row, tiles,
    BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_P2: tl.constexpr, LOG2_LEVELS: tl.constexpr,
    SEARCH: tl.constexpr, MASKED: tl.constexpr, STORE_OUT: tl.constexpr, STORE_CODES: tl.constexpr,
    BF16_BY_HAND: tl.constexpr, BUCKET_SHIFT: tl.constexpr, BUCKET_FIRST: tl.constexpr,
    BUCKET_LOG2: tl.constexpr, WINDOW: tl.constexpr, INDEPENDENT: tl.constexpr, TABLES_FIRST: tl.constexpr,
    PERSISTENT: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    # One program quantizes ROWS whole blocks (a tile), or PERSISTENT (unmasked launch) the tiles
    # pid, pid + programs, ... < tiles, loading each next tile's weights before quantizing the current one.
    # TABLES_FIRST is set when PERSISTENT: a program loads its tables once.
    starts, mids, values = _tables_first(
        starts_ptr, mids_ptr, values_ptr, LOG2_LEVELS, SEARCH, BUCKET_LOG2, INDEPENDENT, TABLES_FIRST
    )  # fmt: skip
    tile = tl.program_id(0)
    row0 = first_row + tile.to(tl.int64) * ROWS
    offs, mask = _tile_offsets(row0, n, BLOCK, ROWS, BLOCK_P2, SPLIT)
    x = tl.load(x_ptr + row0 * BLOCK + offs, mask=mask if MASKED else None, other=0.0 if MASKED else None)
    if PERSISTENT:
        programs = tl.num_programs(0)
        for _ in tl.range(tile, tiles, programs):
            tile += programs
            next_row0 = first_row + tile.to(tl.int64) * ROWS
            more = offs < tl.where(tile < tiles, ROWS * BLOCK, 0)  # past the last tile: no read
            x_next = tl.load(x_ptr + next_row0 * BLOCK + offs, mask=more)
            _quantize_rows(
                x.to(tl.float32), row0, out_ptr, codes_ptr, absmax_ptr, values_ptr, mids_ptr, starts_ptr,
                starts, mids, values, n, BLOCK, ROWS, BLOCK_P2, LOG2_LEVELS, SEARCH, MASKED, STORE_OUT,
                STORE_CODES, BF16_BY_HAND, BUCKET_SHIFT, BUCKET_FIRST, BUCKET_LOG2, WINDOW, INDEPENDENT,
                TABLES_FIRST, SPLIT,
            )  # fmt: skip
            x, row0 = x_next, next_row0
    else:
        _quantize_rows(
            x.to(tl.float32), row0, out_ptr, codes_ptr, absmax_ptr, values_ptr, mids_ptr, starts_ptr, starts,
            mids, values, n, BLOCK, ROWS, BLOCK_P2, LOG2_LEVELS, SEARCH, MASKED, STORE_OUT, STORE_CODES,
            BF16_BY_HAND, BUCKET_SHIFT, BUCKET_FIRST, BUCKET_LOG2, WINDOW, INDEPENDENT, TABLES_FIRST, SPLIT,
        )  # fmt: skip


@triton.jit
def _scaled_kernel(
    x_ptr, out_ptr, codes_ptr, absmax_ptr, inv_ptr, values_ptr, mids_ptr, starts_ptr, n, block,
    TILE: tl.constexpr, LOG2_LEVELS: tl.constexpr, SEARCH: tl.constexpr, STORE_OUT: tl.constexpr,
    STORE_CODES: tl.constexpr, BF16_BY_HAND: tl.constexpr, BUCKET_SHIFT: tl.constexpr,
    BUCKET_FIRST: tl.constexpr, BUCKET_LOG2: tl.constexpr, WINDOW: tl.constexpr, INDEPENDENT: tl.constexpr,
    TABLES_FIRST: tl.constexpr,
):  # fmt: skip
    starts, mids, values = _tables_first(
        starts_ptr, mids_ptr, values_ptr, LOG2_LEVELS, SEARCH, BUCKET_LOG2, INDEPENDENT, TABLES_FIRST
    )  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.load(absmax_ptr + offs // block, mask=mask, other=1.0)
    inv = tl.load(inv_ptr + offs // block, mask=mask, other=1.0)  # torch's IEEE 1 / (absmax * scale)
    scale = tl.where(absmax < TINY_ABSMAX, TINY_SCALE, 1.0)
    xn = (x * scale) * inv
    code, value = _nearest(
        xn, mids_ptr, values_ptr, starts_ptr, starts, mids, values, LOG2_LEVELS, SEARCH, STORE_OUT,
        STORE_CODES, BUCKET_SHIFT, BUCKET_FIRST, BUCKET_LOG2, WINDOW, INDEPENDENT, TABLES_FIRST,
    )  # fmt: skip
    if STORE_OUT:
        tl.store(out_ptr + offs, _cast_out(value * absmax, out_ptr, BF16_BY_HAND), mask=mask)
    if STORE_CODES:
        tl.store(codes_ptr + offs, code.to(codes_ptr.dtype.element_ty), mask=mask)


def split_of(block: int, choice: FusedChoice) -> int:
    """The one-pass kernel's SPLIT for this block size (`FusedChoice.split_from_block`; 1: not split):
    power-of-two blocks over SPLIT_SPAN values, up to MAX_SPLIT_BLOCK."""
    split = 0 < choice.split_from_block <= block <= MAX_SPLIT_BLOCK and block > SPLIT_SPAN
    return block // SPLIT_SPAN if split and block & (block - 1) == 0 else 1


def values_per_thread(block: int, flags: dict, choice: FusedChoice) -> int:
    """Values a thread of the one-pass kernel holds: twice `values_per_thread` for the bucketed and the pair
    searches from `wide_from_log2`, and for a split block at least a warp's share of one block."""
    searches = (SEARCH_BUCKET.value, SEARCH_PAIRS.value)
    wide = flags["SEARCH"] in searches and 0 < choice.wide_from_log2 <= flags["LOG2_LEVELS"]
    per_thread = choice.values_per_thread * (2 if wide else 1)
    return max(per_thread, block // 32) if split_of(block, choice) > 1 else per_thread


def search_kind(log2_levels: int, choice: FusedChoice) -> int:
    """SEARCH_CHAIN, SEARCH_BUCKET, SEARCH_SHARED or SEARCH_GLOBAL for 2^log2_levels (padded) entries.

    SEARCH_BUCKET falls back to SEARCH_SHARED where `bucket_table` finds no table (see `_flags`).
    """
    if log2_levels <= choice.max_chain_log2:
        return SEARCH_CHAIN.value
    if 0 < choice.bucket_from_log2 <= log2_levels <= min(choice.max_shared_log2, BUCKET_MAX_LEVELS_LOG2):
        return SEARCH_BUCKET.value
    return SEARCH_SHARED.value if log2_levels <= choice.max_shared_log2 else SEARCH_GLOBAL.value


def _flags(x: Tensor, levels: Levels, store_out: bool, store_codes: bool, choice: FusedChoice) -> dict:
    log2_levels = levels.mids.numel().bit_length() - 1
    assert levels.mids.numel() == 1 << log2_levels and levels.mids.device == x.device
    search = search_kind(log2_levels, choice)
    in_range = 0 < choice.uniform_from_log2 <= log2_levels <= choice.max_shared_log2
    uniform = in_range and uniform_m(levels) is not None
    if uniform:
        search = SEARCH_UNIFORM.value
        table_free = 0 < choice.arithmetic_from_log2 <= log2_levels
        computed = table_free or 0 < choice.computed_value_from_log2 <= log2_levels
        if computed and arithmetic_grid(levels) is not None:  # its floats are the kernel's quotients
            search = SEARCH_ARITHMETIC.value if table_free else SEARCH_GRID_VALUE.value
    table = bucket_table(levels) if search == SEARCH_BUCKET.value else None
    if search == SEARCH_BUCKET.value and table is None:
        search = SEARCH_SHARED.value
    l1 = table is not None and choice.l1_tables
    pairs = packed = None  # the pair lookup first: its table is cheap, the packed one is not (~2 ms)
    if table is not None and 0 < choice.pairs_from_log2 <= log2_levels and not l1:
        pairs = mean_pairs(levels, choice.pairs_max_buckets)
    if (
        pairs is None
        and table is not None
        and 0 < choice.packed_from_buckets <= table.starts.numel()
        and not l1
    ):
        packed = packed_table(levels)
    if pairs is not None:
        search = SEARCH_PAIRS.value
    if packed is not None:
        search = SEARCH_PACKED.value
    geometry = packed.buckets if packed is not None else table.buckets if table is not None else None
    return {
        "LOG2_LEVELS": log2_levels,
        "SEARCH": SEARCH_BUCKET_L1.value if l1 else search,
        "STORE_OUT": store_out,
        "STORE_CODES": store_codes,
        "BF16_BY_HAND": x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        "BUCKET_SHIFT": geometry.shift if geometry else 0,  # 0s: one variant for the other searches
        "BUCKET_FIRST": geometry.first if geometry else 0,
        "BUCKET_LOG2": geometry.log2_buckets if geometry else 0,
        "WINDOW": 1 if packed is not None else table.window if table else 0,
        "INDEPENDENT": bool(
            table
            and packed is None
            and pairs is None
            and choice.independent
            and bucket_pairs(levels) is not None
        ),
        "TABLES_FIRST": bool(
            (table or search in (SEARCH_UNIFORM.value, SEARCH_GRID_VALUE.value))
            and not l1
            and (choice.tables_first or choice.programs_per_sm > 0)
        ),
    }


def _tables(levels: Levels, flags: dict, choice: FusedChoice) -> tuple[Tensor, Tensor, Tensor]:
    """(values, mids, starts) as the kernels' search reads them (values_ptr, mids_ptr, starts_ptr)."""
    if flags["SEARCH"] == SEARCH_PACKED.value:
        words = packed_table(levels)
        assert words is not None
        return padded_values(levels), words.words, words.words  # starts_ptr: never read
    if flags["SEARCH"] == SEARCH_PAIRS.value:
        means = mean_pairs(levels, choice.pairs_max_buckets)
        assert means is not None
        return means.values, means.values, means.starts  # mids_ptr: never read
    pairs = bucket_pairs(levels) if flags["INDEPENDENT"] else None
    if pairs is not None:
        return pairs.values, pairs.mids, pairs.starts
    values = padded_values(levels)
    eytzinger = flags["SEARCH"] == SEARCH_SHARED.value and flags["LOG2_LEVELS"] >= EYTZINGER_FROM_LOG2.value
    mids = eytzinger_mids(levels) if eytzinger else levels.mids
    bucketed = flags["SEARCH"] in (SEARCH_BUCKET.value, SEARCH_BUCKET_L1.value)
    table = bucket_table(levels) if bucketed else None
    return values, mids, table.starts if table is not None else mids  # never read by the other searches


def _launch(
    w: Tensor,
    spec: QuantSpec,
    levels: Levels,
    store_out: bool,
    code_dtype: torch.dtype | None,
    choice: FusedChoice = DEFAULT_CHOICE,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Run the kernel; returns (fake-quantized w or None, flat codes or None, float32 absmax)."""
    x = w.detach().contiguous()
    n = x.numel()
    block = effective_block_size(spec.block_size, n)
    n_blocks = math.ceil(n / block)
    out = torch.empty_like(x) if store_out else None
    codes = torch.empty(n, dtype=code_dtype, device=x.device) if code_dtype is not None else None
    dummy = x  # never written when its STORE_* flag is off
    args = (x, out if out is not None else dummy, codes if codes is not None else dummy)
    flags = _flags(x, levels, store_out, codes is not None, choice)
    tables = _tables(levels, flags, choice)
    if block <= MAX_FUSED_BLOCK and spec.block_size is not None:
        per_thread = values_per_thread(block, flags, choice)
        rows, num_warps = fused_config(block, n_blocks, per_thread, choice.num_warps)
        absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
        launches = fused_launches(n, block, rows)
        resident = resident_plan(x, block, levels, flags, out is not None and codes is None, choice)
        if resident is not None:
            assert out is not None
            resident.run(x, out, absmax)
            first = resident.n_main // block  # the tail's first block: one masked launch, or none
            launches = [(first, math.ceil((n_blocks - first) / rows), True)] if first < n_blocks else []
        for first_row, tiles, masked in launches:
            persistent = choice.programs_per_sm > 0 and not masked
            launch_args = (*args, absmax, *tables, n, first_row, tiles)
            kwargs = dict(BLOCK=block, ROWS=rows, BLOCK_P2=triton.next_power_of_2(block), MASKED=masked,
                          PERSISTENT=persistent, SPLIT=split_of(block, choice), num_warps=num_warps,
                          **COMPILE_OPTIONS, **flags)  # fmt: skip
            programs = tiles
            if persistent:  # the compiled kernel's registers bound the programs a multiprocessor holds
                kernel = _fused_blocks_kernel.warmup(*launch_args, grid=(1,), **kwargs) if x.is_cuda else None
                programs = min(tiles, persistent_programs(kernel, num_warps, choice.programs_per_sm))
            _fused_blocks_kernel[(programs,)](*launch_args, **kwargs)
    else:
        absmax = block_absmax(x.reshape(-1), block)
        scale = torch.where(absmax < TINY_ABSMAX.value, TINY_SCALE.value, 1.0)
        inv = torch.reciprocal(torch.where(absmax > 0, absmax, torch.ones_like(absmax)) * scale)
        grid = (triton.cdiv(n, TILE),)
        _scaled_kernel[grid](
            *args, absmax, inv, *tables, n, block, TILE=TILE, num_warps=8, **COMPILE_OPTIONS, **flags
        )  # fmt: skip
    return out, codes, absmax


def resident_table(
    levels: Levels, flags: dict, block: int, fake_only: bool, dtype: torch.dtype, choice: FusedChoice
) -> MeanPairs | None:
    """The pair table the resident CUDA kernel would hold for these levels (`choice.resident_*`), or None
    where the Triton kernel quantizes all: codes, dtypes other than bf16, the int grid, smaller tables."""
    grid = flags["SEARCH"] in (SEARCH_UNIFORM.value, SEARCH_GRID_VALUE.value, SEARCH_ARITHMETIC.value)
    if not fake_only or dtype != torch.bfloat16 or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    wide = block >= choice.resident_wide_block
    if grid:
        take = wide and block <= choice.resident_grid_max_block
        least = [choice.resident_grid_wide_from_buckets] if take else []
    else:
        least = [choice.resident_from_buckets] + ([choice.resident_wide_from_buckets] if wide else [])
    least = [b for b in least if b > 0]
    pairs = mean_pairs(levels, cuda_pairs.MAX_TABLE_BYTES // 8) if least else None
    return pairs if pairs is not None and pairs.values.numel() >= min(least) else None


def resident_plan(
    x: Tensor, block: int, levels: Levels, flags: dict, fake_only: bool, choice: FusedChoice
) -> cuda_pairs.ResidentPlan | None:
    """The resident CUDA kernel's launch for flat `x` (`cuda_pairs.plan`; None: all on Triton)."""
    if not x.is_cuda:
        return None
    pairs = resident_table(levels, flags, block, fake_only, x.dtype, choice)
    return cuda_pairs.plan(x, block, pairs, resident_variant(choice))


def resident_variant(choice: FusedChoice) -> cuda_pairs.Variant:
    """How the resident kernel is compiled and launched under `choice` (its resident_* fields)."""
    return cuda_pairs.Variant(
        choice.resident_streaming,
        choice.resident_constant_geometry,
        choice.resident_threads,
        choice.resident_per_sm,
        choice.resident_pipeline,
        choice.resident_fast,
    )


def resident_values(
    x: Tensor, block: int, levels: Levels, flags: dict, fake_only: bool, choice: FusedChoice
) -> int:
    """Values of flat `x` the resident CUDA kernel quantizes (0: all on Triton)."""
    plan = resident_plan(x, block, levels, flags, fake_only, choice)
    return plan.n_main if plan is not None else 0


def fused_fake_quantize(
    w: Tensor,
    spec: QuantSpec,
    levels: Levels,
    check_finite: bool = True,
    choice: FusedChoice = DEFAULT_CHOICE,
) -> Tensor:
    """Fake-quantize `w` (CUDA, or CPU under TRITON_INTERPRET=1) with the given codebook levels.

    `choice` only changes speed (every choice computes the same bits); benchmarks compare choices.
    """
    out, _, absmax = _launch(w, spec, levels, store_out=True, code_dtype=None, choice=choice)
    if check_finite:
        check_finite_absmax(absmax)
    assert out is not None
    return out.view(w.shape)


def fused_quantize(
    w: Tensor, spec: QuantSpec, levels: Levels, choice: FusedChoice = DEFAULT_CHOICE
) -> tuple[Tensor, Tensor]:
    """Codes (flat, uint8 for bits <= 8 else int32) and float32 block absmax of `w`."""
    code_dtype = torch.uint8 if spec.bits <= 8 else torch.int32
    _, codes, absmax = _launch(w, spec, levels, store_out=False, code_dtype=code_dtype, choice=choice)
    check_finite_absmax(absmax)
    assert codes is not None
    return codes, absmax
