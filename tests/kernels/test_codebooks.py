"""Codebook invariants for every data type x bits, the known tables, and the registry's errors."""

from __future__ import annotations

import pytest
import torch

from kernels import CODEBOOKS, codebook, default_exponent_bits
from kernels.codebooks import MAX_BITS, MIN_BITS, _fp_values, levels_from_values, static_levels

ALL_BITS = range(MIN_BITS, MAX_BITS + 1)
STATIC = ["int", "fp", "nf", "dynamic"]

# QLoRA's published NF4 table (bitsandbytes' float32 values, printed as doubles).
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]  # fmt: skip

EXPECTED_SIZE = {"int": lambda k: 2**k - 1, "fp": lambda k: 2**k - 1, "nf": lambda k: 2**k,
                 "dynamic": lambda k: 2**k, "quantile": lambda k: 2**k}  # fmt: skip


def _values(dtype: str, bits: int) -> torch.Tensor:
    if dtype == "quantile":
        return codebook(dtype, bits, w=torch.randn(400, 300, generator=torch.Generator().manual_seed(bits)))
    return codebook(dtype, bits)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("dtype", list(CODEBOOKS))
def test_codebook_invariants(dtype: str, bits: int) -> None:
    v = _values(dtype, bits)
    assert v.dtype == torch.float32 and v.dim() == 1
    assert v.numel() == EXPECTED_SIZE[dtype](bits) <= 2**bits
    assert bool((v[1:] >= v[:-1]).all()), "sorted"
    if dtype != "quantile":  # quantile codes may repeat when the tensor has few distinct values
        assert torch.unique(v).numel() == v.numel(), "distinct"
    assert float(v.min()) >= -1.0 and float(v.max()) <= 1.0
    assert float(v.abs().max()) == 1.0
    assert bool((v == 0).any()), "exact zero"
    if dtype in ("int", "fp", "nf"):
        assert float(v.min()) == -1.0 and float(v.max()) == 1.0


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("dtype", STATIC)
def test_levels_midpoints(dtype: str, bits: int) -> None:
    lv = static_levels(dtype, bits, None, torch.device("cpu"))
    n = lv.values.numel()
    assert lv.mids.numel() == 2**bits
    assert bool(torch.isinf(lv.mids[n - 1 :]).all()) and bool(torch.isfinite(lv.mids[: n - 1]).all())
    assert bool((lv.mids[: n - 1] > lv.values[:-1]).all()) and bool((lv.mids[: n - 1] < lv.values[1:]).all())


def test_int3_table() -> None:
    expected = torch.tensor([-3, -2, -1, 0, 1, 2, 3], dtype=torch.float64) / 3
    assert torch.equal(codebook("int", 3), expected.float())
    assert torch.equal(codebook("int", 8) * 127, torch.arange(-127, 128, dtype=torch.float32))


def test_e2m1_table() -> None:
    v = codebook("fp", 4, exponent_bits=2)
    expected = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12], dtype=torch.float64) / 12
    assert torch.equal(v[v >= 0], expected.float())
    assert torch.equal(v[v < 0], -expected[1:].flip(0).float())
    assert torch.equal(codebook("fp", 4), v), "E2 is the 4-bit default"


def test_nf4_is_qlora_table() -> None:
    assert torch.equal(codebook("nf", 4), torch.tensor(NF4, dtype=torch.float32))


def test_default_exponent_bits_rule() -> None:
    assert [default_exponent_bits(k) for k in range(3, 9)] == [2, 2, 3, 3, 4, 4]
    assert [default_exponent_bits(k) for k in range(9, 17)] == [5] * 8


@pytest.mark.parametrize("bits", ALL_BITS)
def test_every_exponent_width(bits: int) -> None:
    for e in range(1, min(bits - 1, 6) + 1):
        v = codebook("fp", bits, exponent_bits=e)
        assert v.numel() == 2**bits - 1 and torch.unique(v).numel() == v.numel()
        assert float(v[v > 0].min()) >= torch.finfo(torch.float32).tiny


def test_fp16_layout_extends_ieee_half() -> None:
    # E5M10 without inf/NaN: IEEE half's finite values, plus the binade IEEE spends on inf/NaN.
    half = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).double()
    v = _fp_values(16, None)
    top = (2 - 2**-10) * 2.0**15  # largest value with exponent field 31, bias 16 (IEEE: 15)
    positive = v[v >= 0] * top
    assert positive.numel() == 0x8000
    torch.testing.assert_close(positive[: half.numel()], half / 2, rtol=1e-13, atol=0)


def test_dynamic_8bit_matches_bitsandbytes_layout() -> None:
    v = codebook("dynamic", 8).double()
    assert v.numel() == 256 and float(v.max()) == 1.0
    pos = v[(v > 0) & (v < 1)]
    # 2^(6-z) bins of [0.1, 1] per decade 10^-z, z = 0..6
    for z in range(7):
        in_decade = pos[(pos > 0.1 * 10.0**-z * 0.999) & (pos < 10.0**-z)]
        assert in_decade.numel() == 2 ** (6 - z), z


def test_unknown_dtype_suggests_close_match() -> None:
    with pytest.raises(KeyError, match=r"'nf'"):
        codebook("nff", 4)
    with pytest.raises(KeyError, match="allowed: int, fp, nf, quantile, dynamic"):
        codebook("float", 4)


def test_quantile_needs_tensor() -> None:
    with pytest.raises(ValueError, match="needs the tensor"):
        codebook("quantile", 4)
    with pytest.raises(ValueError, match="data-dependent"):
        static_levels("quantile", 4, None, torch.device("cpu"))


@pytest.mark.parametrize("bits", [2, 17, 0, 4.0, True, "4"])
def test_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match=r"bits=.* 3\.\.16"):
        codebook("fp", bits)  # type: ignore[arg-type]  (int, nf and quantile also take 2)


def test_bad_exponent_bits() -> None:
    with pytest.raises(ValueError, match=r"exponent_bits=4 is impossible for a 4-bit float; allowed: 1\.\.3"):
        codebook("fp", 4, exponent_bits=4)
    with pytest.raises(ValueError, match=r"allowed: 1\.\.6"):
        codebook("fp", 16, exponent_bits=8)
    with pytest.raises(ValueError, match="allowed: 1"):
        codebook("fp", 8, exponent_bits=0)
    with pytest.raises(ValueError, match="only allowed for dtype 'fp'"):
        codebook("int", 8, exponent_bits=3)


def test_codebook_is_a_copy() -> None:
    v = codebook("nf", 4)
    v.zero_()
    assert torch.equal(codebook("nf", 4), torch.tensor(NF4))


def test_quantile_codebook_follows_tensor() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 100, generator=g)
    a = codebook("quantile", 4, w=w)
    assert torch.equal(a, codebook("quantile", 4, w=w.clone())), "deterministic"
    b = codebook("quantile", 4, w=w**3)
    assert not torch.equal(a, b)
    # Heavier tails after block normalization put more codes near 0.
    assert float(b.abs().median()) < float(a.abs().median())


def test_levels_from_duplicate_values() -> None:
    lv = levels_from_values(torch.tensor([-1.0, 0.0, 0.0, 1.0]))
    assert lv.mids.tolist()[:3] == [-0.5, 0.0, 0.5]
    x = torch.tensor([0.0, 0.25, -0.25, 0.75])
    codes = torch.bucketize(x, lv.mids, out_int32=True)
    assert codes.tolist() == [1, 2, 1, 3] and lv.values[codes].tolist() == [0.0, 0.0, 0.0, 1.0]
