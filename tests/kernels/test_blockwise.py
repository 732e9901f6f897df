"""The torch reference: nearest codes, round-trip bounds, idempotence, blocks, tails, kept columns."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import CODEBOOKS, QuantSpec, codebook, dequantize, fake_quantize, quantize
from kernels.blockwise import levels_for

TORCH_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _blocks(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    return list(x.reshape(-1).float().split(block))


@pytest.mark.parametrize("block_size", [64, 100, None])
@pytest.mark.parametrize("bits", [3, 4, 8, 16])
@pytest.mark.parametrize("dtype", list(CODEBOOKS))
def test_codes_are_nearest(dtype: str, bits: int, block_size: int | None) -> None:
    w = _randn(7, 33, seed=bits)  # 231 values: a tail block for 64 and 100
    spec = QuantSpec(dtype, bits, block_size)
    q = quantize(w, spec, impl="torch")
    block = block_size or w.numel()
    values = q.codebook.double()
    padded = torch.cat([torch.tensor([-math.inf]), values, torch.tensor([math.inf])])
    for i, (x, absmax) in enumerate(zip(_blocks(w, block), q.absmax, strict=True)):
        assert float(absmax) == float(x.abs().max())
        xn = x.double() / float(absmax)
        codes = q.codes[i * block : i * block + x.numel()].long()
        # In a sorted codebook the nearest code is at least as close as both neighbours.
        chosen = (xn - values[codes]).abs()
        assert bool((chosen <= (xn - padded[codes]).abs() + 1e-6).all())
        assert bool((chosen <= (xn - padded[codes + 2]).abs() + 1e-6).all())


@pytest.mark.parametrize("dtype", list(CODEBOOKS))
@pytest.mark.parametrize("torch_dtype", TORCH_DTYPES)
def test_round_trip_error_bound(dtype: str, torch_dtype: torch.dtype) -> None:
    w = _randn(16, 40, seed=1, dtype=torch_dtype)
    spec = QuantSpec(dtype, 4, 64)
    w_hat = fake_quantize(w, spec)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    v = levels_for(w, spec).values.double()
    # Every point of [-1, 1] lies within `radius` of a code.
    radius = max(float((v[1:] - v[:-1]).max()) / 2, 1 + float(v[0]), 1 - float(v[-1]))
    out_eps = torch.finfo(torch_dtype).eps
    for x, y in zip(_blocks(w, 64), _blocks(w_hat, 64), strict=True):
        absmax = float(x.abs().max())
        assert bool(((x - y).abs() <= absmax * (radius + out_eps) + 1e-12).all())


@pytest.mark.parametrize("bits", range(3, 17))
@pytest.mark.parametrize("dtype", ["int", "fp", "nf"])
def test_idempotent(dtype: str, bits: int) -> None:
    w = _randn(9, 50, seed=bits)
    for block_size in (64, 37, None):
        spec = QuantSpec(dtype, bits, block_size)
        once = fake_quantize(w, spec)
        assert torch.equal(fake_quantize(once, spec), once), block_size
        if bits <= 8:
            once16 = fake_quantize(w.bfloat16(), spec)
            assert torch.equal(fake_quantize(once16, spec), once16), block_size


@pytest.mark.parametrize("dtype", ["dynamic", "quantile"])
def test_requantizing_with_same_scale_and_codebook_keeps_codes(dtype: str) -> None:
    # dynamic has +1 but not -1 and quantile rebuilds its codebook from the data, so fake-quantizing
    # twice may rescale a block; with the scale and codebook held fixed the codes are stable.
    w = _randn(12, 40, seed=3)
    spec = QuantSpec(dtype, 5, 64)
    q = quantize(w, spec)
    w_hat = dequantize(q)
    blocks = torch.nn.functional.pad(w_hat.reshape(-1), (0, 512 - 480)).view(8, 64)
    mids = levels_for(w, spec).mids if dtype != "quantile" else None
    if mids is None:
        v = q.codebook.double()
        mids = torch.cat([((v[:-1] + v[1:]) / 2).float(), torch.tensor([math.inf])])
    codes = torch.bucketize(blocks * torch.reciprocal(q.absmax)[:, None], mids, out_int32=True)
    assert torch.equal(q.codebook[codes.reshape(-1)[:480]], q.codebook[q.codes.long()])


def test_dequantize_matches_fake_quantize() -> None:
    w = _randn(31, 17, seed=4, dtype=torch.bfloat16)
    for dtype in CODEBOOKS:
        for centering in (False, True):
            spec = QuantSpec(dtype, 4, 32, centering=centering)
            q = quantize(w, spec)
            assert q.codes.dtype == torch.uint8 and q.codes.numel() == w.numel()
            assert q.absmax.numel() == math.ceil(w.numel() / 32) and q.shape == (31, 17)
            assert torch.equal(dequantize(q), fake_quantize(w, spec))
    q16 = quantize(w, QuantSpec("int", 12, 64))
    assert q16.codes.dtype == torch.int32 and int(q16.codes.max()) < 2**12


def test_tail_block_gets_own_absmax() -> None:
    w = torch.ones(1, 70)
    w[0, 64:] = 0.01  # the 6-value tail block
    w_hat = fake_quantize(w, QuantSpec("int", 3, 64))
    assert torch.equal(w_hat, w), "each block's max maps to code 1 exactly"
    q = quantize(w, QuantSpec("int", 3, 64))
    assert q.absmax.tolist() == [1.0, pytest.approx(0.01)]


def test_block_larger_than_tensor_is_per_tensor() -> None:
    w = _randn(5, 6, seed=5)
    assert torch.equal(fake_quantize(w, QuantSpec("nf", 4, 1000)), fake_quantize(w, QuantSpec("nf", 4, None)))


@pytest.mark.parametrize("dtype", list(CODEBOOKS))
def test_all_zero_block_is_safe(dtype: str) -> None:
    w = _randn(4, 64, seed=6)
    w[1] = 0
    w_hat = fake_quantize(w, QuantSpec(dtype, 4, 64))
    assert bool(torch.isfinite(w_hat).all()) and bool((w_hat[1] == 0).all())
    assert bool((fake_quantize(torch.zeros(3, 5), QuantSpec(dtype, 4, None)) == 0).all())


@pytest.mark.parametrize("torch_dtype", [torch.float32, torch.bfloat16])
def test_tiny_blocks_stay_finite(torch_dtype: torch.dtype) -> None:
    # absmax below 2^-64 (down to subnormals): 1 / absmax would overflow without the exact 2^64 rescale
    w = torch.tensor([1e-39, 0.0, -5e-40, 3e-40, 1e-30, -2e-30, 3e-21, 1e-21]).to(torch_dtype)
    w_hat = fake_quantize(w, QuantSpec("int", 4, 2))
    assert bool(torch.isfinite(w_hat).all())
    assert w_hat[0] == w[0] and w_hat[5] == w[5] and w_hat[6] == w[6], "each block's max is exact"
    half_step = w.reshape(4, 2).abs().amax(1).repeat_interleave(2) / 14  # int4: steps of absmax / 7
    assert bool(((w_hat - w).abs() <= half_step * 1.01 + 1e-45).all())


def test_tie_goes_to_lower_code() -> None:
    v = codebook("int", 3).double()
    mid = float(((v[3] + v[4]) / 2).float())  # between 0 and 1/3, rounded to float32
    w = torch.tensor([1.0, mid, -mid, 0.5])
    w_hat = fake_quantize(w, QuantSpec("int", 3, None))
    assert w_hat.tolist() == [1.0, 0.0, pytest.approx(-1 / 3), pytest.approx(1 / 3)]


def test_shape_and_dtype_preserved() -> None:
    for shape in [(10,), (3, 4, 5), (1, 1), (129, 65)]:
        for torch_dtype in [*TORCH_DTYPES, torch.float64]:
            w = _randn(*shape, seed=7, dtype=torch_dtype)
            w_hat = fake_quantize(w, QuantSpec("fp", 5, 16))
            assert w_hat.shape == w.shape and w_hat.dtype == torch_dtype and w_hat.device == w.device


def test_more_bits_less_error() -> None:
    w = _randn(64, 64, seed=8)
    for dtype in CODEBOOKS:
        errors = [float((fake_quantize(w, QuantSpec(dtype, k, 64)) - w).pow(2).mean()) for k in (3, 4, 6, 8)]
        assert errors == sorted(errors, reverse=True), dtype
    small = [float((fake_quantize(w, QuantSpec("int", 4, b)) - w).pow(2).mean()) for b in (16, 64, None)]
    assert small == sorted(small), "smaller blocks, smaller error"


def test_keep_columns() -> None:
    w = _randn(8, 20, seed=9)
    w[:, 3] *= 50  # an outlier column
    spec = QuantSpec("int", 4, 16)
    keep = [3, 11]
    w_hat = fake_quantize(w, spec, keep_columns=keep)
    rest = [c for c in range(20) if c not in keep]
    assert torch.equal(w_hat[:, keep], w[:, keep])
    assert torch.equal(w_hat[:, rest], fake_quantize(w[:, rest].contiguous(), spec))
    err_keep = (w_hat - w)[:, rest].pow(2).mean()
    err_plain = (fake_quantize(w, spec) - w)[:, rest].pow(2).mean()
    assert err_keep < err_plain
    assert torch.equal(fake_quantize(w, spec, keep_columns=[]), fake_quantize(w, spec))
    assert torch.equal(fake_quantize(w, spec, keep_columns=torch.tensor([3, 11])), w_hat)
    assert torch.equal(fake_quantize(w, spec, keep_columns=list(range(20))), w)


def test_centering_helps_offset_blocks() -> None:
    w = _randn(8, 64, seed=10) * 0.01 + 1.0
    plain = fake_quantize(w, QuantSpec("int", 4, 64))
    centered = fake_quantize(w, QuantSpec("int", 4, 64, centering=True))
    assert (centered - w).abs().max() < (plain - w).abs().max() / 10
    const = torch.full((3, 10), 0.25)
    assert torch.equal(fake_quantize(const, QuantSpec("nf", 4, 8, centering=True)), const)


def test_quantile_large_tensor_subsample_is_deterministic() -> None:
    w = _randn(1100, 1000, seed=11)  # > 2^20 values: strided whole blocks
    for block_size in (64, None):
        spec = QuantSpec("quantile", 4, block_size)
        a = levels_for(w, spec).values
        assert a.numel() == 16 and torch.equal(a, levels_for(w.clone(), spec).values)
        assert float(a.abs().max()) == 1.0 and bool((a == 0).any())


@pytest.mark.parametrize(
    ("shape", "block_size"),
    [((96, 80), 64), ((96, 80), None), ((1100, 1000), 64), ((1100, 1000), None), ((40, 33), 7)],
)
def test_batched_quantile_levels_equal_one_estimate_per_tensor(shape, block_size) -> None:
    """One batched sort for G codebooks: bit for bit the per-tensor estimate (small and subsampled)."""
    from kernels.blockwise import levels_for, quantile_levels

    torch.manual_seed(1)
    spec = QuantSpec("quantile", 3, block_size)
    ws = [torch.randn(shape) * (i + 1) for i in range(3)] + [torch.zeros(shape)]
    for got, w in zip(quantile_levels(ws, spec), ws, strict=True):
        want = levels_for(w, spec)
        assert torch.equal(got.values, want.values) and torch.equal(got.mids, want.mids)
    with pytest.raises(ValueError, match="same-shaped"):
        quantile_levels([torch.randn(4, 8), torch.randn(8, 4)], spec)
    with pytest.raises(ValueError, match="data-dependent"):
        quantile_levels(ws, QuantSpec("nf", 4, 64))


def test_unchecked_reference_codes_nan_as_zero_and_keeps_the_block_nan():
    from kernels.blockwise import _codes_torch, levels_for, reference_fake_quantize

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    x[1, 3] = float("nan")
    spec = QuantSpec("nf", 4, 64)
    levels = levels_for(x, spec)
    codes = _codes_torch(x, spec, levels, check_finite=False)[0]
    assert codes[1, 3] == 0 and int(codes.max()) < levels.values.numel()  # #(mids < NaN) = 0
    out = reference_fake_quantize(x, spec, levels, False)
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all()  # the block's absmax is NaN
