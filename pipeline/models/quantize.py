"""`quantize_model_`: quantize a resident model in place with a recipe, and count its bits exactly.

The recipe's method (`pipeline.methods.METHODS`) writes the values; storage is counted here, once
for every method, from the method's `weight_bits` (RTN's unless the method stores something else).
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pipeline.methods import METHODS, QuantizeRequest
from pipeline.models.weights import linear_weights, n_params, outlier_columns
from pipeline.recipe import Recipe
from pipeline.specs import QuantReport

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pipeline.methods.registry import WeightBits


@torch.no_grad()
def quantize_model_(
    model: PreTrainedModel,
    recipe: Recipe,
    cache: dict[Any, Any] | None = None,
    calibration: Tensor | None = None,
) -> QuantReport:
    """Quantize every weight in the recipe's scope in place; count parameters and bits exactly.

    The baseline (bits=16) leaves the weights untouched and counts every parameter at 16 bits.
    Quantized matrices cost the method's `weight_bits` (constants, codebooks and kept proxy columns
    included); every other parameter costs 16 bits. `cache` is the worker's per-model state, handed
    to the method; `calibration` the token windows of a calibrating recipe. A mixed recipe
    (`recipe.is_mixed`) allocates its candidates per layer first and reports the allocation. A
    non-finite result raises `QuantizationError` (the model is then half-quantized: restore it).
    """
    total = n_params(model)
    if recipe.is_baseline:
        return QuantReport(total, 0, 0, 16 * total, 16.0)
    method = METHODS[recipe.method]
    weights = linear_weights(
        model, include_embeddings=recipe.quantize_embeddings, include_lm_head=recipe.quantize_lm_head
    )
    keep = outlier_columns(model, recipe.outlier_fraction)
    if method.needs_calibration and calibration is None:
        raise ValueError(f"quant.method={recipe.method!r} needs calibration token windows")
    if recipe.is_mixed:  # each layer its own candidate (pipeline.methods.allocation)
        from pipeline.methods.allocation import count_allocated_bits, quantize_allocated_

        per_layer, allocation = quantize_allocated_(
            model, weights, keep, recipe, {} if cache is None else cache, calibration
        )
        report = dataclasses.replace(
            count_allocated_bits(total, weights, keep, per_layer), allocation=allocation
        )
    else:
        request = QuantizeRequest(model, weights, keep, recipe, {} if cache is None else cache, calibration)
        method.quantize_(request)
        report = count_bits(total, weights, keep, recipe, method.weight_bits)
    if calibration is None or recipe.calibration is None:
        return report
    return dataclasses.replace(report, calibration=calibration_json(recipe.calibration, calibration))


def calibration_json(spec: Any, tokens: Tensor) -> str:
    """The `calibration` column: the spec with the resolved window length and the token ids' sha256."""
    from pipeline.calibration import tokens_hash

    fields = {
        **dataclasses.asdict(spec),
        "seq_len": int(tokens.shape[1]),
        "tokens_sha256": tokens_hash(tokens),
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def count_bits(
    total: int,
    weights: dict[str, Tensor],
    keep: dict[str, Tensor],
    recipe: Recipe,
    weight_bits: WeightBits | None,
) -> QuantReport:
    """The exact parameter and bit counts of a model of `total` parameters whose `weights` are quantized."""
    from kernels import weight_bits as rtn_weight_bits

    spec = recipe.spec
    assert spec is not None
    bits_of = weight_bits or (lambda r, shape, n_keep: rtn_weight_bits(spec, shape, n_keep))
    n_quant = n_kept = quant_bits = 0
    for name, view in weights.items():
        cols = keep.get(name)
        n_keep_cols = 0 if cols is None else cols.numel()
        n_kept += n_keep_cols * view.shape[0]
        n_quant += view.numel() - n_keep_cols * view.shape[0]
        quant_bits += bits_of(recipe, tuple(view.shape), n_keep_cols)
    return QuantReport.of_counts(total, n_quant, n_kept, quant_bits)
