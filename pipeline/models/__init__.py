"""The model side: load a causal LM, address its weights, quantize them in place, compile its blocks.

loading.py        load_model, check_model_ref, local_config, max_positions (no weights read)
architectures.py  per-architecture facts: proxy-quantization pairs, what the fast scorer packs
weights.py        linear_weights ([out, in] views), snapshot/restore, outlier (proxy) columns
quantize.py       quantize_model_(model, recipe): the registered method writes, bits are counted
compile.py        compile_layers: regional torch.compile of the decoder blocks
shard.py          plan_device_map, shard_model_: a model over several devices (accelerate)
"""

from pipeline.methods.registry import QuantizationError
from pipeline.models.compile import compile_layers, is_compiled
from pipeline.models.loading import (
    TORCH_DTYPES,
    check_model_ref,
    load_model,
    local_config,
    max_positions,
    resolve_torch_dtype,
)
from pipeline.models.quantize import count_bits, quantize_model_
from pipeline.models.weights import (
    decoder_layers,
    linear_weights,
    n_outlier_columns,
    n_params,
    outlier_columns,
    restore_weights_,
    snapshot_weights,
)

__all__ = [
    "TORCH_DTYPES",
    "QuantizationError",
    "check_model_ref",
    "compile_layers",
    "count_bits",
    "decoder_layers",
    "is_compiled",
    "linear_weights",
    "load_model",
    "local_config",
    "max_positions",
    "n_outlier_columns",
    "n_params",
    "outlier_columns",
    "quantize_model_",
    "resolve_torch_dtype",
    "restore_weights_",
    "snapshot_weights",
]
