"""pack/unpack for widths 1..16, and the packed size equals the bit accounting."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import CODEBOOKS, QuantSpec, bits_per_param, pack, quantize, unpack, weight_bits


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 1000, 1001):
        codes = torch.randint(0, 2**bits, (n,), generator=g)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(unpack(packed, bits, n), codes.to(torch.int32))


def test_pack_layout_is_lsb_first() -> None:
    assert pack(torch.tensor([1, 2, 3]), 4).tolist() == [0x21, 0x03]
    assert pack(torch.tensor([0b101]), 3).tolist() == [0b101]
    assert pack(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xBC, 0x3A, 0x12]
    assert pack(torch.tensor([[1, 0], [1, 1]], dtype=torch.uint8), 1).tolist() == [0b1101]


def test_four_bit_block_64_is_4_25() -> None:
    assert bits_per_param(QuantSpec("int", 4, 64), (128, 128)) == 4.25
    assert bits_per_param(QuantSpec("nf", 4, 1024), torch.Size([4096, 4096])) == 4 + 16 / 1024
    assert bits_per_param(QuantSpec("fp", 8, None), (10, 10)) == 8 + 16 / 100
    assert bits_per_param(QuantSpec("quantile", 4, 64), (128, 128)) == 4.25 + 16 * 16 / 128**2
    assert bits_per_param(QuantSpec("int", 4, 64, centering=True), (128, 128)) == 4.5


def test_tail_block_is_counted() -> None:
    # 1000 values, block 64: 15 full blocks + a tail of 40 -> 16 constants
    assert weight_bits(QuantSpec("int", 4, 64), (10, 100)) == 4000 + 16 * 16


def test_kept_columns_are_counted() -> None:
    spec = QuantSpec("int", 4, 64)
    # [64, 100] with 4 kept columns: 64*96 = 6144 quantized values (96 blocks) + 256 values in 16 bits
    assert weight_bits(spec, (64, 100), n_keep_columns=4) == 6144 * 4 + 96 * 16 + 256 * 16
    p = 4 / 100
    approx = 4 + 16 / 64 * (1 - p) + p * (16 - 4)  # the paper's k + 16/B + p(16 - k), blocks over the rest
    assert bits_per_param(spec, (64, 100), n_keep_columns=4) == pytest.approx(approx)
    assert weight_bits(spec, (64, 100), n_keep_columns=100) == 64 * 100 * 16


@pytest.mark.parametrize("bits", range(3, 17))
@pytest.mark.parametrize("dtype", list(CODEBOOKS))
def test_packed_bytes_equal_accounting(dtype: str, bits: int) -> None:
    shape = (24, 40)  # 960 values: 960 * bits divisible by 8; block 64 leaves a 0-value tail, 100 a 60
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(bits)).bfloat16()
    for block_size in (64, 100, None):
        spec = QuantSpec(dtype, bits, block_size)
        q = quantize(w, spec)
        stored = {
            "codes": pack(q.codes, bits),
            "absmax": q.absmax.to(torch.bfloat16).view(torch.uint8),  # exact: absmax is one of the weights
        }
        assert torch.equal(q.absmax.to(torch.bfloat16).float(), q.absmax)
        if CODEBOOKS[dtype].data_dependent:
            padded = torch.nn.functional.pad(q.codebook, (0, 2**bits - q.codebook.numel()))
            stored["codebook"] = padded.to(torch.float16).view(torch.uint8)
        n_bytes = sum(t.numel() for t in stored.values())
        assert n_bytes * 8 == weight_bits(spec, shape), (
            block_size,
            {k: v.numel() for k, v in stored.items()},
        )


def test_pack_errors() -> None:
    with pytest.raises(ValueError, match=r"bits=0 .* 1\.\.16"):
        pack(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match=r"bits=17"):
        unpack(torch.zeros(4, dtype=torch.uint8), 17, 1)
    with pytest.raises(ValueError, match=r"codes must lie in 0\.\.7 for bits=3; got 0\.\.8"):
        pack(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="integer tensor"):
        pack(torch.tensor([0.0]), 3)
    with pytest.raises(ValueError, match="need 2 bytes, packed has 1"):
        unpack(torch.zeros(1, dtype=torch.uint8), 4, 3)
    with pytest.raises(ValueError, match="uint8"):
        unpack(torch.zeros(1, dtype=torch.int32), 4, 1)


def test_accounting_errors() -> None:
    spec = QuantSpec("int", 4, 64)
    with pytest.raises(ValueError, match=r"n_keep_columns=101 is outside 0\.\.100"):
        bits_per_param(spec, (8, 100), n_keep_columns=101)
    with pytest.raises(ValueError, match="2-D"):
        bits_per_param(spec, (8, 10, 10), n_keep_columns=1)
    with pytest.raises(ValueError, match="positive sizes"):
        weight_bits(spec, (0, 10))
