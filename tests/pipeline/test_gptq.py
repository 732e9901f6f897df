"""`quant.method=gptq` on real (tiny) models and calibration text: the properties it exists for, the two
Hessian modes, proxy columns and storage, and every bad input stopped in pre-flight."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pipeline.calibration import CalibrationSpec, calibration_tokens
from pipeline.methods.hessians import (
    Hessians,
    block_inputs,
    collect_hessians,
    finish_hessians,
    hessian_hooks,
    run_block,
)
from pipeline.models import decoder_layers, linear_weights, load_model, quantize_model_
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


def gptq(**fields) -> Recipe:  # type: ignore[no-untyped-def]
    params = tuple(sorted(fields.pop("params", {}).items()))
    return Recipe(method="gptq", calibration=CALIBRATION, params=params, **fields)


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) = 2/n · ||WX − ŴX||² over the calibration inputs."""
    d = (w - q).double()
    return float(torch.trace(d @ h.double() @ d.T))


@pytest.mark.parametrize(
    "codes",
    [dict(dtype="int", bits=3, block_size=64), dict(dtype="nf", bits=4, block_size=None),
     dict(dtype="quantile", bits=3, block_size=32), dict(dtype="fp", bits=4, block_size=1024)],
)  # fmt: skip
def test_every_layer_reconstructs_calibration_outputs_at_least_as_well_as_rtn(llama, tokens, codes):
    model = llama[0]
    original = {n: w.clone() for n, w in linear_weights(model).items()}
    hessians = collect_hessians(model, original, tokens, torch.device("cpu"))
    by_gptq, by_rtn = copy.deepcopy(model), copy.deepcopy(model)
    gptq_report = quantize_model_(by_gptq, gptq(**codes), calibration=tokens)
    rtn_report = quantize_model_(by_rtn, Recipe(**codes))
    assert (gptq_report.total_model_bits, gptq_report.bits_per_param) == (
        rtn_report.total_model_bits, rtn_report.bits_per_param)  # fmt: skip
    q_gptq, q_rtn = linear_weights(by_gptq), linear_weights(by_rtn)
    for name, w in original.items():
        h = hessians.of(name)
        assert output_error(w, q_gptq[name], h) <= output_error(w, q_rtn[name], h) * (1 + 1e-6), name
    assert gptq_report.calibration is not None and '"tokens_sha256"' in gptq_report.calibration


def test_layers_that_read_one_input_share_one_hessian(llama, tokens):
    hessians = collect_hessians(llama[0], linear_weights(llama[0]), tokens, torch.device("cpu"))
    owner = hessians.owner
    assert owner["model.layers.0.self_attn.k_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert owner["model.layers.0.self_attn.v_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert owner["model.layers.0.mlp.up_proj.weight"] == "model.layers.0.mlp.gate_proj.weight"
    assert owner["model.layers.0.self_attn.o_proj.weight"] == "model.layers.0.self_attn.o_proj.weight"
    assert set(hessians.h) == set(owner.values())


def test_the_two_hessian_modes_agree_exactly_on_the_first_block(llama, tokens):
    model = llama[0]
    first = decoder_layers(model)[0]
    names = [n for n in linear_weights(model) if n.startswith("model.layers.0.")]
    shared = collect_hessians(model, names, tokens, torch.device("cpu"))
    sequential = Hessians()
    with hessian_hooks(model, names, sequential, torch.device("cpu"), root=first):
        run_block(first, block_inputs(model, first, tokens))
    finish_hessians(sequential)
    assert sequential.owner == shared.owner
    for name in shared.h:
        assert torch.equal(sequential.h[name], shared.h[name]), name


def test_sequential_mode_runs_and_differs_from_shared_after_the_first_block(llama, tokens):
    shared, sequential = copy.deepcopy(llama[0]), copy.deepcopy(llama[0])
    quantize_model_(shared, gptq(dtype="int", bits=3), calibration=tokens)
    quantize_model_(
        sequential, gptq(dtype="int", bits=3, params={"hessians": "sequential"}), calibration=tokens
    )
    a, b = linear_weights(shared), linear_weights(sequential)
    first = [n for n in a if n.startswith("model.layers.0.")]
    assert all(torch.equal(a[n], b[n]) for n in first)  # block 0 sees the same (16-bit) inputs
    assert any(not torch.equal(a[n], b[n]) for n in a if n.startswith("model.layers.1."))


def test_proxy_columns_keep_their_values_and_rtns_storage(llama, tokens):
    model = copy.deepcopy(llama[0])
    original = {n: w.clone() for n, w in linear_weights(model).items()}
    report = quantize_model_(model, gptq(dtype="nf", bits=3, outlier_fraction=0.05), calibration=tokens)
    rtn = quantize_model_(copy.deepcopy(llama[0]), Recipe(dtype="nf", bits=3, outlier_fraction=0.05))
    assert report.n_kept_params == rtn.n_kept_params > 0 and report.total_model_bits == rtn.total_model_bits
    from pipeline.models import outlier_columns

    for name, cols in outlier_columns(llama[0], 0.05).items():
        assert torch.equal(linear_weights(model)[name][:, cols], original[name][:, cols]), name


def test_shared_hessians_are_kept_for_the_next_configuration(llama, tokens):
    cache: dict = {}
    model = copy.deepcopy(llama[0])
    quantize_model_(model, gptq(dtype="int", bits=4), cache, tokens)
    (stored,) = cache.values()
    quantize_model_(copy.deepcopy(llama[0]), gptq(dtype="nf", bits=3), cache, tokens)
    assert list(cache.values()) == [stored]  # the same object: collected once per model and calibration


def test_gptq_refuses_embeddings():
    with pytest.raises(ValueError, match="cannot quantize embedding tables"):
        gptq(dtype="int", bits=4, quantize_embeddings=True)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["quant.method=gptq"], "needs calibration text"),
        (["quant.method=gptq", "quant.calibration.source=corpus:train", "+quant.params.dmp=0.1"],
         "did you mean 'damp'"),
        (["quant.method=gptq", "quant.calibration.source=corpus:train", "+quant.params.damp=1.5"],
         "damp=1.5"),
        (["quant.method=gptq", "quant.calibration.source=eval/wikitext-2-raw/wiki.test.raw"],
         "evaluation text"),
        (["quant.method=gptq", "quant.calibration.source=corpus:train", "quant.calibration.seq_len=100000"],
         "100000"),
        (["quant.method=gptq", "quant.calibration.source=corpus:train", "+quant.params.hessians=both"],
         "hessians='both'"),
    ],
)  # fmt: skip
def test_bad_gptq_input_stops_before_anything_runs(tmp_path: Path, tiny_model_dir: Path, overrides, expected):
    base = [
        f"model.name_or_path={tiny_model_dir}",
        f"results_root={tmp_path / 'r'}",
        "eval.perplexity=[{name:wikitext2,path:eval/wikitext-2-raw/wiki.test.raw,context_length:64,stride:64}]",
    ]
    with pytest.raises(ConfigError, match=expected):
        plan_run([*base, *overrides])
    assert not (tmp_path / "r").exists()


def test_calibration_is_in_the_key_only_where_a_method_reads_it(tiny_model_dir: Path, tmp_path: Path):
    base = [
        f"model.name_or_path={tiny_model_dir}",
        f"results_root={tmp_path}",
        "quant.calibration.source=corpus:train",
    ]
    rtn = plan_run([*base, "quant.method=rtn", "quant.calibration.seed=0,1"]).jobs
    assert len(rtn) == 1 and rtn[0].calibration_sha256 is None  # rtn ignores calibration: one job
    gptq_jobs = plan_run([*base, "quant.method=gptq", "quant.calibration.seed=0,1"]).jobs
    assert len({j.key for j in gptq_jobs}) == 2 and all(j.calibration_sha256 for j in gptq_jobs)


def test_calibration_passes_run_compiled_blocks_eagerly(tiny_model_dir: Path, tokens):
    """A worker compiles the blocks at its first evaluation; GPTQ's hooks must still see every input."""
    from pipeline.models import compile_layers, is_compiled
    from pipeline.models.compile import eager_layers

    model, _ = load_model(ModelRef(name_or_path=str(tiny_model_dir)), "cpu")
    names = list(linear_weights(model))
    want = collect_hessians(model, names, tokens, torch.device("cpu"))
    compile_layers(model)
    with eager_layers(model):
        assert not is_compiled(model)
        got = collect_hessians(model, names, tokens, torch.device("cpu"))
    assert is_compiled(model)  # compiled again after the pass
    assert got.owner == want.owner and all(torch.equal(got.h[k], want.h[k]) for k in want.h)
    compiled, reference = (
        copy.deepcopy(model),
        load_model(ModelRef(name_or_path=str(tiny_model_dir)), "cpu")[0],
    )
    recipe = gptq(dtype="int", bits=3, params={"hessians": "sequential"})
    quantize_model_(compiled, recipe, calibration=tokens)
    quantize_model_(reference, recipe, calibration=tokens)
    for (name, a), b in zip(
        linear_weights(compiled).items(), linear_weights(reference).values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("setting", "model_device", "need", "free_gpu", "free_host", "expected"),
    [
        ("auto", "cuda", 10, 100, 100, "cuda"),
        ("auto", "cuda", 90, 100, 1000, "cpu"),  # does not fit beside the model: the host holds them
        ("auto", "cpu", 10, 0, 100, "cpu"),
        ("cpu", "cuda", 10, 100, 100, "cpu"),
        ("cuda", "cuda", 10, 100, 0, "cuda"),
    ],
)
def test_hessians_go_where_they_fit(setting, model_device, need, free_gpu, free_host, expected):
    from pipeline.methods.gptq import choose_hessian_device

    assert choose_hessian_device(setting, model_device, need, free_gpu, free_host) == expected


def test_hessians_that_fit_nowhere_name_the_sizes_and_the_remedy():
    from pipeline.methods.gptq import choose_hessian_device

    gib = 2**30
    with pytest.raises(
        ValueError, match=r"need up to 41\.0 GiB; free: 20\.0 GiB on the GPU.*hessians=sequential"
    ):
        choose_hessian_device("auto", "cuda", 41 * gib, 20 * gib, 30 * gib)
    with pytest.raises(ValueError, match="hessian_device='cuda'"):
        choose_hessian_device("cuda", "cuda", 41 * gib, 20 * gib, 300 * gib)
