"""The Triton kernels compile for an H100/H200 (sm_90) on a CPU machine, with the arithmetic the bit-exactness
argument needs: IEEE division (div.rn, not Triton's approximate div.full), no fused multiply-add, 16-byte
vector loads of the weights where blocks are powers of two; and that each search reads the codebook where
it should (the shared-memory and bucketed searches from shared memory, the chain once per program).
Catches compiled-mode errors the interpreter cannot."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

COMMON = {"x_ptr": "*bf16", "out_ptr": "*bf16", "codes_ptr": "*u8", "absmax_ptr": "*fp32",
          "values_ptr": "*fp32", "mids_ptr": "*fp32", "starts_ptr": "*u8", "n": "i32"}  # fmt: skip
FLAGS = ["LOG2_LEVELS", "SEARCH", "STORE_OUT", "STORE_CODES", "BF16_BY_HAND", "BUCKET_SHIFT", "BUCKET_FIRST",
         "BUCKET_LOG2", "WINDOW", "INDEPENDENT", "TABLES_FIRST"]  # fmt: skip
NO_BUCKETS = {"BUCKET_SHIFT": 0, "BUCKET_FIRST": 0, "BUCKET_LOG2": 0, "WINDOW": 0, "INDEPENDENT": False,
              "TABLES_FIRST": False}  # fmt: skip


def _ptx(fn, signature: dict[str, str], constexprs: Mapping[str, object], num_warps: int = 8) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import triton_fused

    runtime = [k for k, v in signature.items() if v != "constexpr"]
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(runtime))}  # as the JIT specializes 8192x8192
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        options = {"num_warps": num_warps, **triton_fused.COMPILE_OPTIONS}  # as the kernels are launched
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # no NVIDIA backend in this triton build
        if "backend" in str(e).lower() or "ptxas" in str(e).lower():
            pytest.skip(f"triton cannot compile for CUDA here: {e}")
        raise
    return compiled.asm["ptx"]


def _check(ptx: str, divides: bool = True, vector_loads: bool = True, fma: bool = False) -> None:
    if divides:
        assert "div.rn.f32" in ptx
    assert "div.full" not in ptx and "div.approx" not in ptx and "rcp.approx" not in ptx
    fmas = len(re.findall(r"\bfma\.rn\.f32", ptx))  # fma: only the int grid's computed value's own (tl.fma)
    assert fmas == 0 or fma, "a fused multiply-add would change the rounding"
    assert ".ftz" not in ptx, "flushing subnormals to zero would change the rounding"
    if vector_loads:
        assert "ld.global.v4.b32" in ptx, "weights should load as 16-byte vectors"
    assert re.search(r"cvt\.rn\.bf16(x2)?\.f32", ptx), "bf16 output rounds to nearest even, as torch's .to()"


def _scalar_loads(ptx: str) -> int:
    """Global loads of one 32-bit word: codebook reads (and the global binary search's gathers)."""
    return len(re.findall(r"\bld\.global(\.[a-z]+)*\.b32\s", ptx))


def _shared_loads(ptx: str, width: str = "") -> int:
    return len(re.findall(rf"\bld\.shared(\.[a-z0-9]+)*{width}\s", ptx))


def _bucket_flags(dtype: str, log2_levels: int) -> dict[str, int]:
    """The bucketed search's constexprs for a codebook, as `triton_fused._flags` passes them."""
    import torch

    from kernels.buckets import bucket_table
    from kernels.codebooks import static_levels

    table = bucket_table(static_levels(dtype, log2_levels, None, torch.device("cpu")))
    assert table is not None
    return {"BUCKET_SHIFT": table.buckets.shift, "BUCKET_FIRST": table.buckets.first,
            "BUCKET_LOG2": table.buckets.log2_buckets, "WINDOW": table.window, "INDEPENDENT": False,
            "TABLES_FIRST": False}  # fmt: skip


CHAIN, SHARED, GLOBAL, BUCKET, UNIFORM, PACKED, PAIRS, GRID_VALUE = 0, 1, 2, 3, 5, 6, 8, 9  # SEARCH_*


def _fused_ptx(
    log2_levels: int,
    search: int,
    block: int,
    masked: bool,
    store_codes: bool,
    buckets: Mapping[str, object],
    persistent: bool = False,
    pointers: Mapping[str, str] = COMMON,
    split: int = 1,
    fma: bool = False,
    num_warps: int = 8,
) -> str:
    import triton

    from kernels import triton_fused

    sig = {**pointers, "n": "i64", "first_row": "i32", "tiles": "i32"}
    sig.update(
        dict.fromkeys(["BLOCK", "ROWS", "BLOCK_P2", "MASKED", "PERSISTENT", "SPLIT", *FLAGS], "constexpr")
    )
    block_p2 = triton.next_power_of_2(block)
    consts = {"BLOCK": block, "ROWS": 4096 // block_p2, "BLOCK_P2": block_p2, "MASKED": masked,
              "PERSISTENT": persistent, "SPLIT": split, "LOG2_LEVELS": log2_levels, "SEARCH": search,
              "STORE_OUT": True, "STORE_CODES": store_codes, "BF16_BY_HAND": False, **buckets}  # fmt: skip
    ptx = _ptx(triton_fused._fused_blocks_kernel, sig, consts, num_warps)
    _check(ptx, vector_loads=block == block_p2, fma=fma)
    return ptx


# (log2_levels, search, block, masked, store_codes): every search path (the default shared-memory binary
# search for k = 1..8, sorted up to 5 and Eytzinger from 6; the compare-select chain; the global-memory
# search, k = 16 included), power-of-two blocks unmasked and as a tail launch, a block that is not a power
# of two, codes stored.
CASES = [(k, SHARED, 64, False, k == 4) for k in range(1, 9)] + [
    (3, CHAIN, 64, False, False), (4, CHAIN, 64, True, True), (8, GLOBAL, 64, False, False),
    (16, GLOBAL, 64, False, False), (3, SHARED, 1024, False, False), (8, SHARED, 1024, False, True),
    (4, SHARED, 64, True, False), (4, SHARED, 100, True, True), (8, SHARED, 100, True, False),
]  # fmt: skip


@pytest.mark.parametrize(("log2_levels", "search", "block", "masked", "store_codes"), CASES)
def test_fused_kernel_compiles_for_sm90(
    log2_levels: int, search: int, block: int, masked: bool, store_codes: bool
) -> None:
    from kernels import triton_fused

    assert (triton_fused.SEARCH_CHAIN, triton_fused.SEARCH_SHARED, triton_fused.SEARCH_GLOBAL) == (0, 1, 2)
    ptx = _fused_ptx(log2_levels, search, block, masked, store_codes, NO_BUCKETS)
    per_thread = 4096 // (8 * 32)  # values a thread holds
    if search == CHAIN:  # the codebook is read once per program (2^k - 1 midpoints, 2^k values)
        assert _scalar_loads(ptx) == 2 ** (log2_levels + 1) - 1 and _shared_loads(ptx) <= 5
    elif search == SHARED:  # three scalar probes, then per value a shared read per level and the value
        assert _scalar_loads(ptx) <= 5, _scalar_loads(ptx)
        assert _shared_loads(ptx) >= per_thread * (max(2, log2_levels) - 1), _shared_loads(ptx)
    else:  # per value a global gather per probe below the first two, and one of the value
        assert _scalar_loads(ptx) >= per_thread * max(1, log2_levels - 1), _scalar_loads(ptx)


# (dtype, log2_levels, block, masked, store_codes): the bucketed search at 6..8 bits, each data type's
# table geometry (8 bits: int M=6, 1024 entries; fp M=3; nf; dynamic's 4096 entries), unmasked, as a
# tail launch, a block that is not a power of two, codes stored.
BUCKET_CASES = [
    ("int", 8, 64, False, False), ("fp", 8, 64, True, True), ("nf", 8, 1024, False, False),
    ("dynamic", 8, 100, True, False), ("nf", 6, 64, False, True), ("int", 7, 100, True, True),
]  # fmt: skip


@pytest.mark.parametrize(("dtype", "log2_levels", "block", "masked", "store_codes"), BUCKET_CASES)
def test_bucket_kernel_compiles_for_sm90(
    dtype: str, log2_levels: int, block: int, masked: bool, store_codes: bool
) -> None:
    from kernels import triton_fused

    assert triton_fused.SEARCH_BUCKET == BUCKET
    buckets = _bucket_flags(dtype, log2_levels)
    ptx = _fused_ptx(log2_levels, BUCKET, block, masked, store_codes, buckets)
    per_thread = 4096 // (8 * 32)
    # The table, the window's midpoints and the values are read per value from shared memory (one byte of
    # the table, 4 bytes each of the others); from global memory only the weights and the tables' copies.
    assert _scalar_loads(ptx) <= 5, _scalar_loads(ptx)
    assert _shared_loads(ptx, r"\.b8") >= per_thread, _shared_loads(ptx, r"\.b8")
    assert _shared_loads(ptx, r"\.b32") >= per_thread * (buckets["WINDOW"] + 1), _shared_loads(ptx)


# (dtype, log2_levels, block, store_codes, independent, tables_first, persistent): the opt-in launch choices
# (FusedChoice.independent, tables_first, programs_per_sm) on the bucketed search.
CHOICE_CASES = [
    ("int", 8, 64, False, True, False, False), ("nf", 6, 1024, True, True, True, False),
    ("int", 8, 1024, False, False, True, False), ("fp", 8, 64, True, False, True, True),
    ("nf", 8, 64, False, True, True, True), ("int", 4, 1024, True, True, True, True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("dtype", "log2_levels", "block", "store_codes", "independent", "tables_first", "persistent"),
    CHOICE_CASES,
)
def test_launch_choices_compile_for_sm90(
    dtype: str, log2_levels: int, block: int, store_codes: bool, independent: bool, tables_first: bool,
    persistent: bool,
) -> None:  # fmt: skip
    flags = {**_bucket_flags(dtype, log2_levels), "INDEPENDENT": independent, "TABLES_FIRST": tables_first}
    pointers = {**COMMON, "values_ptr": "*i64"} if independent else COMMON  # value pairs as one int64
    ptx = _fused_ptx(log2_levels, BUCKET, block, False, store_codes, flags, persistent, pointers)
    per_thread = 4096 // (8 * 32)
    assert _scalar_loads(ptx) <= 5, _scalar_loads(ptx)
    if independent:  # per value one midpoint and one 64-bit value pair, both indexed by the bucket
        assert _shared_loads(ptx, r"\.b64") >= per_thread and _shared_loads(ptx, r"\.b32") >= per_thread
    else:
        assert _shared_loads(ptx, r"\.b32") >= per_thread * (flags["WINDOW"] + 1), _shared_loads(ptx)
    if persistent:  # the next tile's weights: 16-byte loads behind a predicate (none past the last tile)
        assert len(re.findall(r"@%p\d+ ld\.global(\.[a-z0-9_]+)*\.v4\.b32", ptx)) >= 2, "no prefetch"


UNIFORM_CASES = [(8, 64, True), (6, 1024, False), (3, 100, True)]  # (log2_levels, block, tables_first)


@pytest.mark.parametrize(("log2_levels", "block", "tables_first"), UNIFORM_CASES)
def test_uniform_search_compiles_for_sm90(log2_levels: int, block: int, tables_first: bool) -> None:
    # The int grid's search (FusedChoice.uniform_from_log2): per value two shared-memory reads (the one
    # midpoint compared, the value), no table of bucket starts (no byte reads).
    from kernels import triton_fused

    assert triton_fused.SEARCH_UNIFORM == UNIFORM
    flags = {**NO_BUCKETS, "TABLES_FIRST": tables_first}
    ptx = _fused_ptx(log2_levels, UNIFORM, block, block != 64, False, flags)
    per_thread = 4096 // (8 * 32)
    assert _scalar_loads(ptx) <= 5, _scalar_loads(ptx)
    assert _shared_loads(ptx, r"\.b32") >= per_thread * 2, _shared_loads(ptx)
    assert _shared_loads(ptx, r"\.b8") == 0, _shared_loads(ptx, r"\.b8")


def _window_one_flags(table_of, dtype: str, log2_levels: int) -> dict[str, object]:
    """The constexprs `triton_fused._flags` passes for a one-midpoint lookup (packed or pair) whose table
    `table_of(levels)` builds (it must have one) for the codebook of (dtype, log2_levels)."""
    import torch

    from kernels import QuantSpec
    from kernels.blockwise import levels_for

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(log2_levels))
    table = table_of(levels_for(w, QuantSpec(dtype, log2_levels, 64)))
    assert table is not None
    return {"BUCKET_SHIFT": table.buckets.shift, "BUCKET_FIRST": table.buckets.first,
            "BUCKET_LOG2": table.buckets.log2_buckets, "WINDOW": 1, "INDEPENDENT": False,
            "TABLES_FIRST": True}  # fmt: skip


PACKED_CASES = [("nf", 8, 64), ("fp", 6, 1024), ("quantile", 4, 100)]  # (dtype, log2_levels, block)


@pytest.mark.parametrize(("dtype", "log2_levels", "block"), PACKED_CASES)
def test_packed_lookup_compiles_for_sm90(dtype: str, log2_levels: int, block: int) -> None:
    # The packed lookup (FusedChoice.packed_from_buckets): per value two 32-bit shared-memory reads (the
    # bucket's word, the value), no byte table, no float compare of a midpoint read from a table.
    from kernels import triton_fused
    from kernels.buckets import packed_table

    assert triton_fused.SEARCH_PACKED == PACKED
    flags = _window_one_flags(packed_table, dtype, log2_levels)
    words = {**COMMON, "mids_ptr": "*i32"}
    ptx = _fused_ptx(log2_levels, PACKED, block, block != 64, False, flags, pointers=words)
    per_thread = 4096 // (8 * 32)
    assert _scalar_loads(ptx) <= 5, _scalar_loads(ptx)
    assert _shared_loads(ptx, r"\.b32") >= per_thread * 2, _shared_loads(ptx)
    assert _shared_loads(ptx, r"\.b8") == 0, _shared_loads(ptx, r"\.b8")


PAIR_CASES = [("nf", 8, 64, False), ("fp", 6, 1024, True), ("quantile", 4, 100, False)]


@pytest.mark.parametrize(("dtype", "log2_levels", "block", "store_codes"), PAIR_CASES)
def test_pair_lookup_compiles_for_sm90(dtype: str, log2_levels: int, block: int, store_codes: bool) -> None:
    # The pair lookup (FusedChoice.pairs_from_log2): per value one 64-bit shared-memory read (the bucket's
    # value pair) and no other table read, but the bucket's start (one byte) where codes are stored.
    from kernels import triton_fused
    from kernels.buckets import mean_pairs

    assert triton_fused.SEARCH_PAIRS == PAIRS
    flags = _window_one_flags(mean_pairs, dtype, log2_levels)
    pairs = {**COMMON, "values_ptr": "*i64", "mids_ptr": "*i64"}
    ptx = _fused_ptx(log2_levels, PAIRS, block, block != 64, store_codes, flags, pointers=pairs)
    per_thread = 4096 // (8 * 32)
    assert _scalar_loads(ptx) <= 5, _scalar_loads(ptx)
    assert _shared_loads(ptx, r"\.b64") >= per_thread, _shared_loads(ptx, r"\.b64")
    assert _shared_loads(ptx, r"\.b8") == (per_thread if store_codes else 0), _shared_loads(ptx, r"\.b8")


def test_grid_value_and_split_compile_for_sm90() -> None:
    # The int grid's computed value (FusedChoice.computed_value_from_log2): one 32-bit shared-memory read
    # a value (its midpoint), not two. Split blocks (FusedChoice.split_from_block): a block of 1024 held by
    # one warp needs fewer barriers than one spread over the program's four warps (its absmax).
    from kernels import triton_fused

    assert triton_fused.SEARCH_GRID_VALUE == GRID_VALUE
    per_thread = 4096 // (8 * 32)
    ptx = _fused_ptx(8, GRID_VALUE, 64, False, False, {**NO_BUCKETS, "TABLES_FIRST": True}, fma=True)
    assert per_thread <= _shared_loads(ptx, r"\.b32") < per_thread * 2, _shared_loads(ptx, r"\.b32")
    flags = {**NO_BUCKETS, "TABLES_FIRST": True}
    spread = _fused_ptx(4, UNIFORM, 1024, False, False, flags, num_warps=4)  # 4 blocks, as launched
    split = _fused_ptx(
        4, UNIFORM, 1024, False, False, flags, split=1024 // triton_fused.SPLIT_SPAN, num_warps=4
    )
    assert split.count("bar.sync") < spread.count("bar.sync"), (
        split.count("bar.sync"),
        spread.count("bar.sync"),
    )


def test_two_pass_kernel_compiles_for_sm90() -> None:
    from kernels.triton_fused import _scaled_kernel

    pointers = ["x_ptr", "out_ptr", "codes_ptr", "absmax_ptr", "inv_ptr", "values_ptr", "mids_ptr",
                "starts_ptr"]  # fmt: skip
    sig = {**{k: COMMON.get(k, "*fp32") for k in pointers}, "n": "i32", "block": "i32"}
    sig.update(dict.fromkeys(["TILE", *FLAGS], "constexpr"))
    for log2_levels, search in ((4, SHARED), (8, SHARED), (3, CHAIN), (8, GLOBAL), (8, BUCKET), (8, UNIFORM)):
        buckets = _bucket_flags("nf", log2_levels) if search == BUCKET else NO_BUCKETS
        consts = {"TILE": 4096, "LOG2_LEVELS": log2_levels, "SEARCH": search, "STORE_OUT": True,
                  "STORE_CODES": False, "BF16_BY_HAND": False, **buckets}  # fmt: skip
        _check(_ptx(_scaled_kernel, sig, consts), divides=False)  # 1 / absmax comes from torch
