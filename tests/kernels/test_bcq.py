"""`kernels.bcq` against unoptimized references written here, its storage, and the 2-bit codebooks."""

from __future__ import annotations

import functools
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from kernels import QuantSpec, codebook, fake_quantize, pack, unpack, weight_bits
from kernels.bcq import (
    BCQColumns,
    BCQSettings,
    BlockFit,
    bcq_dequantize,
    bcq_fake_quantize,
    bcq_quantize,
    block_errors,
    fit_blocks,
    greedy_fit,
    refine,
)
from kernels.bcq_scales import POW2_MAX_EXP, POW2_MIN_EXP, ScaleFormat, decode_pow2, encode_pow2
from kernels.gptq import GPTQSettings, gptq_solve
from kernels.packing import pack_planes, unpack_planes

POW2 = [ScaleFormat("fp16"), ScaleFormat("pow2", 1), ScaleFormat("pow2", 2), ScaleFormat("pow2", 3)]


def weights(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def fp16(v: float) -> float:
    return float(np.float16(v))


def distance(v: float, sums: np.ndarray, p: int) -> tuple[float, float]:
    """Sort key of pattern p for value v: its distance, then its sum (ties: the lower sum)."""
    return abs(v - float(sums[p])), float(sums[p])


def naive_fit(x: np.ndarray, q: int, iters: int) -> np.ndarray:
    """BCQ of one block written out in float64: greedy, then per round least-squares α (numpy's
    minimum-norm lstsq, rounded to float16, kept if it lowers the error), |α| sorted descending, and
    each value's signs by trying all 2^q patterns (ties: the lower sum). Returns the decoded block."""
    r, alpha, signs = x.copy(), [], []
    for _ in range(q):
        b = np.where(r > 0, 1.0, -1.0)
        a = fp16(np.abs(r).mean())
        r = r - a * b
        alpha.append(a)
        signs.append(b)
    alpha_v, b_mat = np.array(alpha), np.stack(signs, axis=1)  # [q], [B, q]
    for _ in range(iters if q > 1 else 0):
        least = np.linalg.lstsq(b_mat, x, rcond=None)[0]
        candidate = np.array([fp16(a) for a in least])
        if ((x - b_mat @ candidate) ** 2).sum() <= ((x - b_mat @ alpha_v) ** 2).sum():
            alpha_v = candidate
        alpha_v = np.sort(np.abs(alpha_v))[::-1]
        patterns = np.array(list(itertools.product([-1.0, 1.0], repeat=q)))
        sums = patterns @ alpha_v
        best = [min(range(len(sums)), key=functools.partial(distance, float(v), sums)) for v in x]
        b_mat = patterns[best]
    return b_mat @ alpha_v


@pytest.mark.parametrize(("q", "block"), [(1, 16), (2, 8), (3, 6), (4, 12), (2, None)])
def test_matches_the_naive_fit(q: int, block: int | None) -> None:
    w = weights(4, 24, seed=q)
    spec, settings = QuantSpec("bcq", q, block), BCQSettings(iters=4)
    got = bcq_fake_quantize(w, spec, settings).double().reshape(-1)
    size = w.numel() if block is None else block
    flat = w.double().reshape(-1).numpy()
    want = np.concatenate([naive_fit(flat[i : i + size], q, 4) for i in range(0, flat.size, size)])
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-4, atol=1e-7)


def test_one_bit_is_sign_times_mean_abs() -> None:
    w = weights(5, 40)  # 200 values: 12 blocks of 16 and a tail of 8
    got = bcq_fake_quantize(w, QuantSpec("bcq", 1, 16), BCQSettings()).reshape(-1)
    flat = w.reshape(-1)
    for start in range(0, flat.numel(), 16):
        block = flat[start : start + 16]
        want = torch.where(block > 0, 1.0, -1.0) * fp16(float(block.abs().mean()))
        torch.testing.assert_close(got[start : start + 16], want, rtol=0, atol=0)


@pytest.mark.parametrize("scales", POW2, ids=lambda s: f"{s.kind}{s.pow2_terms}")
@pytest.mark.parametrize("q", [2, 3, 4])
def test_no_round_raises_a_blocks_error(q: int, scales: ScaleFormat) -> None:
    x = weights(64, 32, seed=q) * torch.linspace(0.2, 3.0, 32)  # blocks of unequal spread
    fit = BlockFit.start(x, *greedy_fit(x, q, scales))
    errors = [block_errors(x, fit.alpha, fit.codes)]
    for _ in range(8):
        fit = refine(fit, scales)
        errors.append(block_errors(x, fit.alpha, fit.codes))
        assert torch.equal(fit.error, errors[-1])  # the carried error is the block's error
    for before, after in itertools.pairwise(errors):
        assert bool((after <= before * (1 + 1e-6) + 1e-12).all())
    gain = 0.9 if scales.kind == "fp16" else 1.0  # one or two powers of two leave little to refine
    assert float(errors[-1].sum()) < gain * float(errors[0].sum())  # refinement does work


def test_global_optimum_bounds_tiny_blocks() -> None:
    """Exhaustive search over every sign matrix of a block (least-squares α each) is a floor the fit
    never goes below, and the fit ends at most at the greedy start; mostly it reaches the floor."""
    x = weights(40, 4, seed=7).double()
    reached = 0
    signs = [np.array(m) for m in itertools.product(itertools.product([-1.0, 1.0], repeat=2), repeat=4)]
    for block in x:
        residuals = (block.numpy() - b @ np.linalg.lstsq(b, block.numpy(), rcond=None)[0] for b in signs)
        optimum = min(float((r**2).sum()) for r in residuals)
        xb = block[None].float()
        got = float(block_errors(xb, *fit_blocks(xb, 2, BCQSettings())))
        greedy = float(block_errors(xb, *greedy_fit(xb, 2, ScaleFormat())))
        assert optimum * (1 - 1e-3) - 1e-12 <= got <= greedy * (1 + 1e-6)
        reached += got <= optimum * (1 + 1e-2) + 1e-12
    assert reached >= 28, reached  # 33 of 40 with this seed


def naf_weight(value: float) -> int:
    """Fewest signed powers of two summing to `value` (its non-adjacent form's non-zero digits)."""
    m = Fraction(value) * 2 ** (-POW2_MIN_EXP)
    assert m.denominator == 1, value  # no term below 2^POW2_MIN_EXP
    n, count = abs(m.numerator), 0
    while n:
        if n % 2:
            n -= 2 - n % 4  # digit +1 (n = 1 mod 4) or -1 (n = 3 mod 4)
            count += 1
        n //= 2
    return count


@pytest.mark.parametrize("terms", [1, 2, 3])
def test_pow2_scales_are_sums_of_that_many_powers_of_two(terms: int) -> None:
    scales = ScaleFormat("pow2", terms)
    fitted = bcq_quantize(weights(16, 64), QuantSpec("bcq", 3, 32), BCQSettings(iters=5, scales=scales))
    alpha = fitted.alpha.reshape(-1)
    assert max(naf_weight(float(a)) for a in alpha) <= terms
    assert terms == 1 or max(naf_weight(float(a)) for a in alpha) == terms  # the terms get used
    codes = encode_pow2(alpha, terms)
    assert torch.equal(decode_pow2(codes), alpha) and int(codes.max()) < 2**7
    exponents = (codes & 63)[(codes & 63) > 0] - 48
    assert int(exponents.min()) >= POW2_MIN_EXP and int(exponents.max()) <= POW2_MAX_EXP
    assert torch.equal(decode_pow2(unpack(pack(codes, 7), 7, codes.numel()).view_as(codes).long()), alpha)


def test_one_pow2_term_is_the_nearest_power_of_two() -> None:
    a = torch.rand(1000, generator=torch.Generator().manual_seed(3)) * 0.1 + 1e-4
    got = ScaleFormat("pow2", 1).round(a).double()
    low = 2.0 ** torch.floor(torch.log2(a.double()))
    want = torch.where(a.double() - low < 2 * low - a.double(), low, 2 * low)
    near_tie = (a.double() - 1.5 * low).abs() < 1e-6 * low
    assert torch.equal(got[~near_tie], want[~near_tie])


@pytest.mark.parametrize("scales", POW2, ids=lambda s: f"{s.kind}{s.pow2_terms}")
def test_packed_planes_and_scales_are_the_accounted_bits(scales: ScaleFormat) -> None:
    shape, spec = (24, 40), QuantSpec("bcq", 3, 64)  # 960 values: 15 blocks of 64
    fitted = bcq_quantize(weights(*shape), spec, BCQSettings(iters=3, scales=scales))
    planes = pack_planes(fitted.codes, 3)
    assert planes.shape == (3, 120) and torch.equal(
        unpack_planes(planes, fitted.codes.numel()).long(), fitted.codes
    )
    if scales.kind == "fp16":
        stored_alpha = fitted.alpha.to(torch.float16).view(torch.uint8)
        assert torch.equal(stored_alpha.view(torch.float16).float(), fitted.alpha)  # exact in 16 bits
    else:
        stored_alpha = pack(encode_pow2(fitted.alpha, scales.pow2_terms), 7)
    n_bytes = planes.numel() + stored_alpha.numel()
    assert n_bytes * 8 == weight_bits(spec, shape, scale_bits=scales.bits) + (-(45 * scales.bits) % 8)
    rebuilt = QuantSpec("bcq", 3, 64)
    restored = bcq_dequantize(
        type(fitted)(unpack_planes(planes, 960).long(), fitted.alpha, shape, torch.float32, rebuilt)
    )
    assert torch.equal(restored, bcq_dequantize(fitted))


def test_plane_packing_round_trips_any_width() -> None:
    codes = torch.randint(0, 16, (1001,), generator=torch.Generator().manual_seed(0))
    for bits in (1, 2, 3, 4):
        c = codes % 2**bits
        planes = pack_planes(c, bits)
        assert planes.shape == (bits, 126) and torch.equal(unpack_planes(planes, 1001).long(), c)
        plane0 = pack(c & 1, 1)  # plane 0 is bit 0 of every code, packed like 1-bit codes
        assert torch.equal(planes[0], plane0)


def test_storage_accounting() -> None:
    spec = QuantSpec("bcq", 3, 128)
    assert weight_bits(spec, (256, 512)) == 256 * 512 * 3 + 1024 * 3 * 16
    assert weight_bits(spec, (256, 512), scale_bits=14) == 256 * 512 * 3 + 1024 * 3 * 14
    assert weight_bits(spec, (100, 10), n_keep_columns=2) == 800 * 3 + 7 * 3 * 16 + 200 * 16
    assert weight_bits(QuantSpec("bcq", 2, None), (64, 64)) == 64 * 64 * 2 + 2 * 16
    with pytest.raises(ValueError, match="scale_bits=14 is for bcq"):
        weight_bits(QuantSpec("int", 3, 128), (8, 8), scale_bits=14)


@pytest.mark.parametrize(("q", "block"), [(2, 16), (3, 20), (4, 96), (2, None), (3, 7)])
def test_shiftadd_with_a_diagonal_hessian_is_bcq(q: int, block: int | None) -> None:
    """Nothing propagates: every block's α come from the original weights, as bcq's do (bit for bit)."""
    w = weights(12, 48, seed=q)
    settings = BCQSettings()
    h = torch.diag(torch.rand(48, generator=torch.Generator().manual_seed(1)) + 0.5)[None]
    size = w.numel() if block is None else block
    out = gptq_solve(w[None], h, BCQColumns(w[None], q, size, settings), block, GPTQSettings())[0]
    assert torch.equal(out, bcq_fake_quantize(w, QuantSpec("bcq", q, block), settings))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("q", "block"), [(2, 16), (3, 24), (4, 7)])
def test_shiftadd_output_error_below_bcq_below_greedy(q: int, block: int, act_order: bool) -> None:
    gen = torch.Generator().manual_seed(q)
    w = weights(16, 48, seed=q)
    x = torch.randn(48, 48, generator=gen) * 0.4 @ torch.randn(48, 400, generator=gen) + torch.randn(
        48, 1, generator=gen
    )
    h = 2 * x @ x.T / 400
    spec = QuantSpec("bcq", q, block)
    columns = BCQColumns(w[None], q, block, BCQSettings())
    shiftadd = gptq_solve(w[None], h[None], columns, block, GPTQSettings(act_order=act_order))[0]

    def output_error(quantized: torch.Tensor) -> float:
        d = (w - quantized).double()
        return float(torch.trace(d @ h.double() @ d.T))

    bcq = bcq_fake_quantize(w, spec, BCQSettings())
    greedy = bcq_fake_quantize(w, spec, BCQSettings(iters=0))
    assert output_error(shiftadd) <= output_error(bcq) <= output_error(greedy)
    # every value is one of its block's 2^q sums of the α fitted when the block started
    flat, alpha = shiftadd.reshape(-1), columns.alpha[0]
    sums = alpha @ torch.tensor(list(itertools.product([-1.0, 1.0], repeat=q))).T  # [blocks, 2^q]
    block_of = torch.arange(flat.numel()) // block
    assert bool(((flat[:, None] - sums[block_of]).abs().min(dim=1).values < 1e-6).all())


@pytest.mark.parametrize("q", [2, 3, 4])
def test_degenerate_blocks(q: int) -> None:
    """Zero, constant and two-valued blocks make BᵀB singular (repeated or mirrored sign vectors)."""
    x = torch.zeros(4, 16)
    x[1] = 0.5
    x[2, ::2], x[2, 1::2] = 0.25, -1.0
    x[3] = torch.linspace(-1, 1, 16)
    alpha, codes = fit_blocks(x, q, BCQSettings())
    errors = block_errors(x, alpha, codes)
    assert bool(torch.isfinite(alpha).all()) and float(errors[:3].abs().max()) < 1e-12
    assert float(errors[3]) <= float(block_errors(x[3:], *greedy_fit(x[3:], q, ScaleFormat()))[0])


def test_batched_blocks_equal_blocks_fitted_alone() -> None:
    x = weights(30, 16).float()
    alpha, codes = fit_blocks(x, 3, BCQSettings(iters=5))
    for i in range(0, 30, 7):
        a, c = fit_blocks(x[i : i + 1], 3, BCQSettings(iters=5))
        assert torch.equal(a, alpha[i : i + 1]) and torch.equal(c, codes[i : i + 1])


def test_two_bit_codebooks() -> None:
    assert codebook("int", 2).tolist() == [-1.0, 0.0, 1.0]  # ternary
    nf2 = codebook("nf", 2)
    assert nf2.numel() == 4 and nf2[0] == -1 and nf2[-1] == 1 and 0.0 in nf2.tolist()
    assert bool((nf2[1:] > nf2[:-1]).all())
    w = weights(8, 64)
    assert codebook("quantile", 2, w=w).numel() == 4
    q = fake_quantize(w, QuantSpec("int", 2, 64))
    absmax = w.abs().amax(dim=1, keepdim=True)
    assert bool(((q == 0) | (q == absmax) | (q == -absmax)).all())
    assert weight_bits(QuantSpec("nf", 2, 64), (8, 64)) == 8 * 64 * 2 + 8 * 16
    for dtype in ("fp", "dynamic"):
        with pytest.raises(ValueError, match=rf"bits=2 is not allowed for dtype '{dtype}'.*3\.\.16"):
            QuantSpec(dtype, 2, 64)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ScaleFormat("pow3"), ValueError, r"scales='pow3' .*\['fp16', 'pow2'\]"),
        (lambda: ScaleFormat("pow2", 0), ValueError, r"pow2_terms=0 .* >= 1"),
        (lambda: BCQSettings(iters=-1), ValueError, r"iters=-1"),
        (lambda: QuantSpec("bcq", 5, 64), ValueError, r"bits=5 .*'bcq'.* 1\.\.4"),
        (lambda: QuantSpec("bcq", 0, 64), ValueError, r"bits=0 .* 1\.\.4"),
        (
            lambda: bcq_quantize(weights(4, 4), QuantSpec("int", 3, 4), BCQSettings()),
            ValueError,
            "dtype 'bcq'",
        ),
        (
            lambda: fake_quantize(weights(4, 4), QuantSpec("bcq", 3, 4)),
            KeyError,
            "unknown codebook data type 'bcq'",
        ),
    ],
)
def test_bad_input(make, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_blocks_count() -> None:
    fitted = bcq_quantize(weights(10, 10), QuantSpec("bcq", 2, 32), BCQSettings(iters=1))
    assert fitted.alpha.shape == (math.ceil(100 / 32), 2) and fitted.codes.shape == (100,)


def test_benchmark_runs_on_cpu(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "bcq.json"
    cmd = [sys.executable, "benchmarks/bcq.py", "--device", "cpu", "--matrix", "64", "--iters", "2",
           "--reps", "1", "--no-model", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["matrix_rows"]
    assert [r["q"] for r in rows] == [1, 2, 3, 4] and all(r["fit_s"] > 0 for r in rows)
    assert all(r["fit_rel_error"] <= r["greedy_rel_error"] for r in rows)
    assert "| q | fit s |" in proc.stdout
