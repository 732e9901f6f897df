"""Hessians H = 2XXᵀ/n of the inputs of a model's linear layers, from calibration token windows.

`collect_hessians` runs the model once over the windows with a forward hook on every named linear
module and sums XᵀX in float32. Layers that read the same input tensor (q/k/v, gate/up) share one H:
the first such layer owns it and the others are recorded as its aliases, so the sum is computed and
stored once. `block_inputs` and `run_block` serve GPTQ's sequential mode, which feeds each decoder
block the outputs of the already-quantized blocks before it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

BATCH_TOKENS = 16384  # calibration tokens per forward pass


@dataclass
class Hessians:
    """Per-layer input Hessians: `owner[name]` is the layer whose H `name` uses (itself or an alias)."""

    h: dict[str, Tensor] = field(default_factory=dict)  # owner name -> float32 [in, in], 2XXᵀ/n
    owner: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)  # owner name -> n (input rows summed)

    def of(self, name: str) -> Tensor:
        return self.h[self.owner[name]]

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.h.values())


def module_of(name: str) -> str:
    """ "model.layers.0.mlp.up_proj.weight" -> "model.layers.0.mlp.up_proj"."""
    return name.removesuffix(".weight")


@contextmanager
def hessian_hooks(
    model: nn.Module,
    names: Iterable[str],
    into: Hessians,
    device: torch.device,
    root: nn.Module | None = None,
) -> Iterator[None]:
    """Accumulate XᵀX of each named module's input into `into` (scaled by `finish_hessians`).

    Inputs are matched by tensor identity within one forward of `root` (default: the model).
    """
    # inputs seen in this forward: id -> (owner, weak reference). Identity, not the data pointer: a freed
    # input's memory is reused by the next same-shaped one (q_proj's input, then gate_proj's)
    seen: dict[int, tuple[str, weakref.ref[Tensor]]] = {}
    handles = []

    def hook(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        entry = seen.get(id(x))
        if entry is not None and entry[1]() is x and into.owner.get(name, entry[0]) == entry[0]:
            into.owner[name] = entry[0]
            return
        seen[id(x)] = (name, weakref.ref(x))
        into.owner[name] = name
        flat = x.detach().reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float32)
        if name not in into.h:
            into.h[name] = torch.zeros(flat.shape[1], flat.shape[1], device=device)
            into.tokens[name] = 0
        into.h[name].addmm_(flat.t(), flat)
        into.tokens[name] += flat.shape[0]

    for name in names:
        module = model.get_submodule(module_of(name))
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: hook(n, m, a)))
    model_hook = (root or model).register_forward_pre_hook(lambda m, a: seen.clear())
    try:
        yield
    finally:
        for handle in [*handles, model_hook]:
            handle.remove()


def finish_hessians(hessians: Hessians) -> Hessians:
    """Scale each summed XᵀX to 2XXᵀ/n in place (GPTQ's H)."""
    for name, h in hessians.h.items():
        h.mul_(2.0 / max(1, hessians.tokens[name]))
    return hessians


def batches(tokens: Tensor, batch_tokens: int = BATCH_TOKENS) -> list[Tensor]:
    """Calibration windows [n, seq] in batches of about `batch_tokens` tokens."""
    rows = max(1, batch_tokens // tokens.shape[1])
    return list(tokens.split(rows))


@torch.no_grad()
def collect_hessians(
    model: nn.Module, names: Iterable[str], tokens: Tensor, device: torch.device
) -> Hessians:
    """H of every named weight's layer over the calibration windows, from one pass of the model."""
    names = list(names)
    hessians = Hessians()
    model_device = next(model.parameters()).device
    with hessian_hooks(model, names, hessians, device):
        for batch in batches(tokens):
            model(input_ids=batch.to(model_device), use_cache=False)
    missing = [n for n in names if n not in hessians.owner]
    if missing:
        raise ValueError(f"gptq: no calibration input reached {missing[:3]} (not called in the forward pass)")
    return finish_hessians(hessians)


class _Stop(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@torch.no_grad()
def block_inputs(
    model: nn.Module, first_block: nn.Module, tokens: Tensor
) -> list[tuple[tuple[Any, ...], dict]]:
    """The (args, kwargs) the first decoder block receives for each calibration batch."""
    captured: list[tuple[tuple[Any, ...], dict]] = []

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict) -> None:
        captured.append((args, dict(kwargs)))
        raise _Stop

    handle = first_block.register_forward_pre_hook(capture, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in batches(tokens):
            with suppress(_Stop):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: list[tuple[tuple[Any, ...], dict]]
) -> list[tuple[tuple[Any, ...], dict]]:
    """The next block's inputs: this block's hidden-state output in place of the first argument."""
    out = []
    for args, kwargs in inputs:
        hidden_in = args[0] if args else kwargs["hidden_states"]
        result = block(*args, **kwargs)
        hidden = result[0] if isinstance(result, tuple) else result
        assert hidden.shape == hidden_in.shape, (hidden.shape, hidden_in.shape)
        if args:
            out.append(((hidden, *args[1:]), kwargs))
        else:
            out.append((args, {**kwargs, "hidden_states": hidden}))
    return out
