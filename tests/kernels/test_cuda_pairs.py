"""kernels.cuda_pairs on the CPU: which weights it takes, its constants, and that its source parses.

Its output is checked bit for bit on a GPU (`test_gpu.py::test_resident_pair_kernel_is_bit_exact`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels import QuantSpec, cuda_pairs, scaling
from kernels.blockwise import levels_for
from kernels.buckets import MeanPairs, mean_pairs, pair_floats, pair_values
from kernels.triton_fused import (
    DEFAULT_CHOICE,
    FusedChoice,
    _flags,
    resident_table,
    resident_values,
    resident_variant,
)
from tests.kernels import cuda_syntax


def test_prefix_values_takes_whole_turns_of_bf16_with_a_small_pair_table() -> None:
    bf16 = torch.bfloat16
    assert cuda_pairs.prefix_values(5000, bf16, 64, 1024, 0) == 4096  # whole turns; the tail on Triton
    assert cuda_pairs.prefix_values(1023, bf16, 64, 1024, 0) == 0  # not one turn
    for block in (16, 32, 64, 128, 256, 512, 1024):
        assert cuda_pairs.prefix_values(2048, bf16, block, 4096, 256) == 2048, block
    for refused in (None, 8, 48, 100, 2048):  # tensor-wise, too small, not a power of two, over a turn
        assert cuda_pairs.prefix_values(2048, bf16, refused, 1024, 0) == 0, refused
    assert cuda_pairs.prefix_values(2048, bf16, 64, 6144, 0) == 2048  # 48 KB: the most it holds
    assert cuda_pairs.prefix_values(2048, bf16, 64, 8192, 0) == 0
    assert cuda_pairs.prefix_values(2048, bf16, 64, None, 0) == 0  # no pair table
    assert cuda_pairs.prefix_values(2048, torch.float16, 64, 1024, 0) == 0
    assert cuda_pairs.prefix_values(2048, bf16, 64, 1024, 8) == 0  # misaligned for 16-byte loads


def test_resident_path_is_never_planned_off_cuda() -> None:
    w = torch.randn(64, 1024).bfloat16()
    spec = QuantSpec("nf", 8, 64)
    levels = levels_for(w, spec)
    pairs = mean_pairs(levels, cuda_pairs.MAX_TABLE_BYTES // 8)
    assert pairs is not None and pairs.values.numel() == 1024
    assert cuda_pairs.prefix_values(w.numel(), w.dtype, 64, pairs.values.numel(), w.data_ptr()) == w.numel()
    assert not cuda_pairs.runtime_available(w.device)
    assert cuda_pairs.plan(w.view(-1), 64, pairs) is None
    flags = _flags(w, levels, True, False, DEFAULT_CHOICE)
    assert resident_values(w.view(-1), 64, levels, flags, True, DEFAULT_CHOICE) == 0


def test_resident_rule_by_table_size_and_block() -> None:
    # Which codebooks would go resident on a GPU (the rule before the device check): 512 buckets and
    # more at any block, 256 and more at blocks of 512 and over, never the int grid or the codes path.
    choice = DEFAULT_CHOICE
    w = torch.randn(64, 1024).bfloat16()

    def wants(dtype: str, bits: int, block: int, fake_only: bool = True) -> bool:
        levels = levels_for(w, QuantSpec(dtype, bits, block))
        flags = _flags(w, levels, True, not fake_only, choice)
        return resident_table(levels, flags, block, fake_only, torch.bfloat16, choice) is not None

    assert wants("nf", 8, 64) and wants("nf", 7, 64) and wants("fp", 8, 64) and wants("dynamic", 8, 1024)
    assert not wants("fp", 7, 64) and not wants("nf", 6, 64)
    assert wants("nf", 6, 1024) and wants("fp", 7, 512) and not wants("fp", 6, 1024)
    assert wants("int", 8, 512) and not wants("int", 8, 256) and not wants("int", 7, 1024)
    assert not wants("int", 8, 1024)  # resident_grid_max_block
    assert not wants("nf", 8, 64, fake_only=False)
    levels = levels_for(w, QuantSpec("nf", 8, 64))
    flags = _flags(w, levels, True, False, choice)
    assert resident_table(levels, flags, 64, True, torch.float16, choice) is None  # bf16 only
    off = FusedChoice(resident_from_buckets=0, resident_wide_from_buckets=0)
    levels = levels_for(w, QuantSpec("nf", 8, 64))
    assert resident_values(w.view(-1), 64, levels, _flags(w, levels, True, False, off), True, off) == 0


@pytest.mark.parametrize("dtype", ["nf", "quantile", "dynamic"])
def test_eight_bit_tables_fit(dtype: str) -> None:
    # Every 8-bit lookup codebook the project builds has a pair table the kernel holds (dynamic: 4,096).
    levels = levels_for(torch.randn(256, 64), QuantSpec(dtype, 8, 64))
    pairs = mean_pairs(levels, cuda_pairs.MAX_TABLE_BYTES // 8)
    assert pairs is not None and pairs.values.numel() * 8 <= cuda_pairs.MAX_TABLE_BYTES


def test_the_default_choice_launches_the_default_variant() -> None:
    # One set of defaults: FusedChoice's resident_* fields and cuda_pairs.Variant (kernel_anatomy counts it).
    assert resident_variant(DEFAULT_CHOICE) == cuda_pairs.Variant()
    assert resident_variant(FusedChoice(resident_threads=1024, resident_per_sm=1)).threads == 1024


def test_programs_a_multiprocessor_holds() -> None:
    # H200 (228 KB, 2,048 threads): four programs of 256 threads, each with 8-bit dynamic's 32 KB table.
    assert cuda_pairs.programs_per_sm(4, 256, 32768, 233472, 2048) == 4
    assert cuda_pairs.programs_per_sm(4, 256, 32768, 102400, 1536) == 3  # sm_86: 100 KB a multiprocessor
    assert cuda_pairs.programs_per_sm(4, 512, 2048, 233472, 1536) == 3  # threads bound it
    assert cuda_pairs.programs_per_sm(2, 256, 49152, 40000, None) == 1  # never 0
    assert cuda_pairs.programs_per_sm(4, 256, 32768, None, None) == 4  # a torch without the properties


def test_a_variant_names_what_it_refuses() -> None:
    with pytest.raises(ValueError, match="threads=100: a multiple of 32"):
        cuda_pairs.Variant(threads=100)
    with pytest.raises(ValueError, match="per_sm=4: at least 1, and threads x per_sm at most 2,048"):
        cuda_pairs.Variant(threads=1024, per_sm=4)


def test_source_constants_are_the_reference_scaling() -> None:
    text = cuda_pairs.source_for(256)
    defines = dict(line.split()[1:3] for line in text.splitlines() if line.startswith("#define "))
    assert defines["BLOCK"] == "256" and defines["STREAMING"] == "0"
    assert "#define STREAMING 1" in cuda_pairs.source_for(256, cuda_pairs.Variant(streaming=True))
    assert float.fromhex(defines["TINY_ABSMAX"].rstrip("f")) == float(scaling.TINY_ABSMAX)
    assert float.fromhex(defines["TINY_SCALE"].rstrip("f")) == float(scaling.TINY_SCALE)


def _bf16_grid(absmax: float) -> torch.Tensor:
    """Every finite bfloat16 of magnitude at most absmax, as float32 (subnormals and -0 included)."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    return every[every.isfinite() & (every.abs() <= absmax)]


def _fast_values(v: torch.Tensor, inv: float, pairs: MeanPairs) -> torch.Tensor:
    """`quantize8<true>`'s value for each float32 v, step for step: x2 = fma(v, 2 inv, +0) (the product
    is exact in float64, then rounded once), the bucket from x2's bits, then sum < x2."""
    shift, first, flip = cuda_pairs.geometry_of(pairs)
    first2 = first + (1 << (23 - shift))
    low2 = torch.tensor([first2 << shift], dtype=torch.int32).view(torch.float32)
    x2 = (v.double() * (2.0 * inv) + 0.0).float()
    bits = x2.abs().clamp(max=2.0).maximum(low2).view(torch.int32)
    bucket = ((bits >> shift) - first2) ^ ((x2.view(torch.int32) >> 31) & flip)
    lo, hi = pair_floats(pairs.values.cpu()[bucket.long()])
    return torch.where(lo + hi < x2, hi, lo)


@pytest.mark.parametrize("dtype", ["int", "fp", "nf", "quantile", "dynamic"])
def test_fast_path_takes_the_exact_paths_value_for_every_bf16(dtype: str) -> None:
    # The kernel's fast path (blocks of absmax in [2^-64, 2^15]) against `pair_values`, the torch mirror
    # of the exact path (xn = v * (1 / absmax), mid = (lo + hi) * 0.5 < xn), for every bf16 a block of
    # that absmax can hold: subnormals (xn subnormal), -0 (xn >= 0 holds), the edges of the range.
    w = torch.randn(512, 64)
    for bits in range(3, 9):
        levels = levels_for(w, QuantSpec(dtype, bits, 64))
        pairs = mean_pairs(levels, cuda_pairs.MAX_TABLE_BYTES // 8)
        assert pairs is not None and cuda_pairs.fast_exact(pairs), (dtype, bits)
        for absmax in (2.0**-64, 3.1e-20, 1.2e-10, 0.0123, 1.0, 3.75, 20000.0, cuda_pairs.FAST_MAX_ABSMAX):
            top = torch.tensor([absmax]).bfloat16().float()
            inv = float(torch.reciprocal(top))  # float32 1 / absmax, correctly rounded (as __frcp_rn)
            v = _bf16_grid(float(top))
            xn = (v.double() * inv).float()
            _, exact = pair_values(xn, levels, cuda_pairs.MAX_TABLE_BYTES // 8)
            fast = _fast_values(v, inv, pairs)
            differ = (fast.view(torch.int32) != exact.view(torch.int32)).nonzero().flatten()
            assert differ.numel() == 0, (dtype, bits, absmax, v[differ[:4]].tolist())


def test_fast_path_refuses_a_table_whose_sums_are_too_small() -> None:
    # A pair summing to a tiny nonzero float would halve inexactly: `fast_exact` leaves it to the exact path.
    pairs = mean_pairs(levels_for(torch.randn(512, 64), QuantSpec("nf", 4, 64)))
    assert pairs is not None and cuda_pairs.fast_exact(pairs)
    lo, hi = torch.tensor([2.0**-126]).view(torch.int32).long(), torch.tensor([-(2.0**-127)])
    tiny = pairs.values.clone()
    tiny[3] = (lo & 0xFFFFFFFF) | (hi.view(torch.int32).long() << 32)
    assert not cuda_pairs.fast_exact(MeanPairs(pairs.buckets, pairs.starts, tiny))


GEOMETRY = (15, 30680, 2047)
V = cuda_pairs.Variant


@pytest.mark.skipif(not cuda_syntax.gxx_available(), reason="needs g++")
@pytest.mark.parametrize(
    ("block", "variant"),
    [
        (16, V()),
        (64, V(streaming=True, constant=True)),
        (512, V(constant=True, pipeline=True, threads=512)),
        (1024, V(streaming=True, pipeline=True, threads=512, per_sm=2)),
    ],
)
def test_source_parses_as_cpp(block: int, variant: cuda_pairs.Variant, tmp_path: Path) -> None:
    # NVRTC compiles it on the GPU; here it must at least parse as C++ for every shape of block (the
    # lane and load groupings differ below and above 256), both kinds of loads, geometry compiled in or
    # not, pipelined or not.
    text = cuda_pairs.source_for(block, variant, GEOMETRY if variant.constant else None)
    assert ("#define CONST_SHIFT 15" in text) == variant.constant
    assert (
        f"#define THREADS {variant.threads}" in text and f"#define PIPELINE {int(variant.pipeline)}" in text
    )
    cuda_syntax.check_parses(text, tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where NVRTC cannot compile")
def test_a_kernel_that_cannot_compile_warns_and_leaves_the_weights_to_triton() -> None:
    # Here NVRTC has no GPU (a CPU build of torch): the compile fails for real, warns once per block size
    # and returns None, which `plan` turns into 0 values (the Triton kernel quantizes all of them).
    with pytest.warns(RuntimeWarning, match="did not compile for block 64"):
        assert cuda_pairs._kernel.__wrapped__(64, cuda_pairs.Variant(), None, 0) is None
