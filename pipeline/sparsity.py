"""SQFT's sparse base: unstructured sparsity of the quantized matrices, pruned before quantization.

Pruning is Wanda's (Sun et al. 2023): score |W_ij| * ||X_j||_2, X_j the j-th input feature of the
layer over the calibration tokens (the first `batch_size` recovery windows), and in every output row
the `floor(sparsity * in)` lowest scores are zeroed (ties: the lower column index first). A matrix
whose input is not a hidden state (an embedding table, when quantized) is pruned by magnitude |W_ij|.
After quantization the pruned weights are set to zero again: the stored mask, not the codebook,
decides them (GPTQ's error feedback may have moved them).

Storage model (what `total_model_bits` counts): a sparse matrix of n weights stores a bitmap of n
bits (1 = kept), the codes of the kept weights only (k bits each; 16 for a kept proxy column), and
the same per-block absmax constants and codebooks as the dense matrix (the blocks are still over the
dense flattened matrix). So each matrix costs n - k * (pruned quantized weights) - 16 * (pruned
16-bit weights) bits more than dense: at 4 bits, sparsity above 25% is needed to save anything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pipeline.specs import QuantReport

if TYPE_CHECKING:
    from pipeline.recipe import Recipe
    from pipeline.recovery import RecoverSpec

PROXY_BITS = 16  # bits of a weight in a kept (16-bit) proxy column


def wanda_keep(weight: Tensor, input_norm: Tensor | None, sparsity: float) -> Tensor:
    """The kept weights of `weight` [out, in] (bool, same shape): per row, all but the
    `floor(sparsity * in)` lowest |W| * `input_norm` [in] (|W| when `input_norm` is None)."""
    score = weight.detach().abs().float()
    if input_norm is not None:
        score = score * input_norm.float().to(score.device)[None, :]
    n_prune = math.floor(sparsity * weight.shape[1])
    keep = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    if n_prune:
        order = torch.sort(score, dim=1, stable=True).indices[:, :n_prune]
        keep.scatter_(1, order, False)
    return keep


def input_norms(model: nn.Module, names: Iterable[str], tokens: Tensor, batch_size: int) -> dict[str, Tensor]:
    """||X_j||_2 over `tokens` [n, seq_len] of the input features of each linear layer whose weight
    parameter is named in `names` (embedding tables are skipped: their input is token ids)."""
    sums: dict[str, Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, nn.Embedding):
            continue

        def hook(_: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)

        handles.append(module.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch_size):
                model(input_ids=tokens[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.sqrt() for name, total in sums.items()}


def prune_(weights: dict[str, Tensor], keep: dict[str, Tensor]) -> None:
    """Zero every weight whose `keep` entry is False, in place."""
    with torch.no_grad():
        for name, view in weights.items():
            view.masked_fill_(~keep[name], 0)


def sparse_bits_delta(keep: dict[str, Tensor], proxy: dict[str, Tensor], bits: int) -> int:
    """Bits the storage model adds to the dense count: a bitmap bit per weight, minus the codes of the
    pruned weights (`bits` each, 16 in a proxy column of `proxy`: {name: column indices})."""
    delta = 0
    for name, kept in keep.items():
        pruned = ~kept
        cols = proxy.get(name)
        pruned_proxy = int(pruned[:, cols].sum()) if cols is not None and cols.numel() else 0
        delta += kept.numel() - bits * (int(pruned.sum()) - pruned_proxy) - PROXY_BITS * pruned_proxy
    return delta


def with_sparse_bits(report: QuantReport, delta: int) -> QuantReport:
    """`report` with the sparse storage's `delta` bits in `total_model_bits` and `bits_per_param`."""
    n_matrix = report.n_quantized_params + report.n_kept_params
    return dataclasses.replace(
        report,
        total_model_bits=report.total_model_bits + delta,
        bits_per_param=report.bits_per_param + delta / n_matrix,
    )


@dataclass(frozen=True)
class SparseBase:
    """The kept-weight masks and the proxy columns (as `quantize_model_` finds them on the pruned
    weights), both by parameter name."""

    keep: dict[str, Tensor]
    proxy: dict[str, Tensor]


def sparsify_model_(
    model: Any, recipe: Recipe, sparsity: float, tokens: Tensor, batch_size: int
) -> SparseBase:
    """Prune the matrices `recipe` quantizes (Wanda on `tokens`), in place, before quantization."""
    from pipeline.models.weights import linear_weights, outlier_columns

    weights = linear_weights(
        model, include_embeddings=recipe.quantize_embeddings, include_lm_head=recipe.quantize_lm_head
    )
    norms = input_norms(model, weights, tokens, batch_size)
    keep = {name: wanda_keep(view, norms.get(name), sparsity) for name, view in weights.items()}
    prune_(weights, keep)
    return SparseBase(keep, outlier_columns(model, recipe.outlier_fraction))


def requantized_sparse_(model: Any, recipe: Recipe, sparse: SparseBase, report: QuantReport) -> QuantReport:
    """After quantizing the pruned model: zero the pruned weights again (the mask decides them) and
    count the sparse storage in `report`."""
    from pipeline.models.weights import linear_weights

    weights = linear_weights(
        model, include_embeddings=recipe.quantize_embeddings, include_lm_head=recipe.quantize_lm_head
    )
    prune_(weights, sparse.keep)
    return with_sparse_bits(report, sparse_bits_delta(sparse.keep, sparse.proxy, recipe.bits))


def sparsify_for_recovery_(
    model: Any, tokenizer: Any, recipe: Recipe, spec: RecoverSpec, data_root: Path
) -> SparseBase:
    """Prune `model` to `spec.sparsity` with Wanda's norms from the first `spec.batch_size` recovery
    windows (the training text, never an evaluation text)."""
    from pipeline.calibration import calibration_tokens
    from pipeline.models.loading import config_positions

    positions = config_positions(model.config.to_dict())
    tokens = calibration_tokens(spec.windows(), tokenizer, data_root, positions)[: spec.batch_size]
    return sparsify_model_(model, recipe, spec.sparsity, tokens, spec.batch_size)
