"""pipeline.models: loading, weight discovery, exact counts, proxy columns, snapshot/restore."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models import (
    QuantizationError,
    check_model_ref,
    linear_weights,
    load_model,
    outlier_columns,
    quantize_model_,
    restore_weights_,
    snapshot_weights,
)
from pipeline.recipe import Recipe
from pipeline.specs import ModelRef

INT4_B64 = {"dtype": "int", "bits": 4, "block_size": 64}


def spec(**kwargs):
    from kernels import QuantSpec

    return QuantSpec(**{**INT4_B64, **kwargs})


@pytest.fixture
def llama(tiny_model_dir):
    return load_model(ModelRef(str(tiny_model_dir)), "cpu")


@pytest.fixture
def neox(tiny_neox_dir):
    return load_model(ModelRef(str(tiny_neox_dir)), "cpu")


def tiny_gpt2(tie: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=tie
    )
    return GPT2LMHeadModel(config).eval()


def test_load_model_cpu_float32_eval(llama):
    model, tokenizer = llama
    assert model.dtype == torch.float32
    assert not model.training
    assert tokenizer.pad_token_id is not None
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "ref, match",
    [
        (ModelRef("/no/such/model/dir"), "neither an existing local directory"),
        (ModelRef("./relative/missing"), "neither an existing local directory"),
        (ModelRef("not a hub id"), "neither an existing local directory"),
        (ModelRef("org/name", torch_dtype="float64"), "torch_dtype"),
    ],
)
def test_check_model_ref_rejects(ref, match):
    with pytest.raises(ValueError, match=match):
        check_model_ref(ref)


def test_check_model_ref_accepts_dir_and_hub_id(tiny_model_dir, tmp_path, monkeypatch):
    from tests.pipeline.hub_cache import cache_model

    check_model_ref(ModelRef(str(tiny_model_dir)))
    cache_model(tmp_path, "EleutherAI/pythia-70m", tiny_model_dir, "c" * 40, ref="step1000")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # offline: a hub id must be in the hub cache
    check_model_ref(ModelRef("EleutherAI/pythia-70m", revision="step1000"))


def test_check_model_ref_gguf_missing(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="gguf_file"):
        check_model_ref(ModelRef(str(tiny_model_dir), gguf_file="model.gguf"))
    file = tmp_path / "weights.bin"
    file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_model_ref(ModelRef(str(file)))


def test_load_model_missing_path_is_clear():
    with pytest.raises(ValueError, match="/no/such/dir"):
        load_model(ModelRef("/no/such/dir"), "cpu")


def test_linear_weights_llama_excludes_embeddings_and_head(llama):
    model, _ = llama
    weights = linear_weights(model)
    assert len(weights) == 2 * 7
    assert not any("embed" in n or "lm_head" in n for n in weights)
    both = linear_weights(model, include_embeddings=True, include_lm_head=True)
    assert set(both) - set(weights) == {"model.embed_tokens.weight", "lm_head.weight"}


def test_linear_weights_gpt2_conv1d_is_out_in_view():
    model = tiny_gpt2()
    weights = linear_weights(model)
    c_fc = weights["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc.shape == (256, 64)  # [out, in]
    assert c_fc.data_ptr() == model.transformer.h[0].mlp.c_fc.weight.data_ptr()
    assert len(weights) == 2 * 4 and "lm_head.weight" not in weights


def test_tied_head_never_quantized_twice_or_alone():
    model = tiny_gpt2(tie=True)
    with pytest.raises(ValueError, match="tied"):
        linear_weights(model, include_lm_head=True)
    both = linear_weights(model, include_embeddings=True, include_lm_head=True)
    assert "lm_head.weight" not in both and "transformer.wte.weight" in both
    untied = tiny_gpt2(tie=False)
    assert "lm_head.weight" in linear_weights(untied, include_lm_head=True)


def test_snapshot_restore_bit_identical(llama):
    model, _ = llama
    snap = snapshot_weights(model)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    quantize_model_(model, Recipe.of(spec(bits=3)))
    assert not torch.equal(
        model.model.layers[0].mlp.up_proj.weight, snap["model.layers.0.mlp.up_proj.weight"]
    )
    restore_weights_(model, snap)
    for name, param in model.named_parameters():
        assert torch.equal(param, snap[name]) and param.data_ptr() == pointers[name]
    with pytest.raises(KeyError, match="snapshot does not match"):
        restore_weights_(model, {k: v for k, v in snap.items() if "lm_head" not in k})


def test_baseline_none_leaves_weights_and_counts(llama):
    model, _ = llama
    snap = snapshot_weights(model)
    report = quantize_model_(model, Recipe.of(None))
    n = sum(p.numel() for p in model.parameters())
    assert (report.n_params, report.n_quantized_params, report.n_kept_params) == (n, 0, 0)
    assert report.total_model_bits == 16 * n and report.bits_per_param == 16.0
    assert all(torch.equal(p, snap[k]) for k, p in model.named_parameters())


def test_quantized_counts_exact(llama):
    model, _ = llama
    report = quantize_model_(model, Recipe.of(spec()))
    n = sum(p.numel() for p in model.parameters())
    n_linear = 2 * (4 * 64 * 64 + 3 * 64 * 128)  # q, k, v, o + gate, up, down per layer
    assert report.n_params == n == 147_776
    assert report.n_quantized_params == n_linear and report.n_kept_params == 0
    assert report.total_model_bits == round(n_linear * 4.25) + 16 * (n - n_linear)
    assert report.bits_per_param == pytest.approx(4.25)
    assert isinstance(report.total_model_bits, int)


def test_quantized_counts_with_proxy_columns(llama):
    from kernels import weight_bits

    model, _ = llama
    report = quantize_model_(model, Recipe.of(spec(), outlier_fraction=0.02))
    kept = 2 * 2 * 128 * 1  # layers x (gate, up) x rows x round(0.02 * 64) columns
    assert report.n_kept_params == kept
    expected = 0
    for name, view in linear_weights(model).items():
        n_keep = 1 if name.endswith(("gate_proj.weight", "up_proj.weight")) else 0
        expected += weight_bits(spec(), tuple(view.shape), n_keep_columns=n_keep)
    assert report.total_model_bits == expected + 16 * (report.n_params - 81_920)


def test_quantize_embeddings_and_head_counts(llama):
    model, _ = llama
    report = quantize_model_(model, Recipe.of(spec(), quantize_embeddings=True, quantize_lm_head=True))
    vocab = model.config.vocab_size
    assert report.n_quantized_params == 81_920 + 2 * vocab * 64


def test_outlier_columns_pick_top_std_rows(neox):
    model, _ = neox
    with torch.no_grad():
        dense = model.gpt_neox.layers[1].attention.dense.weight
        dense[7] *= 50.0  # hidden unit 7 becomes the outlier dimension of layer 1
    cols = outlier_columns(model, 0.02)
    assert set(cols) == {f"gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight" for i in range(2)}
    assert cols["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"].tolist() == [7]
    assert len(outlier_columns(model, 0.1)["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"]) == 6
    assert outlier_columns(model, 0.0) == {}


def test_proxy_quantization_keeps_columns_exactly(neox):
    model, _ = neox
    cols = outlier_columns(model, 0.05)
    before = {n: w.clone() for n, w in linear_weights(model).items()}
    quantize_model_(model, Recipe.of(spec(bits=3), outlier_fraction=0.05))
    for name, view in linear_weights(model).items():
        if name in cols:
            assert torch.equal(view[:, cols[name]], before[name][:, cols[name]])
        assert not torch.equal(view, before[name])


def test_quantize_gpt2_conv1d_in_place():
    model = tiny_gpt2()
    before = model.transformer.h[0].mlp.c_fc.weight.clone()
    report = quantize_model_(model, Recipe.of(spec(), outlier_fraction=0.02))
    after = model.transformer.h[0].mlp.c_fc.weight
    assert not torch.equal(after, before)
    kept = outlier_columns(tiny_gpt2(), 0.02)["transformer.h.0.mlp.c_fc.weight"]
    assert torch.equal(after.t()[:, kept], before.t()[:, kept])  # columns of the [out, in] view
    assert report.n_kept_params == 2 * 256 * 1


def test_outlier_columns_gpt2_conv1d():
    cols = outlier_columns(tiny_gpt2(), 0.02)
    assert sorted(cols) == [f"transformer.h.{i}.mlp.c_fc.weight" for i in range(2)]


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 2.0])
def test_bad_outlier_fraction(llama, fraction):
    with pytest.raises(ValueError, match="outlier_fraction"):
        quantize_model_(llama[0], Recipe.of(spec(), outlier_fraction=fraction))


def test_proxy_unknown_architecture():
    from transformers import GPTJConfig, GPTJForCausalLM

    model = GPTJForCausalLM(
        GPTJConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4, rotary_dim=4)
    )
    with pytest.raises(ValueError, match="gptj"):
        quantize_model_(model, Recipe.of(spec(), outlier_fraction=0.02))
    assert quantize_model_(model, Recipe.of(spec())).n_quantized_params > 0


def test_non_finite_weight_is_named(llama):
    model, _ = llama
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = math.inf
    with pytest.raises(ValueError, match="down_proj"):
        quantize_model_(model, Recipe.of(spec()))


def test_nan_after_quantization_raises(llama, monkeypatch):
    import kernels

    def broken(w, spec, keep_columns=None, **_):
        return torch.full_like(w, math.nan) if w.shape[-2:] == (64, 128) else w.clone()

    monkeypatch.setattr(kernels, "fake_quantize", broken)
    with pytest.raises(QuantizationError, match="down_proj"):
        quantize_model_(llama[0], Recipe.of(spec()))


@pytest.mark.gpu
def test_fused_path_names_a_non_finite_weight_and_matches_the_reference(tiny_model_dir):
    """On CUDA the per-matrix finiteness sync is skipped; the one batched check still names the matrix."""
    import copy

    model, _ = load_model(ModelRef(str(tiny_model_dir)), "cuda")
    reference = copy.deepcopy(model).cpu()  # same weights and dtype, quantized by the torch reference
    quantize_model_(model, Recipe.of(spec()))
    quantize_model_(reference, Recipe.of(spec()))
    for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(got.cpu(), want), name
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"down_proj.*NaN or Inf"):
        quantize_model_(model, Recipe.of(spec()))


@pytest.mark.parametrize(
    "quant",
    [
        dict(dtype="nf", bits=4, block_size=64),
        dict(dtype="int", bits=3, block_size=None),
        dict(dtype="fp", bits=5, block_size=100),  # blocks that would straddle matrices: not stacked
        dict(dtype="dynamic", bits=4, block_size=128),
        dict(dtype="quantile", bits=3, block_size=64),  # data-dependent codebook: not stacked
    ],
)
@pytest.mark.parametrize("fraction", [0.0, 0.05])
def test_stacked_groups_quantize_exactly_like_one_matrix_at_a_time(neox, quant, fraction, monkeypatch):
    import copy

    from kernels import QuantSpec
    from pipeline import models
    from pipeline.methods import rtn

    model, _ = neox
    alone = copy.deepcopy(model)
    spec = QuantSpec(**quant)
    weights = models.linear_weights(model)
    groups = rtn.quantization_groups(weights, models.outlier_columns(model, fraction), spec)
    stacked = any(len(g) > 1 for g in groups)
    assert stacked == (quant["dtype"] != "quantile" and quant["block_size"] != 100), groups
    report = quantize_model_(model, Recipe.of(spec, outlier_fraction=fraction))
    monkeypatch.setattr(rtn, "GROUP_BYTES", 0)  # every matrix on its own
    assert all(len(g) == 1 for g in rtn.quantization_groups(weights, {}, spec, max_bytes=0))
    assert quantize_model_(alone, Recipe.of(spec, outlier_fraction=fraction)) == report
    for (name, got), want in zip(model.named_parameters(), alone.parameters(), strict=True):
        assert torch.equal(got, want), name


def test_groups_respect_the_byte_cap(neox):
    from kernels import QuantSpec
    from pipeline import models
    from pipeline.methods import rtn

    weights = models.linear_weights(neox[0])
    spec = QuantSpec("nf", 4, 64)
    one_each = max(v.numel() * v.element_size() for v in weights.values())
    for group in rtn.quantization_groups(weights, {}, spec, max_bytes=2 * one_each):
        assert sum(weights[n].numel() * weights[n].element_size() for n in group) <= 2 * one_each
    names = [n for g in rtn.quantization_groups(weights, {}, spec) for n in g]
    assert sorted(names) == sorted(weights)


def test_decoder_layers_are_the_repeated_blocks(llama, neox):
    from pipeline.models import decoder_layers

    assert [type(m).__name__ for m in decoder_layers(llama[0])] == ["LlamaDecoderLayer"] * 2
    assert decoder_layers(neox[0]) == list(neox[0].gpt_neox.layers)
    gpt2 = tiny_gpt2()
    assert decoder_layers(gpt2) == list(gpt2.transformer.h)


def test_compile_layers_refuses_a_model_without_blocks():
    from pipeline.models import compile_layers

    with pytest.raises(ValueError, match="no repeated decoder blocks"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("fraction", [0.0, 0.05])
def test_batched_quantile_codebooks_quantize_exactly_like_one_estimate_per_matrix(
    neox, fraction, monkeypatch
):
    import copy

    from kernels import QuantSpec
    from pipeline import models
    from pipeline.methods import rtn

    model, _ = neox
    alone = copy.deepcopy(model)
    spec = QuantSpec("quantile", 4, 64)
    weights = models.linear_weights(model)
    assert len(rtn.batched_codebooks(weights, {}, spec)) == len(weights)
    monkeypatch.setattr(rtn, "QUANTILE_BATCH", 3)  # several batches of one shape
    report = quantize_model_(model, Recipe.of(spec, outlier_fraction=fraction))
    monkeypatch.setattr(rtn, "batched_codebooks", lambda *args: {})  # levels_for per matrix
    assert quantize_model_(alone, Recipe.of(spec, outlier_fraction=fraction)) == report
    for (name, got), want in zip(model.named_parameters(), alone.parameters(), strict=True):
        assert torch.equal(got, want), name
