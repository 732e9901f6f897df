"""`quant.method=bcq` and `shiftadd` on a real (tiny) model and calibration text: values against the
kernel applied matrix by matrix, exact storage, the error ordering shiftadd exists for, the low bit
widths, and every bad input stopped in pre-flight."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from kernels import QuantSpec, weight_bits
from kernels.bcq import BCQSettings, ScaleFormat, bcq_fake_quantize
from pipeline.calibration import CalibrationSpec, calibration_tokens
from pipeline.methods import METHODS
from pipeline.methods.hessians import collect_hessians
from pipeline.models import linear_weights, load_model, outlier_columns, quantize_model_
from pipeline.recipe import Recipe
from pipeline.run import plan_run
from pipeline.specs import ModelRef
from pipeline.sweep import ConfigError

CALIBRATION = CalibrationSpec(source="corpus:train", n_samples=8, seq_len=64, seed=0)


@pytest.fixture(scope="module")
def llama(tiny_model_dir: Path):
    return load_model(ModelRef(name_or_path=str(tiny_model_dir)), "cpu")


@pytest.fixture(scope="module")
def tokens(llama, data_root: Path) -> torch.Tensor:
    return calibration_tokens(CALIBRATION, llama[1], data_root, 512)


def recipe(method: str, bits: int = 3, block_size: int | None = 64, **params) -> Recipe:  # type: ignore[no-untyped-def]
    calibration = CALIBRATION if method == "shiftadd" else None
    pairs = tuple(sorted(params.items()))
    return Recipe(
        method=method, dtype="bcq", bits=bits, block_size=block_size, params=pairs, calibration=calibration
    )


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = (w - q).double()
    return float(torch.trace(d @ h.double() @ d.T))


def test_registered_with_their_data_type_and_widths():
    for name in ("bcq", "shiftadd"):
        method = METHODS[name]
        assert method.dtypes == ("bcq",) and method.bits == (1, 2, 3, 4)
    assert METHODS["shiftadd"].needs_calibration and not METHODS["bcq"].needs_calibration
    assert recipe("bcq").name == "bcq-bcq3-b64"


@pytest.mark.parametrize(
    ("bits", "block_size", "params", "outliers"),
    [(3, 64, {}, 0.0), (2, None, {}, 0.0), (4, 100, {"scales": "pow2", "pow2_terms": 2}, 0.0),
     (1, 32, {}, 0.05)],
)  # fmt: skip
def test_bcq_equals_the_kernel_matrix_by_matrix(llama, bits, block_size, params, outliers):
    model = copy.deepcopy(llama[0])
    original = {n: w.clone() for n, w in linear_weights(model).items()}
    r = dataclasses.replace(recipe("bcq", bits, block_size, **params), outlier_fraction=outliers)
    report = quantize_model_(model, r)
    scales = ScaleFormat(params.get("scales", "fp16"), params.get("pow2_terms", 3))
    settings, spec = BCQSettings(15, scales), QuantSpec("bcq", bits, block_size)
    kept = outlier_columns(llama[0], outliers)
    expected_bits = 0
    for name, w in linear_weights(model).items():
        cols = kept.get(name, torch.zeros(0, dtype=torch.long))
        mask = torch.ones(w.shape[1], dtype=torch.bool)
        mask[cols] = False
        assert torch.equal(w[:, mask], bcq_fake_quantize(original[name][:, mask], spec, settings)), name
        assert torch.equal(w[:, ~mask], original[name][:, ~mask]), name
        expected_bits += weight_bits(spec, tuple(w.shape), int(cols.numel()), scale_bits=scales.bits)
    n_matrix = sum(w.numel() for w in original.values())
    assert report.total_model_bits == expected_bits + 16 * (report.n_params - n_matrix)
    if not outliers and block_size == 64:
        assert report.bits_per_param == pytest.approx(3 + 3 * 16 / 64)  # q + 16q / block


def test_pow2_storage_is_counted_as_its_code(llama):
    fp16 = quantize_model_(copy.deepcopy(llama[0]), recipe("bcq", 3, 64, iters=2))
    pow2 = quantize_model_(
        copy.deepcopy(llama[0]), recipe("bcq", 3, 64, iters=2, scales="pow2", pow2_terms=2)
    )
    assert fp16.bits_per_param == pytest.approx(3 + 3 * 16 / 64)
    assert pow2.bits_per_param == pytest.approx(3 + 3 * 14 / 64)  # 2 terms of sign + 6-bit exponent


def test_shiftadd_reconstructs_calibration_outputs_better_than_bcq_than_greedy(llama, tokens):
    model = llama[0]
    original = {n: w.clone() for n, w in linear_weights(model).items()}
    hessians = collect_hessians(model, original, tokens, torch.device("cpu"))
    quantized = {}
    for label, r in [
        ("shiftadd", recipe("shiftadd")),
        ("bcq", recipe("bcq")),
        ("greedy", recipe("bcq", iters=0)),
    ]:
        copy_ = copy.deepcopy(model)
        report = quantize_model_(copy_, r, calibration=tokens if label == "shiftadd" else None)
        quantized[label] = (linear_weights(copy_), report.total_model_bits)
    assert len({bits for _, bits in quantized.values()}) == 1  # equal storage
    totals = dict.fromkeys(quantized, 0.0)
    for name, w in original.items():
        h = hessians.of(name)
        errors = {label: output_error(w, q[name], h) for label, (q, _) in quantized.items()}
        assert errors["shiftadd"] <= errors["bcq"] * (1 + 1e-6), name
        totals = {label: totals[label] + e for label, e in errors.items()}
    assert totals["shiftadd"] <= totals["bcq"] <= totals["greedy"]


def test_shiftadd_sequential_runs_and_shares_gptqs_hessian_cache(llama, tokens):
    cache: dict = {}
    gptq = Recipe(method="gptq", dtype="int", bits=3, calibration=CALIBRATION)
    quantize_model_(copy.deepcopy(llama[0]), gptq, cache, tokens)
    (stored,) = cache.values()
    quantize_model_(copy.deepcopy(llama[0]), recipe("shiftadd", 2, 32), cache, tokens)
    assert list(cache.values()) == [stored]  # gptq's Hessians reused
    sequential = copy.deepcopy(llama[0])
    quantize_model_(sequential, recipe("shiftadd", 2, 32, hessians="sequential", iters=3), calibration=tokens)
    assert all(torch.isfinite(w).all() for w in linear_weights(sequential).values())


def test_two_bits_for_rtn_and_gptq(llama, tokens):
    for dtype in ("int", "nf", "quantile"):
        report = quantize_model_(copy.deepcopy(llama[0]), Recipe(dtype=dtype, bits=2, block_size=64))
        assert 2.25 <= report.bits_per_param < 2.27  # quantile: + 4 16-bit codebook values a matrix
    model = copy.deepcopy(llama[0])
    quantize_model_(
        model, Recipe(method="gptq", dtype="int", bits=2, calibration=CALIBRATION), calibration=tokens
    )
    w = model.model.layers[0].mlp.down_proj.weight.reshape(-1, 64)
    assert bool(((w == 0) | (w.abs() == w.abs().amax(dim=1, keepdim=True))).all())  # ternary blocks


def test_pow2_terms_have_one_spelling_with_fp16_scales():
    assert recipe("bcq", pow2_terms=5) == recipe("bcq")
    assert recipe("bcq", scales="pow2", pow2_terms=5).params_json == '{"pow2_terms":5,"scales":"pow2"}'


BASE = [
    "eval.perplexity=[{name:wikitext2,path:eval/wikitext-2-raw/wiki.test.raw,context_length:64,stride:64}]",
    "quant.dtype=bcq",
    "quant.bits=3",
]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["quant.method=bcq", "+quant.params.iter=3"], "did you mean 'iters'"),
        (["quant.method=bcq", "+quant.params.scale=pow2"], "did you mean 'scales'"),
        (["quant.method=bcq", "quant.bits=5"], r"does not take bits=5 with dtype='bcq'; allowed: 1\.\.4"),
        (["quant.method=bcq", "quant.bits=0"], r"allowed: 1\.\.4"),
        (["quant.method=bcq", "+quant.params.scales=pow2", "+quant.params.pow2_terms=0"], "pow2_terms=0"),
        (["quant.method=bcq", "+quant.params.scales=pow3"], r"scales='pow3' is not allowed"),
        (["quant.method=shiftadd"], "quant.method='shiftadd' needs calibration text"),
        (["quant.method=shiftadd", "quant.calibration.source=corpus:train", "+quant.params.hessians=both"],
         "hessians='both'"),
        (["quant.method=bcq", "quant.dtype=int"], r"does not take dtype='int'; allowed: \['bcq'\]"),
        (["quant.method=rtn"], "does not take dtype='bcq'"),
        (["quant.method=rtn", "quant.dtype=int", "quant.bits=1"], r"bits=1 .*'int'.* 2\.\.15"),
        (["quant.method=rtn", "quant.dtype=fp", "quant.bits=2"], r"bits=2 .*'fp'.* 3\.\.15"),
        (["quant.method=bcq", "quant.centering=true"], "takes no centering"),
    ],
)  # fmt: skip
def test_bad_input_stops_before_anything_runs(tmp_path: Path, tiny_model_dir: Path, overrides, expected):
    base = [f"model.name_or_path={tiny_model_dir}", f"results_root={tmp_path / 'r'}", *BASE]
    with pytest.raises(ConfigError, match=expected):
        plan_run([*base, *overrides])
    assert not (tmp_path / "r").exists()


def test_every_bad_bcq_value_named_once(tmp_path: Path, tiny_model_dir: Path):
    overrides = ["quant.method=bcq", "quant.bits=5", "+quant.params.iter=3", "quant.block_size=0"]
    with pytest.raises(ConfigError) as info:
        plan_run(
            [f"model.name_or_path={tiny_model_dir}", f"results_root={tmp_path / 'r'}", *BASE, *overrides]
        )
    text = str(info.value)
    for needle in ("does not take bits=5", "did you mean 'iters'", "block_size=0 is not allowed"):
        assert text.count(needle) == 1, (needle, text)
    assert "dtype='int'" not in text  # no message about a value the user did not give


def test_the_shiftadd_sweep_plans(tmp_path: Path):
    window = ["eval.perplexity.0.context_length=256", "eval.perplexity.0.stride=128"]  # tiny: 256 positions
    argv = ["+sweep=shiftadd", "dry_run=true", "model.name_or_path=ladder:tiny/0", *window]
    plan = plan_run([*argv, f"results_root={tmp_path}"])
    recipes = {j.recipe for j in plan.jobs}
    methods = {(r.method, r.dtype) for r in recipes}
    assert methods == {("bcq", "bcq"), ("shiftadd", "bcq"), ("rtn", "int"), ("rtn", "nf"), ("gptq", "int"),
                       ("gptq", "nf"), ("none", "none")}  # fmt: skip
    assert {r.bits for r in recipes} == {2, 3, 4, 16}
    assert {r.block_size for r in recipes if r.method in ("bcq", "shiftadd")} == {64, 128, 1024}
