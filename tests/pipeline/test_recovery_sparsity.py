"""SQFT's sparse base (pipeline/sparsity.py) on the real tiny Llama and the real corpus, on CPU.

Properties: Wanda's kept weights match an unoptimized per-row reference (scores sorted in Python);
its input norms match norms of the layer inputs collected whole; pruning zeroes exactly
floor(sparsity * in) weights per row of every quantized matrix, still zero after quantization; the
bits follow the storage model (bitmap + codes of kept weights, 16 bits in proxy columns) counted here
weight by weight.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models import load_model, quantize_model_
from pipeline.models.weights import linear_weights, outlier_columns
from pipeline.recipe import Recipe
from pipeline.sparsity import input_norms, requantized_sparse_, sparsify_model_, wanda_keep
from pipeline.specs import ModelRef


def reference_keep(weight: torch.Tensor, norm: torch.Tensor | None, sparsity: float) -> torch.Tensor:
    """Per row: sort (score, column) in Python, drop the first floor(sparsity * in)."""
    out, n_in = weight.shape
    keep = torch.ones(out, n_in, dtype=torch.bool)
    for row in range(out):
        scores = [
            (abs(float(weight[row, col])) * (1.0 if norm is None else float(norm[col])), col)
            for col in range(n_in)
        ]
        for _, col in sorted(scores)[: math.floor(sparsity * n_in)]:
            keep[row, col] = False
    return keep


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("with_norm", [True, False])
def test_wanda_matches_a_per_row_reference(sparsity, with_norm):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 20, generator=generator)
    weight[0, :4] = 0.5  # ties: the lower column goes first
    norm = torch.rand(20, generator=generator) + 0.1 if with_norm else None
    keep = wanda_keep(weight, norm, sparsity)
    assert torch.equal(keep, reference_keep(weight, norm, sparsity))
    assert int((~keep).sum()) == 6 * math.floor(sparsity * 20)


def tiny(tiny_model_dir):
    model, tokenizer = load_model(ModelRef(str(tiny_model_dir)), "cpu")
    ids = torch.tensor(tokenizer("The cat sat on the mat. " * 40)["input_ids"][:128]).view(4, 32)
    return model, ids


def test_input_norms_are_the_norms_of_the_layer_inputs(tiny_model_dir):
    model, ids = tiny(tiny_model_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    inputs: list[torch.Tensor] = []
    hook = model.get_submodule(name[: -len(".weight")]).register_forward_pre_hook(
        lambda _, args: inputs.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    want = torch.cat(inputs).float().norm(dim=0)
    got = input_norms(model, [name], ids, batch_size=3)[name]  # batches of 3, 1: sums across batches
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("recipe", "sparsity"),
    [
        (Recipe(dtype="int", bits=4, block_size=64), 0.5),
        (Recipe(dtype="nf", bits=3, block_size=64, outlier_fraction=0.05), 0.25),
    ],
)
def test_pruning_is_exact_and_the_bits_follow_the_storage_model(tiny_model_dir, recipe, sparsity):
    model, ids = tiny(tiny_model_dir)
    dense_model, _ = tiny(tiny_model_dir)
    sparse = sparsify_model_(model, recipe, sparsity, ids, batch_size=4)
    weights = linear_weights(model)
    assert sparse.keep.keys() == weights.keys()
    for name, view in weights.items():
        assert int((view == 0).sum()) == view.shape[0] * math.floor(sparsity * view.shape[1]), name
    assert {n: c.tolist() for n, c in sparse.proxy.items()} == {
        n: c.tolist() for n, c in outlier_columns(model, recipe.outlier_fraction).items()
    }
    report = requantized_sparse_(model, recipe, sparse, quantize_model_(model, recipe))
    dense = quantize_model_(dense_model, recipe)
    extra = 0
    for name, view in linear_weights(model).items():
        assert torch.all(view[~sparse.keep[name]] == 0), name
        proxy = set(sparse.proxy.get(name, torch.tensor([], dtype=torch.long)).tolist())
        for _row, col in (~sparse.keep[name]).nonzero().tolist():
            extra -= 16 if col in proxy else recipe.bits  # the pruned weight's code is not stored
        extra += view.numel()  # one bitmap bit per weight
    assert recipe.outlier_fraction == 0 or sparse.proxy  # the proxy case prunes in 16-bit columns
    assert report.total_model_bits == dense.total_model_bits + extra
    n_matrix = dense.n_quantized_params + dense.n_kept_params
    assert report.bits_per_param == pytest.approx(dense.bits_per_param + extra / n_matrix, rel=1e-12)
