"""Every bad input gets an error naming the bad value and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import QuantSpec, fake_quantize, quantize


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dtype": "nff", "bits": 4, "block_size": 64}, KeyError, "did you mean 'nf'"),
        ({"dtype": "INT", "bits": 4, "block_size": 64}, KeyError, "allowed: int, fp, nf, quantile, dynamic"),
        ({"dtype": "int", "bits": 1, "block_size": 64}, ValueError, r"bits=1 .*'int'.* 2\.\.16"),
        ({"dtype": "fp", "bits": 2, "block_size": 64}, ValueError, r"bits=2 .*'fp'.* 3\.\.16"),
        ({"dtype": "int", "bits": 17, "block_size": 64}, ValueError, r"bits=17 .* 2\.\.16"),
        ({"dtype": "bcq", "bits": 5, "block_size": 64}, ValueError, r"bits=5 .*'bcq'.* 1\.\.4"),
        ({"dtype": "int", "bits": 4.0, "block_size": 64}, ValueError, r"bits=4\.0"),
        ({"dtype": "int", "bits": 4, "block_size": 0}, ValueError, "block_size=0 .* positive int or None"),
        ({"dtype": "int", "bits": 4, "block_size": -64}, ValueError, "block_size=-64"),
        ({"dtype": "int", "bits": 4, "block_size": 64.0}, ValueError, r"block_size=64\.0"),
        ({"dtype": "fp", "bits": 3, "block_size": 64, "exponent_bits": 3}, ValueError, r"allowed: 1\.\.2"),
        ({"dtype": "fp", "bits": 16, "block_size": 64, "exponent_bits": 8}, ValueError, r"allowed: 1\.\.6"),
        ({"dtype": "nf", "bits": 4, "block_size": 64, "exponent_bits": 2}, ValueError, "only allowed for"),
        ({"dtype": "int", "bits": 4, "block_size": 64, "centering": 1}, ValueError, "centering=1"),
    ],
)
def test_bad_spec(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        QuantSpec(**kwargs)


def test_spec_is_frozen_and_hashable() -> None:
    spec = QuantSpec("fp", 4, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 5  # type: ignore[misc]
    assert spec == QuantSpec("fp", 4, 64) and len({spec, QuantSpec("fp", 4, 64)}) == 1
    assert spec.resolved_exponent_bits == 2 and spec.name == "fp4-e2-b64"
    assert QuantSpec("int", 8, None).name == "int8-tensor"


SPEC = QuantSpec("int", 4, 64)


@pytest.mark.parametrize("fn", [fake_quantize, quantize])
def test_bad_tensors(fn) -> None:
    with pytest.raises(ValueError, match=r"torch dtype torch\.int64; allowed: torch\.float16"):
        fn(torch.arange(10), SPEC)
    with pytest.raises(ValueError, match=r"empty \(shape \(0, 4\)\)"):
        fn(torch.zeros(0, 4), SPEC)
    with pytest.raises(ValueError, match=r"must be a torch\.Tensor"):
        fn([1.0, 2.0], SPEC)
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.randn(4, 64)
        w[2, 5] = bad
        with pytest.raises(ValueError, match=r"NaN or Inf .*1 of 4 blocks"):
            fn(w, SPEC)


def test_nan_caught_with_centering_and_quantile() -> None:
    w = torch.randn(4, 64)
    w[0, 0] = float("nan")
    for spec in (QuantSpec("int", 4, 64, centering=True), QuantSpec("quantile", 4, None)):
        with pytest.raises(ValueError, match="NaN or Inf"):
            fake_quantize(w, spec)


def test_bad_keep_columns() -> None:
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"outside 0\.\.7"):
        fake_quantize(w, SPEC, keep_columns=[8])
    with pytest.raises(ValueError, match=r"outside 0\.\.7"):
        fake_quantize(w, SPEC, keep_columns=[-1])
    with pytest.raises(ValueError, match="repeated"):
        fake_quantize(w, SPEC, keep_columns=[1, 1])
    with pytest.raises(ValueError, match="2-D"):
        fake_quantize(torch.randn(8), SPEC, keep_columns=[1])


def test_bad_impl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="impl='cuda' is not allowed; allowed: auto, torch, triton"):
        fake_quantize(w, SPEC, impl="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs (a CUDA tensor|the triton package)"):
        fake_quantize(w, SPEC, impl="triton")
    with pytest.raises(ValueError, match="does not support centering"):
        fake_quantize(w, QuantSpec("int", 4, 64, centering=True), impl="triton")
