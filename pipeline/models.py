"""Load a causal LM, find its quantizable weights, quantize them in place, and restore them.

Weights are addressed by parameter name (`model.layers.0.mlp.up_proj.weight`) and always seen as
`[out_features, in_features]`: GPT-2's `Conv1D` stores `[in, out]`, so its weight is handed out as
a transposed view (writing into the view writes the parameter). Embeddings and the LM head stay
16-bit unless asked for; a tied LM head is the embedding matrix, so it is quantized once, and only
when embeddings are quantized too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pipeline.specs import ModelRef, QuantReport

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from kernels import QuantSpec

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Proxy quantization: model_type -> (attention output projection, inputs of the first FFN matrix),
# as suffixes of parameter names inside one decoder layer.
PROXY_PAIRS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama": ("self_attn.o_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mistral": ("self_attn.o_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "qwen2": ("self_attn.o_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "qwen3": ("self_attn.o_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "gpt_neox": ("attention.dense.weight", ("mlp.dense_h_to_4h.weight",)),
    "opt": ("self_attn.out_proj.weight", ("fc1.weight",)),
    "gpt2": ("attn.c_proj.weight", ("mlp.c_fc.weight",)),
    "bloom": ("self_attention.dense.weight", ("mlp.dense_h_to_4h.weight",)),
}


class QuantizationError(RuntimeError):
    """Quantization produced a non-finite weight (NaN or Inf)."""


def check_model_ref(ref: ModelRef) -> None:
    """Cheap validation before any job runs: dtype known, local path present or a hub id."""
    if ref.torch_dtype != "auto" and ref.torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype {ref.torch_dtype!r} unknown; allowed: 'auto', {sorted(TORCH_DTYPES)}")
    path = Path(ref.name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {ref.name_or_path!r} is a file; give a model directory")
        if ref.gguf_file and not (path / ref.gguf_file).is_file():
            raise ValueError(f"gguf_file {ref.gguf_file!r} not found in {ref.name_or_path!r}")
        return
    looks_local = ref.name_or_path.startswith(("/", ".", "~")) or not HUB_ID.match(ref.name_or_path)
    if looks_local:
        raise ValueError(
            f"model {ref.name_or_path!r} is neither an existing local directory nor a hub id 'org/name'"
        )


def local_config(name_or_path: str) -> dict[str, Any] | None:
    """A local model directory's `config.json` as a dict; None for hub ids, ladders or unreadable files."""
    config = Path(name_or_path).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        fields = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return fields if isinstance(fields, dict) else None


def max_positions(name_or_path: str) -> int | None:
    """The longest sequence a model takes, read without loading it: a ladder's `seq_len`, or a local
    directory's `config.json` (`max_position_embeddings` or `n_positions`); None when not known here."""
    from pipeline.ladders.ladder import is_ladder_ref, parse_ladder_ref

    if is_ladder_ref(name_or_path):
        try:
            return parse_ladder_ref(name_or_path)[0].seq_len
        except (KeyError, ValueError):
            return None  # preflight reports the bad reference itself
    fields = local_config(name_or_path) or {}
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(fields.get(key), int):
            return fields[key]
    return None


def resolve_torch_dtype(torch_dtype: str, device: str) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 elsewhere."""
    if torch_dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype {torch_dtype!r} unknown; allowed: 'auto', {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[torch_dtype]


def load_model(ref: ModelRef, device: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (hub id or local directory), in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_ref(ref)
    source = dict(revision=ref.revision, gguf_file=ref.gguf_file, trust_remote_code=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref.name_or_path, dtype=resolve_torch_dtype(ref.torch_dtype, device), **source
        )
        tokenizer = AutoTokenizer.from_pretrained(ref.name_or_path, **source)
    except OSError as err:
        raise ValueError(
            f"could not load model {ref.name_or_path!r}: no such local directory, and the hub "
            f"(offline here unless HF_HUB_OFFLINE is unset) did not provide it: {err}"
        ) from err
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device).eval()  # type: ignore[arg-type]
    model.requires_grad_(False)
    log.info("loaded %s (%s, %s) on %s", ref.name_or_path, model.config.model_type, model.dtype, device)
    return model, tokenizer


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated decoder blocks: modules of a class its `_no_split_modules` names, else the
    longest `nn.ModuleList` of one class."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len({type(x) for x in m}) == 1]
    return list(max(lists, key=len, default=[]))


# Compiled blocks get one graph per batch width (rows are dynamic): allow many widths before dynamo
# gives up and runs a new width eagerly (still correct, only slower).
COMPILE_LIMITS: dict[str, Any] = {
    "automatic_dynamic_shapes": False,
    "recompile_limit": 512,
    "accumulated_recompile_limit": 4096,
}


def compile_layers(model: nn.Module) -> int:
    """`torch.compile` the decoder blocks in place (regional compilation); returns how many.

    One compiled function serves every block (they share their code; their weights are graph inputs,
    so restore and quantize, which write in place, never trigger a recompile). The batch dimension is
    dynamic and every other size static: a graph per batch width, reused for any number of rows. On an
    H200 static inner sizes ran a packed 410M forward at 57% MFU, fully dynamic shapes at 45%, eager
    at 43% (benchmarks/results/forward-profile-h200.json): inductor fuses the layer norms, rotary
    embeddings, activations and residual adds that eager runs as separate memory-bound kernels.
    Scoring needs no KV cache, so `use_cache` is switched off (a cache object per call would
    recompile). Calling it again changes nothing.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no repeated decoder blocks found to compile")
    model.config.use_cache = False  # type: ignore[union-attr]
    forward = torch.compile(type(layers[0]).forward)
    for layer in layers:
        if not isinstance(layer.forward, functools.partial):
            layer.forward = functools.partial(_rows_dynamic, forward, layer)
    return len(layers)


def _rows_dynamic(compiled: Any, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Call a compiled block with dimension 0 (the batch) of its tensor inputs marked dynamic."""
    hidden = args[0] if args else kwargs["hidden_states"]
    rows = hidden.shape[0]
    for value in (*args, *kwargs.values()):
        for tensor in value if isinstance(value, tuple) else (value,):
            if isinstance(tensor, Tensor) and tensor.dim() and tensor.shape[0] == rows:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
    with torch._dynamo.config.patch(COMPILE_LIMITS):
        return compiled(layer, *args, **kwargs)


def is_compiled(model: nn.Module) -> bool:
    """Whether `compile_layers` compiled this model's blocks."""
    layers = decoder_layers(model)
    return bool(layers) and isinstance(layers[0].forward, functools.partial)


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


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"outlier_fraction must be in [0, 1), got {fraction}")


def outlier_columns(model: PreTrainedModel, fraction: float) -> dict[str, Tensor]:
    """Proxy quantization: input columns of each layer's first FFN matrix to keep in 16 bits.

    The hidden units whose row of the attention output projection (`[hidden, in]`) has the top
    `fraction` standard deviation are the outlier dimensions; the same indices are input columns of
    the first FFN matrix (or matrices, for gated MLPs). Returns {FFN weight name: sorted indices}.
    """
    _check_fraction(fraction)
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


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
def quantize_model_(
    model: PreTrainedModel,
    spec: QuantSpec | None,
    outlier_fraction: float = 0.0,
    *,
    include_embeddings: bool = False,
    include_lm_head: bool = False,
) -> QuantReport:
    """Fake-quantize every quantizable weight in place and count parameters and bits exactly.

    `spec=None` is the 16-bit baseline: weights untouched, every parameter counted at 16 bits.
    Quantized matrices cost `kernels.weight_bits(spec, shape, n_keep)` bits (constants, codebooks and
    kept proxy columns included); every other parameter costs 16 bits. A non-finite result raises
    QuantizationError (the model is then half-quantized: restore it).
    """
    _check_fraction(outlier_fraction)
    n_params = _n_params(model)
    if spec is None:
        return QuantReport(n_params, 0, 0, 16 * n_params, 16.0)
    from kernels import fake_quantize, weight_bits
    from kernels.blockwise import resolve_impl

    weights = linear_weights(model, include_embeddings=include_embeddings, include_lm_head=include_lm_head)
    keep = outlier_columns(model, outlier_fraction)
    groups = quantization_groups(weights, keep, spec)
    codebooks = batched_codebooks(weights, keep, spec)  # data-dependent codebooks: never stacked
    n_quant = n_kept = quant_bits = 0
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
        for view in views:
            n_keep_cols = 0 if cols is None else cols.numel()
            n_kept += n_keep_cols * view.shape[0]
            n_quant += view.numel() - n_keep_cols * view.shape[0]
            quant_bits += weight_bits(spec, tuple(view.shape), n_keep_columns=n_keep_cols)
    order = [name for group in groups for name in group]
    _raise_non_finite(order, torch.cat(finite_in).tolist() if order else [])
    flags = torch.cat(finite_out).tolist() if order else []
    bad = [name for name, ok_out in zip(order, flags, strict=True) if not ok_out]
    if bad:
        raise QuantizationError(f"non-finite values after quantizing with {spec}: {bad[:5]}")
    n_matrix = n_quant + n_kept
    total_bits = quant_bits + 16 * (n_params - n_matrix)
    return QuantReport(
        n_params=n_params,
        n_quantized_params=n_quant,
        n_kept_params=n_kept,
        total_model_bits=total_bits,
        bits_per_param=quant_bits / n_matrix if n_matrix else math.nan,
        extra={"n_matrices": float(len(weights))},
    )
