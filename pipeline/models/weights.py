"""A model's quantizable weights as `[out, in]` views, its pristine snapshot, and proxy columns.

Weights are addressed by parameter name (`model.layers.0.mlp.up_proj.weight`) and always seen as
`[out_features, in_features]`: GPT-2's `Conv1D` stores `[in, out]`, so its weight is handed out as
a transposed view (writing into the view writes the parameter). Embeddings and the LM head stay
16-bit unless asked for; a tied LM head is the embedding matrix, so it is quantized once, and only
when embeddings are quantized too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pipeline.models.architectures import PROXY_PAIRS
from pipeline.recipe import check_fraction

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated decoder blocks: modules of a class its `_no_split_modules` names, else the
    longest `nn.ModuleList` of one class."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len({type(x) for x in m}) == 1]
    return list(max(lists, key=len, default=[]))


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family), matched by name so this module needs no transformers import
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def _tied_lm_head(model: PreTrainedModel) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def linear_weights(
    model: PreTrainedModel, *, include_embeddings: bool = False, include_lm_head: bool = False
) -> dict[str, Tensor]:
    """Every quantizable weight by parameter name, as an `[out, in]` view of the parameter.

    nn.Linear and GPT-2's Conv1D (transposed view) always; nn.Embedding tables when
    `include_embeddings`; the LM head when `include_lm_head`. A tied LM head is the embedding
    matrix: it appears once, and asking for it without the embeddings is an error.
    """
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = lm_head is not None and _tied_lm_head(model)
    if include_lm_head and tied and not include_embeddings:
        raise ValueError(
            "the LM head is tied to the input embeddings: quantizing it quantizes the embeddings too; "
            "set quantize_embeddings=True as well, or keep quantize_lm_head=False"
        )
    weights: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) in seen:
            continue
        if module is lm_head and not include_lm_head:
            continue
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Embedding) and include_embeddings):
            view = weight.data
        elif _is_conv1d(module):
            view = weight.data.t()
        else:
            continue
        seen.add(id(weight))
        weights[f"{name}.weight"] = view
    return weights


def snapshot_weights(model: nn.Module) -> dict[str, Tensor]:
    """A pristine copy of every parameter, on the same device (tied parameters once)."""
    return {name: param.detach().clone() for name, param in model.named_parameters()}


@torch.no_grad()
def restore_weights_(model: nn.Module, snapshot: Mapping[str, Tensor]) -> None:
    """Copy a snapshot back into the model's parameters in place (no reallocation)."""
    params = dict(model.named_parameters())
    if params.keys() != snapshot.keys():
        missing, extra = sorted(params.keys() - snapshot.keys()), sorted(snapshot.keys() - params.keys())
        raise KeyError(f"snapshot does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    names = list(params)
    torch._foreach_copy_([params[n] for n in names], [snapshot[n] for n in names])  # few launches, not ~400


def n_outlier_columns(n_columns: int, fraction: float) -> int:
    """How many of `n_columns` hidden units a fraction marks: round(fraction * n), at least 1."""
    return 0 if fraction == 0 else max(1, round(fraction * n_columns))


def outlier_columns(model: PreTrainedModel, fraction: float) -> dict[str, Tensor]:
    """Proxy quantization: input columns of each layer's first FFN matrix to keep in 16 bits.

    The hidden units whose row of the attention output projection (`[hidden, in]`) has the top
    `fraction` standard deviation are the outlier dimensions; the same indices are input columns of
    the first FFN matrix (or matrices, for gated MLPs). Returns {FFN weight name: sorted indices}.
    """
    check_fraction(fraction)
    if fraction == 0:
        return {}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PROXY_PAIRS:
        raise ValueError(
            f"proxy quantization (outlier_fraction > 0) does not know model_type {model_type!r}; "
            f"known: {sorted(PROXY_PAIRS)}"
        )
    attn_suffix, ffn_suffixes = PROXY_PAIRS[model_type]
    weights = linear_weights(model)
    columns: dict[str, Tensor] = {}
    for name, attn_out in weights.items():
        if not name.endswith(attn_suffix):
            continue
        prefix = name[: -len(attn_suffix)]
        std = attn_out.float().std(dim=1)
        top = torch.topk(std, n_outlier_columns(std.numel(), fraction)).indices.sort().values
        for suffix in ffn_suffixes:
            ffn_name = prefix + suffix
            if ffn_name not in weights or weights[ffn_name].shape[1] != std.numel():
                raise ValueError(f"no first FFN matrix {ffn_name!r} of width {std.numel()} after {name!r}")
            columns[ffn_name] = top
    if not columns:
        raise ValueError(f"no attention output projection '*{attn_suffix}' found in this {model_type} model")
    return columns


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
