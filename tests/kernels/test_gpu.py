"""On a CUDA device: the fused Triton kernel equals the torch reference bit for bit on fresh inputs."""

from __future__ import annotations

import itertools
import os
from dataclasses import replace

import pytest
import torch

from kernels import CODEBOOKS, QuantSpec, fake_quantize, quantize

pytestmark = pytest.mark.gpu

SEED = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; printed on failure
# (shape, bits, block_size, torch_dtype): tails everywhere, both kernel paths (fused: whole-block programs
# and a masked tail launch; two-pass for block_size=None and blocks wider than MAX_FUSED_BLOCK), 3..8 and
# 16 bits (shared-memory search, sorted and Eytzinger order; global for 16). Kept short: few compilations.
# The default takes the bucketed search from 4 bits (FusedChoice(bucket_from_log2=4)); it has tests of its
# own below, and `test_every_launch_choice_agrees` keeps the binary search (bucket_from_log2=0) checked.
CASES = [
    ((1000, 333), 3, 64, torch.bfloat16),
    ((4099, 4096), 4, 64, torch.bfloat16),
    ((1000, 333), 4, 100, torch.float16),
    ((4099, 4096), 8, 1024, torch.bfloat16),
    ((513, 257), 5, None, torch.float32),
    ((1000, 333), 4, 16384, torch.bfloat16),
    ((257, 129), 16, 64, torch.float32),
    ((1000, 333), 6, 128, torch.bfloat16),  # Eytzinger-ordered shared-memory search, with a tail
    ((4096, 1024), 7, 1024, torch.float32),
]


def _fresh(shape: tuple[int, ...], torch_dtype: torch.dtype, salt: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(SEED + salt)
    w = torch.randn(*shape, generator=g, device="cuda") * 0.02
    w[0, : min(shape[1], 64)] = 0  # an all-zero block
    w.view(-1)[-1] = 0.5  # an outlier in the tail block
    return w.to(torch_dtype)


@pytest.mark.parametrize("dtype", list(CODEBOOKS))
def test_fused_equals_reference(dtype: str) -> None:
    for salt, (shape, bits, block, torch_dtype) in enumerate(CASES):
        w = _fresh(shape, torch_dtype, salt)
        spec = QuantSpec(dtype, bits, block)
        ref = fake_quantize(w, spec, impl="torch")
        fused = fake_quantize(w, spec, impl="triton")
        assert torch.equal(ref, fused), f"seed={SEED} {spec} {shape} {torch_dtype}"
        if bits == 4:
            qr, qf = quantize(w, spec, impl="torch"), quantize(w, spec, impl="triton")
            assert torch.equal(qr.codes, qf.codes), f"codes differ: seed={SEED} {spec} {shape}"
            assert torch.equal(qr.absmax, qf.absmax), f"absmax differs: seed={SEED} {spec} {shape}"


def test_auto_uses_the_kernel_and_keeps_columns() -> None:
    w = _fresh((512, 256), torch.bfloat16, 99)
    spec = QuantSpec("nf", 4, 64)
    assert torch.equal(fake_quantize(w, spec), fake_quantize(w, spec, impl="triton"))
    keep = torch.tensor([3, 100, 255], device="cuda")
    assert torch.equal(fake_quantize(w, spec, keep, impl="torch"), fake_quantize(w, spec, keep))
    centered = QuantSpec("nf", 4, 64, centering=True)  # torch only
    assert torch.equal(fake_quantize(w, centered), fake_quantize(w, centered, impl="torch"))


def test_tiny_and_subnormal_blocks() -> None:
    # absmax < 2^-64 and bf16/float32 subnormals: the exact 2^64 rescale, no flush-to-zero anywhere
    base = torch.tensor([1e-39, 0.0, -5e-40, 3e-40, 7e-45, 1e-30, -2e-30, 1e-20], device="cuda")
    for torch_dtype in (torch.bfloat16, torch.float32):
        w = (base.repeat(1000) * torch.rand(8000, device="cuda")).to(torch_dtype).reshape(80, 100)
        for block in (2, 64, None):
            spec = QuantSpec("nf", 4, block)
            assert torch.equal(fake_quantize(w, spec, impl="torch"), fake_quantize(w, spec, impl="triton"))


def test_nan_and_inf_are_rejected_on_gpu() -> None:
    for block in (64, None):
        for bad in (float("nan"), float("inf")):
            w = _fresh((64, 64), torch.bfloat16, 7)
            w[10, 10] = bad
            with pytest.raises(ValueError, match="NaN or Inf"):
                fake_quantize(w, QuantSpec("int", 4, block), impl="triton")


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_every_launch_choice_agrees(bits: int) -> None:
    from kernels.blockwise import levels_for
    from kernels.triton_fused import FusedChoice, fused_fake_quantize

    off = {"packed_from_buckets": 0, "pairs_from_log2": 0}  # the bucketed search's own choices
    choices = [FusedChoice(max_chain_log2=8), FusedChoice(max_shared_log2=0), FusedChoice(bucket_from_log2=0),
               FusedChoice(values_per_thread=32), FusedChoice(values_per_thread=8, num_warps=4),
               FusedChoice(independent=True, **off), FusedChoice(tables_first=False, **off),
               FusedChoice(programs_per_sm=4, **off), FusedChoice(independent=True, programs_per_sm=4, **off),
               FusedChoice(independent=True, programs_per_sm=1, values_per_thread=4, **off),
               FusedChoice(l1_tables=True), FusedChoice(l1_tables=True, independent=True, **off),
               FusedChoice(packed_from_buckets=1), FusedChoice(packed_from_buckets=1, tables_first=False),
               FusedChoice(packed_from_buckets=1, programs_per_sm=4), FusedChoice(pairs_from_log2=1),
               FusedChoice(pairs_from_log2=1, tables_first=False, values_per_thread=32),
               FusedChoice(split_from_block=512),
               FusedChoice(split_from_block=512, pairs_from_log2=1, programs_per_sm=4),
               FusedChoice(split_from_block=512, computed_value_from_log2=1, wide_from_log2=4)]  # fmt: skip
    for salt, (shape, block) in enumerate([((4099, 4096), 64), ((1000, 333), 1024), ((513, 257), None)]):
        w = _fresh(shape, torch.bfloat16, 100 + salt)
        spec = QuantSpec("nf", bits, block)
        ref = fake_quantize(w, spec, impl="torch")
        levels = levels_for(w, spec)
        for choice in choices:
            assert torch.equal(fused_fake_quantize(w, spec, levels, choice=choice), ref), (
                f"seed={SEED} {choice}"
            )


@pytest.mark.parametrize("dtype", list(CODEBOOKS))
def test_bucket_search_equals_reference(dtype: str) -> None:
    from kernels.blockwise import levels_for
    from kernels.buckets import packed_table
    from kernels.triton_fused import (
        SEARCH_BUCKET,
        SEARCH_PACKED,
        FusedChoice,
        _flags,
        fused_fake_quantize,
        fused_quantize,
    )

    bucket = FusedChoice(
        bucket_from_log2=6, uniform_from_log2=0, packed_from_buckets=0, pairs_from_log2=0
    )  # int too
    packed = FusedChoice(bucket_from_log2=6, uniform_from_log2=0, packed_from_buckets=1, pairs_from_log2=0)
    cases = [((4099, 4096), 8, 64, torch.bfloat16), ((1000, 333), 7, 100, torch.float32),
             ((513, 257), 6, None, torch.bfloat16), ((4096, 1024), 8, 1024, torch.float16)]  # fmt: skip
    for salt, (shape, bits, block, torch_dtype) in enumerate(cases):
        w = _fresh(shape, torch_dtype, 200 + salt)
        spec = QuantSpec(dtype, bits, block)
        levels = levels_for(w, spec)
        assert _flags(w, levels, True, False, bucket)["SEARCH"] == SEARCH_BUCKET, f"no table: {spec}"
        ref = fake_quantize(w, spec, impl="torch", levels=levels)
        assert torch.equal(fused_fake_quantize(w, spec, levels, choice=bucket), ref), f"seed={SEED} {spec}"
        codes = fused_quantize(w, spec, levels, choice=bucket)[0]
        assert torch.equal(codes, quantize(w, spec, impl="torch").codes), f"seed={SEED} {spec}"
        if packed_table(levels) is not None:  # all here but 8-bit dynamic
            assert _flags(w, levels, True, False, packed)["SEARCH"] == SEARCH_PACKED
            assert torch.equal(fused_fake_quantize(w, spec, levels, choice=packed), ref), (
                f"seed={SEED} {spec}"
            )
            codes = fused_quantize(w, spec, levels, choice=packed)[0]
            assert torch.equal(codes, quantize(w, spec, impl="torch").codes), f"seed={SEED} {spec}"


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_uniform_search_equals_reference(bits: int) -> None:
    # The int grid's arithmetic search from 3 bits (FusedChoice(uniform_from_log2=1)), with its two tables
    # and without (arithmetic_from_log2=1: compiled IEEE divisions): compiled float32 arithmetic only moves
    # the guess inside its margin; codes and outputs are the reference's.
    from kernels.blockwise import levels_for
    from kernels.triton_fused import (
        SEARCH_ARITHMETIC,
        SEARCH_GRID_VALUE,
        SEARCH_UNIFORM,
        FusedChoice,
        _flags,
        fused_fake_quantize,
        fused_quantize,
    )

    tables = FusedChoice(uniform_from_log2=1, arithmetic_from_log2=0, computed_value_from_log2=0)
    late = FusedChoice(
        uniform_from_log2=1, computed_value_from_log2=0, tables_first=False, values_per_thread=32
    )
    computed = FusedChoice(uniform_from_log2=1, arithmetic_from_log2=1)  # no tables (`_arithmetic_lookup`)
    grid_value = FusedChoice(computed_value_from_log2=1)  # the midpoint read, the value computed
    for salt, (shape, block, torch_dtype, choice) in enumerate([
        ((4099, 4096), 64, torch.bfloat16, tables),
        ((1000, 333), 1024, torch.float16, late),
        ((513, 257), None, torch.bfloat16, tables),
        ((4099, 4096), 64, torch.bfloat16, computed),
        ((1000, 333), 1024, torch.float16, computed),
        ((513, 257), None, torch.bfloat16, computed),
        ((4099, 4096), 64, torch.bfloat16, grid_value),
        ((513, 257), None, torch.float16, grid_value),
    ]):  # fmt: skip
        w = _fresh(shape, torch_dtype, 400 + salt)
        spec = QuantSpec("int", bits, block)
        levels = levels_for(w, spec)
        kind = (
            SEARCH_ARITHMETIC
            if choice is computed
            else SEARCH_GRID_VALUE
            if choice is grid_value
            else SEARCH_UNIFORM
        )
        assert _flags(w, levels, True, False, choice)["SEARCH"] == kind
        ref = fake_quantize(w, spec, impl="torch", levels=levels)
        assert torch.equal(fused_fake_quantize(w, spec, levels, choice=choice), ref), f"seed={SEED} {spec}"
        codes = fused_quantize(w, spec, levels, choice=choice)[0]
        assert torch.equal(codes, quantize(w, spec, impl="torch").codes), f"seed={SEED} {spec}"


@pytest.mark.parametrize("bits", [6, 8])
def test_bucket_search_edges(bits: int) -> None:
    # Compiled min/max/compare semantics: each midpoint and its float32 neighbours in blocks of absmax 1
    # (xn == x), +-0 and subnormals; NaN and Inf blocks (check_finite off) give the binary search's codes.
    from kernels.blockwise import levels_for
    from kernels.triton_fused import FusedChoice, _launch, fused_fake_quantize

    no = {"uniform_from_log2": 0, "packed_from_buckets": 0, "pairs_from_log2": 0}  # the bucketed search
    bucket = FusedChoice(bucket_from_log2=6, **no)
    ind_persist = FusedChoice(independent=True, programs_per_sm=2, **no)
    uniform = FusedChoice(uniform_from_log2=1)  # int only; the bucketed search for the others
    packed = FusedChoice(packed_from_buckets=1, uniform_from_log2=0, pairs_from_log2=0)  # not 8-bit dynamic
    pairs = FusedChoice(pairs_from_log2=1, pairs_max_buckets=4096, uniform_from_log2=0)  # midpoints computed
    pairs_persist = FusedChoice(pairs_from_log2=1, programs_per_sm=2, uniform_from_log2=0)
    grid_value = FusedChoice(computed_value_from_log2=1)  # int: the value computed; the others as default
    choices = (bucket, ind_persist, uniform, packed, pairs, pairs_persist, grid_value)
    for dtype, choice in itertools.product(("int", "nf", "fp", "dynamic", "quantile"), choices):
        spec = QuantSpec(dtype, bits, 64)
        levels = levels_for(torch.zeros(1, device="cuda"), spec)
        mids = levels.mids[levels.mids.isfinite()]
        inf = torch.tensor(float("inf"), device="cuda")
        specials = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39], device="cuda")
        values = torch.cat([mids, torch.nextafter(mids, inf), torch.nextafter(mids, -inf), specials])
        blocks = torch.nn.functional.pad(values, (0, -values.numel() % 63)).view(-1, 63)
        x = torch.cat([blocks, torch.ones(blocks.shape[0], 1, device="cuda")], 1).reshape(-1)
        ref = fake_quantize(x, spec, impl="torch", levels=levels)
        assert torch.equal(fused_fake_quantize(x, spec, levels, choice=choice), ref), (spec, choice)
        x = _fresh((6, 64), torch.float32, 300)
        x[1, 5], x[3, 7], x[4, 0] = float("nan"), float("inf"), float("-inf")
        out, codes, _ = _launch(x, spec, levels, True, torch.uint8, choice)
        base_out, base_codes, _ = _launch(x, spec, levels, True, torch.uint8)
        assert codes is not None and base_codes is not None and torch.equal(codes, base_codes), spec
        assert codes[64 + 5] == codes[3 * 64 + 7] == 0, spec
        torch.testing.assert_close(out, base_out, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("block", [16, 64, 128, 256, 512, 1024])
def test_resident_pair_kernel_is_bit_exact(block: int) -> None:
    # kernels.cuda_pairs (the table resident for the launch, bf16 fake quantization): bit for bit the
    # Triton kernel's output and absmax (NaN bits included) and the torch reference's values, on bf16
    # neighbours of every midpoint in blocks of absmax 1, the same scaled into tiny blocks (the 2^64
    # path), subnormals, +-0, NaN, Inf and zero blocks, random weights and a tail past the last whole turn
    # of 1,024 values (the Triton kernel's, a partial block at 1,024).
    from kernels.blockwise import levels_for, reference_fake_quantize
    from kernels.triton_fused import FusedChoice, _flags, _launch, resident_values

    triton_only = FusedChoice(resident_from_buckets=0, resident_wide_from_buckets=0)
    taken = []
    for dtype, bits in (("nf", 7), ("nf", 8), ("quantile", 8), ("dynamic", 8), ("fp", 8), ("dynamic", 6)):
        # both load kinds, the bucket geometry compiled in or read from the arguments
        resident = FusedChoice(resident_from_buckets=1, resident_streaming=bits == 8,
                               resident_constant_geometry=dtype != "nf")  # fmt: skip
        spec = QuantSpec(dtype, bits, block)
        w = _fresh((37, 1088), torch.bfloat16, block + bits)
        levels = levels_for(w, spec)
        mids = levels.mids[levels.mids.isfinite()].to(torch.bfloat16)
        up, down = ((mids.view(torch.int16) + d).view(torch.bfloat16) for d in (1, -1))
        specials = torch.tensor([0.0, -0.0, 1e-40, -9e-41], device="cuda").bfloat16()
        edge = torch.cat([mids, up, down, specials])
        rows = torch.nn.functional.pad(edge.float(), (0, -edge.numel() % (block - 1))).view(-1, block - 1)
        edge = torch.cat([rows, torch.ones(rows.shape[0], 1, device="cuda")], 1).reshape(-1)
        special = torch.zeros(4, block, device="cuda")
        special[0, 3], special[1, 0], special[2, -1] = float("nan"), float("inf"), float("-inf")
        special[3] = 1e-40  # a subnormal block
        # subnormals beside the fast path's largest absmax (xn subnormal) and past it (xn underflows)
        sub = torch.tensor([2.0**-133, -(2.0**-133), 1e-40, -9e-41, 0.0, -0.0], device="cuda")
        wide = torch.cat([sub.repeat(block // 8), torch.zeros(block - 6 * (block // 8), device="cuda")])
        wide = torch.stack([wide, wide, wide])
        wide[0, -1], wide[1, -1], wide[2, -1] = 2.0**15, 2.0**15 + 256, 2.0**20
        # absmax 1, tiny (the 2^64 path), small, near and past the fast path's largest (2^15)
        scaled = [edge * f for f in (1.0, 1e-30, 1e-10, 16384.0, 2.0**20)]
        x = torch.cat([*scaled, wide.reshape(-1), special.reshape(-1), w.float().reshape(-1)]).bfloat16()
        flags = _flags(x, levels, True, False, resident)
        n_resident = resident_values(x, block, levels, flags, True, resident)
        # a quantile codebook of small blocks repeats +-1 (no pair table): all on Triton, still checked
        assert n_resident >= x.numel() - 1024 or (dtype == "quantile" and n_resident == 0), spec
        taken.append(n_resident > 0)
        base, _, base_absmax = _launch(x, spec, levels, True, None, triton_only)
        ref = reference_fake_quantize(x, spec, levels, check_finite=False)
        for fast in (True, False):  # the fast path where a turn allows it; the exact path only
            out, _, absmax = _launch(x, spec, levels, True, None, replace(resident, resident_fast=fast))
            assert out is not None and base is not None
            assert torch.equal(out.view(torch.int16), base.view(torch.int16)), f"seed={SEED} {spec} {fast}"
            torch.testing.assert_close(absmax, base_absmax, rtol=0, atol=0, equal_nan=True)
            finite = torch.isfinite(absmax).repeat_interleave(block)[: x.numel()]  # NaN/Inf blocks: Triton's
            torch.testing.assert_close(out[finite], ref[finite], rtol=0, atol=0, msg=f"seed={SEED} {spec}")
    assert sum(taken) >= len(taken) - 1, taken
