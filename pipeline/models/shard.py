"""A model spread over the GPUs of one worker (`ray.gpus_per_worker=N`): accelerate's device map.

Whole decoder blocks go to devices in order (pipeline placement: `infer_auto_device_map` with the
model's `_no_split_modules`), and `dispatch_model` adds hooks that move activations between them.
Chosen over transformers' tensor-parallel plans because it works for every architecture the project
loads (tensor parallelism exists for a few, needs torch.distributed processes, and splits each weight
across GPUs, which blockwise quantization of the whole matrix would have to undo); the cost is that
only one GPU computes at a time, which evaluation of one model at a time accepts. Every weight stays
whole on one device, so quantizers and restores run where the weight lives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

SHARD_FRACTION = 0.9  # of each GPU's free memory the weights may take; the rest is the plan's job load


def plan_device_map(model: nn.Module, budgets: Sequence[int]) -> dict[str, int]:
    """Module name -> device index (0..len(budgets)-1), whole blocks in order, within `budgets` bytes.

    Raises:
        ValueError: the weights do not fit in the budgets.
    """
    from accelerate import infer_auto_device_map

    max_memory: dict[int | str, int] = {i: int(b) for i, b in enumerate(budgets)}
    max_memory["cpu"] = 0
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    off = sorted({str(d) for d in device_map.values() if not isinstance(d, int)})
    if off:
        gib = [f"{b / 2**30:.2f}" for b in budgets]
        raise ValueError(
            f"the weights do not fit on {len(budgets)} device(s) of {gib} GiB each (would go to {off}); "
            "raise ray.gpus_per_worker"
        )
    return {name: int(d) for name, d in device_map.items()}


def shard_model_(
    model: nn.Module, device_map: Mapping[str, int], devices: Sequence[torch.device]
) -> nn.Module:
    """Move each mapped module to `devices[index]` and hook the model so activations follow (in place)."""
    from accelerate import dispatch_model

    # torch.device objects, never the strings "cpu"/"disk", which accelerate reads as offloading
    placed: dict[str, Any] = {name: torch.device(devices[i]) for name, i in device_map.items()}
    return dispatch_model(model, placed, main_device=torch.device(devices[0]), force_hooks=True)


def load_kwargs(budgets: Sequence[int]) -> dict[str, Any]:
    """`from_pretrained` keywords that read safetensors shards straight onto GPUs 0..N-1 (N = len)."""
    return {"device_map": "auto", "max_memory": {i: int(b) for i, b in enumerate(budgets)}}


def parameter_devices(model: nn.Module) -> list[torch.device]:
    """The distinct devices the model's parameters live on, in first-seen order."""
    return list(dict.fromkeys(p.device for p in model.parameters()))


def shard_budgets(n_gpus: int, snapshot: str) -> list[int]:
    """Bytes per GPU the weights may take when sharded over `n_gpus` > 1 GPUs ([]: not sharded): a
    share of each GPU's free memory, halved when the snapshot must sit beside the weights."""
    if n_gpus <= 1:
        return []
    from pipeline.memplan import gpu_capacity

    copies = 2 if snapshot == "gpu" else 1
    return [int(SHARD_FRACTION * free / copies) for free in gpu_capacity(free=True)[:n_gpus]]
