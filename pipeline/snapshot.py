"""The pristine copy of a resident model's weights, on its GPUs or in pinned host memory, and restoring it.

`take_snapshot(model, "gpu")` clones every parameter where it lives (one GPU, or each shard's own GPU
when the model is sharded): restoring is a device-local copy, the fastest there is, at the price of a
second copy of the weights in GPU memory. `take_snapshot(model, "cpu")` copies them to host memory,
pinned when CUDA is available, so a model as large as the GPU still has a pristine copy: restoring is
an asynchronous host-to-device copy per parameter (`non_blocking` from pinned memory, all queued on
the current stream) and one synchronization at the end, at PCIe/NVLink-C2C speed rather than HBM speed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.memplan import JobLoad, check_snapshot, choose_snapshot, gpu_capacity, shape_of


@dataclass(frozen=True)
class Snapshot:
    """Parameter name -> pristine tensor, and where those tensors live ("gpu": beside each parameter)."""

    tensors: Mapping[str, Tensor]
    where: str  # "gpu" | "cpu"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def take_snapshot(model: nn.Module, where: str) -> Snapshot:
    """A pristine copy of every parameter (tied ones once): beside it (`gpu`) or in host memory (`cpu`).

    Raises:
        ValueError: `where` is neither "gpu" nor "cpu" ("auto" is resolved by the memory plan first).
    """
    if where not in ("gpu", "cpu"):
        check_snapshot(where)
        raise ValueError(f"take_snapshot needs a resolved place, 'gpu' or 'cpu', not {where!r}")
    params = dict(model.named_parameters())
    if where == "gpu":
        return Snapshot({n: p.detach().clone() for n, p in params.items()}, where)
    pin = torch.cuda.is_available()  # pinned pages make host-to-device copies asynchronous
    tensors = {}
    for name, param in params.items():
        host = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=pin)
        host.copy_(param.detach())
        tensors[name] = host
    return Snapshot(tensors, where)


@torch.no_grad()
def restore_(model: nn.Module, snapshot: Snapshot) -> None:
    """Copy the snapshot back into the model's parameters in place (no reallocation, shards where they
    live); from the host, every copy is queued asynchronously and the devices are synchronized once.

    Raises:
        KeyError: the snapshot's names are not the model's parameters.
    """
    params = dict(model.named_parameters())
    if params.keys() != snapshot.tensors.keys():
        missing = sorted(params.keys() - snapshot.tensors.keys())
        extra = sorted(snapshot.tensors.keys() - params.keys())
        raise KeyError(f"snapshot does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    by_device: dict[torch.device, list[str]] = {}
    for name, param in params.items():
        by_device.setdefault(param.device, []).append(name)
    for device, names in by_device.items():
        dst = [params[n].data for n in names]
        src = [snapshot.tensors[n] for n in names]
        if snapshot.where == "gpu" or device.type == "cpu":
            torch._foreach_copy_(dst, src)  # same device: a few fused launches, not one per parameter
        else:
            for d, s in zip(dst, src, strict=True):
                d.copy_(s, non_blocking=True)  # pinned host -> device, queued on the current stream
    if snapshot.where == "cpu" and torch.cuda.is_available():
        for device in by_device:
            if device.type == "cuda":
                torch.cuda.synchronize(device)


def place_snapshot(model: nn.Module, setting: str, load: JobLoad, n_gpus: int) -> Snapshot:
    """The snapshot where `setting` ("auto" | "gpu" | "cpu") says; "auto" asks the memory plan against
    what the GPUs had free for this model (free memory now plus the model's share of the weights)."""
    shape = shape_of(model)
    on_cuda = any(p.device.type == "cuda" for p in model.parameters())
    free = gpu_capacity(free=True)[:n_gpus] if on_cuda else ()
    capacity = [f + shape.param_bytes // n_gpus for f in free]
    return take_snapshot(model, choose_snapshot(setting, shape, load, n_gpus, capacity))
