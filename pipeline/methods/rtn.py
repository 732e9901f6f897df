"""`rtn`: round-to-nearest, the paper's zero-shot quantization (method one of the registry).

Every selected weight is fake-quantized blockwise with `kernels.fake_quantize`. On a GPU the cost is
kernel launches and Python, not bandwidth, so matrices of one shape are stacked into one call where
that changes no result (`quantization_groups`), and quantile codebooks of same-shaped matrices are
estimated in one batched sort (`batched_codebooks`). Non-finite inputs and outputs are checked on the
device and read once per job (no host sync per matrix).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pipeline.methods.registry import Method, QuantizationError, QuantizeRequest, register_method

if TYPE_CHECKING:
    from kernels import QuantSpec

GROUP_BYTES = 256 << 20  # matrices quantized in one call at most (the stack and its output are extra memory)


def quantization_groups(
    weights: dict[str, Tensor], keep: dict[str, Tensor], spec: QuantSpec, max_bytes: int = GROUP_BYTES
) -> list[list[str]]:
    """Names of the matrices to quantize together, one kernel call a group, in first-seen order.

    Matrices of one shape, dtype and device are stacked when that changes no result: a static codebook
    (not quantile), no centering, no kept proxy columns, and blocks that never straddle two matrices.
    On a GPU this turns ~100 small launches (and their Python) into a few; each group holds at most
    `max_bytes` of weights. Anything else is a group of one.
    """
    from kernels import CODEBOOKS

    stackable = not CODEBOOKS[spec.dtype].data_dependent and not spec.centering
    groups: list[list[str]] = []
    open_groups: dict[tuple[Any, ...], list[str]] = {}
    for name, view in weights.items():
        cols = keep.get(name)
        aligned = spec.block_size is None or view.numel() % spec.block_size == 0
        if not (stackable and aligned and view.dim() == 2 and (cols is None or cols.numel() == 0)):
            groups.append([name])
            continue
        key = (tuple(view.shape), view.dtype, view.device)
        group = open_groups.get(key)
        if group is None or (len(group) + 1) * view.numel() * view.element_size() > max_bytes:
            group = open_groups[key] = []
            groups.append(group)
        group.append(name)
    return groups


QUANTILE_BATCH = 32  # quantile codebooks estimated in one batch at most (2^20 float64 values each)


def batched_codebooks(weights: dict[str, Tensor], keep: dict[str, Tensor], spec: QuantSpec) -> dict[str, Any]:
    """Quantile codebook levels of every matrix quantized whole (no kept columns), same shapes batched.

    A quantile codebook is estimated from its own matrix (a sort of up to 2^20 values): one batched
    sort for each shape's matrices instead of ~30 kernels per matrix (96 matrices of a 410M model:
    0.27 s per job on an H200 before). Equal bit for bit to one estimate per matrix (a test checks).
    Empty for static codebooks.
    """
    from kernels import CODEBOOKS
    from kernels.blockwise import quantile_levels

    if not CODEBOOKS[spec.dtype].data_dependent:
        return {}
    by_shape: dict[tuple[Any, ...], list[str]] = {}
    for name, view in weights.items():
        cols = keep.get(name)
        if cols is None or cols.numel() == 0:
            by_shape.setdefault((tuple(view.shape), view.dtype, view.device), []).append(name)
    out: dict[str, Any] = {}
    for names in by_shape.values():
        for start in range(0, len(names), QUANTILE_BATCH):
            chunk = names[start : start + QUANTILE_BATCH]
            out.update(zip(chunk, quantile_levels([weights[n] for n in chunk], spec), strict=True))
    return out


def _group_spec(spec: QuantSpec, views: list[Tensor]) -> QuantSpec:
    """The spec for a stack of `views`: per-tensor scaling becomes one block per matrix."""
    if spec.block_size is None and len(views) > 1:
        return dataclasses.replace(spec, block_size=views[0].numel())
    return spec


def _raise_non_finite(names: list[str], flags: list[bool]) -> None:
    bad = [name for name, ok in zip(names, flags, strict=True) if not ok]
    if bad:
        raise ValueError(f"cannot quantize {bad[:5]}: the weights hold NaN or Inf (before quantization)")


@torch.no_grad()
def quantize_(request: QuantizeRequest) -> None:
    """Round every weight of `request` to its nearest code in place (kept proxy columns untouched)."""
    from kernels import fake_quantize
    from kernels.blockwise import resolve_impl

    weights, keep, spec = request.weights, request.keep, request.recipe.spec
    assert spec is not None, "the baseline is not quantized"
    groups = quantization_groups(weights, keep, spec)
    codebooks = batched_codebooks(weights, keep, spec)  # data-dependent codebooks: never stacked
    finite_in: list[Tensor] = []  # checked on the device and read once at the end: no sync per matrix
    finite_out: list[Tensor] = []
    for group in groups:
        views = [weights[name] for name in group]
        w = views[0] if len(views) == 1 else torch.stack(views)
        ok = torch.isfinite(w).reshape(len(views), -1).all(1)
        # the fused kernel maps NaN/Inf to NaN; the torch path cannot take them: name them first
        if resolve_impl("auto", w, spec) != "triton":
            _raise_non_finite(group, ok.tolist())
        finite_in.append(ok)
        cols = keep.get(group[0]) if len(group) == 1 else None
        try:
            q = fake_quantize(
                w,
                _group_spec(spec, views),
                keep_columns=cols,
                check_finite=False,
                levels=codebooks.get(group[0]),
            )
        except ValueError as err:  # a weight the spec cannot take
            raise ValueError(f"cannot quantize {group[0]} {tuple(views[0].shape)}: {err}") from err
        finite_out.append(torch.isfinite(q).reshape(len(views), -1).all(1))
        for view, quantized in zip(views, q.unbind(0) if len(views) > 1 else [q], strict=True):
            view.copy_(quantized)
    order = [name for group in groups for name in group]
    _raise_non_finite(order, torch.cat(finite_in).tolist() if order else [])
    flags = torch.cat(finite_out).tolist() if order else []
    bad = [name for name, ok_out in zip(order, flags, strict=True) if not ok_out]
    if bad:
        raise QuantizationError(f"non-finite values after quantizing with {spec}: {bad[:5]}")


RTN = register_method(
    Method(name="rtn", quantize_=quantize_, description="round-to-nearest (zero-shot), the paper's method")
)
