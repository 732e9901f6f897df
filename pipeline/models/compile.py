"""Regional `torch.compile` of a resident model's decoder blocks (`eval.compile`)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.models.weights import decoder_layers

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


@contextmanager
def eager_layers(model: nn.Module) -> Iterator[None]:
    """Run compiled decoder blocks eagerly inside the block, then compiled again.

    Calibration passes need this: forward hooks registered after compiling (Hessians) and direct
    block calls with captured inputs (sequential GPTQ) are not reliably seen by a compiled graph
    (on CPU the hooks did not fire at all; on an H200 sequential GPTQ found Hessians missing).
    """
    saved = {
        layer: layer.__dict__.pop("forward") for layer in decoder_layers(model) if "forward" in layer.__dict__
    }
    try:
        yield
    finally:
        for layer, forward in saved.items():
            layer.forward = forward
