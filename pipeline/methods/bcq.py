"""`bcq` and `shiftadd`: ShiftAddLLM's binary-coding quantization (You et al., 2024) as methods.

Both quantize to `dtype=bcq` at 1..4 bits: each block (`block_size` values of the row-major flattening,
a group of one row along the input dimension where the size divides the width) is Σ_{i=1..q} α_i·b_i
with b_i ∈ {−1, +1} (`kernels.bcq`).

- `bcq`: the codes fitted to the weights alone (greedy, then `iters` rounds of alternating refinement),
  every block of a matrix at once, same-shaped matrices stacked. No calibration.
- `shiftadd`: ShiftAddLLM's multi-objective variant: the same codes inside GPTQ's column loop
  (`kernels.gptq.gptq_solve` with `kernels.bcq.BCQColumns`) with the layer Hessians of
  `pipeline.methods.gptq` (shared or sequential, the same cache), so the output error on calibration
  text is minimised, not only the weight error.

`quant.params`: `iters` (refinement rounds, 0: greedy only), `scales` ("fp16", or "pow2": every α a sum
of `pow2_terms` signed powers of two), and for shiftadd GPTQ's `damp`, `lazy_block`, `act_order`,
`hessians`, `hessian_device`. `pow2_terms` only matters with pow2 scales: with fp16 it is checked, then
set to its default, so cells that differ only there are one job.

Storage (`weight_bits`): q sign bits per value, q scales per block (16 bits each, or 7 bits per pow2
term), 16 bits per value of a kept proxy column.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kernels.bcq import BCQSettings
from kernels.bcq_scales import ScaleFormat
from kernels.codebooks import BCQ_BITS
from pipeline.methods.gptq import GPTQParams, quantize_with_hessians_, quantized_columns
from pipeline.methods.registry import Method, QuantizationError, QuantizeRequest, register_method

GROUP_VALUES = 1 << 26  # values of same-shaped matrices fitted in one call at most (~50 bytes each at peak)
POW2_TERMS = 3  # ShiftAddLLM's default number of additive powers of two


@dataclass(frozen=True)
class BCQParams:
    """`quant.params` of `quant.method=bcq`."""

    iters: int = 15  # alternating refinement rounds after the greedy start
    scales: str = "fp16"  # "fp16" or "pow2" (sums of `pow2_terms` signed powers of two)
    pow2_terms: int = POW2_TERMS

    def __post_init__(self) -> None:
        _ = self.settings  # validates
        if self.scales == "fp16":  # unused: one spelling, so such cells are one job
            object.__setattr__(self, "pow2_terms", POW2_TERMS)

    @property
    def settings(self) -> BCQSettings:
        return BCQSettings(self.iters, ScaleFormat(self.scales, self.pow2_terms))


@dataclass(frozen=True)
class ShiftAddParams(BCQParams):
    """`quant.params` of `quant.method=shiftadd`: BCQ's, and GPTQ's (`GPTQParams`)."""

    damp: float = 0.01
    lazy_block: int = 128
    act_order: bool = False
    hessians: str = "shared"
    hessian_device: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            _ = self.gptq
        except ValueError as err:
            raise ValueError(f"shiftadd: {err}") from err

    @property
    def gptq(self) -> GPTQParams:
        return GPTQParams(self.damp, self.lazy_block, self.act_order, self.hessians, self.hessian_device)


def bcq_weight_bits(recipe: Any, shape: tuple[int, ...], n_keep_columns: int) -> int:
    """Exact storage of one matrix: q bits a value, q scales a block in the recipe's scale format."""
    from kernels import weight_bits

    params = dict(recipe.params)
    scales = ScaleFormat(params["scales"], params["pow2_terms"])
    return weight_bits(recipe.spec, shape, n_keep_columns, scale_bits=scales.bits)


def check_recipe(recipe: Any) -> None:
    """A binary code has no block mean; shiftadd needs input activations (no embedding tables)."""
    if recipe.centering:
        raise ValueError(f"quant.method={recipe.method!r} takes no centering; set quant.centering=false")
    if recipe.method == "shiftadd" and recipe.quantize_embeddings:
        raise ValueError(
            "quant.method='shiftadd' cannot quantize embedding tables (they have no input activations); "
            "set quant.quantize_embeddings=false"
        )


def stack_groups(
    weights: dict[str, Tensor], keep: dict[str, Tensor], block_size: int | None
) -> list[list[str]]:
    """Names fitted together: same shape, torch dtype and device, no kept columns, blocks that never
    straddle two matrices, at most `GROUP_VALUES` values; anything else alone."""
    groups: list[list[str]] = []
    open_groups: dict[tuple[Any, ...], list[str]] = {}
    for name, view in weights.items():
        kept = keep.get(name)
        aligned = block_size is None or view.numel() % block_size == 0
        if not aligned or (kept is not None and kept.numel()):
            groups.append([name])
            continue
        key = (tuple(view.shape), view.dtype, view.device)
        group = open_groups.get(key)
        if group is None or (len(group) + 1) * view.numel() > GROUP_VALUES:
            group = open_groups[key] = []
            groups.append(group)
        group.append(name)
    return groups


@torch.no_grad()
def quantize_bcq_(request: QuantizeRequest) -> None:
    """Fit every weight's binary codes in place (kept proxy columns untouched)."""
    from kernels.bcq import bcq_fake_quantize, blocks_of, fit_decode_blocks
    from kernels.scaling import effective_block_size

    spec, settings = request.recipe.spec, BCQParams(**dict(request.recipe.params)).settings
    assert spec is not None, "the baseline is not quantized"
    _check_finite(request.weights, "before quantization", ValueError)
    for group in stack_groups(request.weights, request.keep, spec.block_size):
        views = [request.weights[name] for name in group]
        if len(group) == 1:  # alone: kept proxy columns, a tail block, or no same-shaped partner
            view, columns = views[0], quantized_columns(views[0], request.keep.get(group[0]))
            if columns is None:
                view.copy_(bcq_fake_quantize(view, spec, settings))
            else:
                view[:, columns] = bcq_fake_quantize(view[:, columns], spec, settings)
            continue
        size = effective_block_size(spec.block_size, views[0].numel())
        (x,) = blocks_of(torch.stack(views).reshape(-1), size)  # aligned: no tail block
        q = fit_decode_blocks(x, spec.bits, settings).view(len(views), *views[0].shape)
        for view, quantized in zip(views, q.unbind(0), strict=True):
            view.copy_(quantized)
    _check_finite(request.weights, f"after quantizing with {spec}", QuantizationError)


def quantize_shiftadd_(request: QuantizeRequest) -> None:
    """BCQ in GPTQ's column loop with the layers' Hessians (shared or sequential), in place."""
    from kernels.bcq import BCQColumns
    from kernels.gptq import GPTQSettings, gptq_solve

    params = ShiftAddParams(**dict(request.recipe.params))
    spec, bcq_settings = request.recipe.spec, params.settings
    assert spec is not None, "the baseline is not quantized"
    gptq_settings = GPTQSettings(params.damp, params.lazy_block, params.act_order)

    def solve(w: Tensor, h: Tensor) -> Tensor:
        numel = w.shape[1] * w.shape[2]
        size = numel if spec.block_size is None else min(spec.block_size, numel)
        return gptq_solve(w, h, BCQColumns(w, spec.bits, size, bcq_settings), spec.block_size, gptq_settings)

    quantize_with_hessians_(request, params.hessians, params.hessian_device, solve)


def _check_finite(weights: dict[str, Tensor], when: str, error: type[Exception]) -> None:
    """One host read for every matrix: raise `error` naming the non-finite ones."""
    flags = torch.stack([torch.isfinite(w).all() for w in weights.values()]).tolist() if weights else []
    bad = [name for name, ok in zip(weights, flags, strict=True) if not ok]
    if bad:
        raise error(f"non-finite values {when}: {bad[:5]}")


_COMMON: dict[str, Any] = dict(
    dtypes=("bcq",), bits=BCQ_BITS, weight_bits=bcq_weight_bits, extra_check=check_recipe
)
BCQ = register_method(
    Method(
        name="bcq",
        quantize_=quantize_bcq_,
        description="binary-coding quantization: q signed scales per block, greedy + alternating refinement",
        params=BCQParams,
        **_COMMON,
    )
)
SHIFTADD = register_method(
    Method(
        name="shiftadd",
        quantize_=quantize_shiftadd_,
        description="ShiftAddLLM: binary codes in GPTQ's column loop (output error on calibration text)",
        params=ShiftAddParams,
        needs_calibration=True,
        **_COMMON,
    )
)
_FIELDS = {f.name for f in dataclasses.fields(ShiftAddParams)}
assert {f.name for f in dataclasses.fields(GPTQParams)} <= _FIELDS, "shiftadd takes every gptq parameter"
