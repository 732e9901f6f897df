"""The memory plan of a worker: what one resident model and one job need on each GPU, before anything runs.

A plan is plain arithmetic over a `ModelShape` (counted exactly from a meta-device model: no weights
read, no memory used) and the job's settings. Its items, in bytes:
- weights: every parameter at the model's torch dtype, split evenly over the worker's GPUs;
- snapshot: the pristine copy restored before each job, the same size, on the GPUs (`gpu`) or in
  pinned host memory (`cpu`);
- activations: one decoder block's live tensors for the evaluation batch (inference keeps no others):
  per token 6·d_model (residual, normed input, q/k/v, attention output) + 3·d_ff (gate, up, product)
  at the torch dtype; attention itself is assumed flash/memory-efficient SDPA (no seq² scores);
- logits: batch × seq × vocab in the torch dtype plus a float32 copy and its float32 log-softmax;
- method state: RTN's stacked group and its output (`GROUP_BYTES`) or the largest matrix, and two float32
  temporaries of the largest matrix (measured: `benchmarks/quantize_peak.py`);
  GPTQ/BCQ one decoder block's Hessians (in² × 4 per matrix, the bound `gptq.hessian_bytes` uses; the
  shared set of all blocks lives on the GPU only where it fits, else on the host); recovery adapters'
  float32 parameters, gradients and AdamW moments plus every block's activations for backprop;
- runtime: `RUNTIME_BYTES` per GPU for the CUDA context, cuBLAS workspaces and allocator slack.
Each GPU's capacity comes from `torch.cuda` (free memory in a worker, total memory in the driver,
which must not create a CUDA context); with no GPU visible the plan is printed but not enforced.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

GIB = 2**30
RUNTIME_BYTES = 1 * GIB  # CUDA context, cuBLAS/cuDNN workspaces, caching-allocator slack, per GPU
GROUP_BYTES = 256 << 20  # rtn.GROUP_BYTES: matrices stacked into one quantization call at most
USABLE_FRACTION = 0.95  # of a GPU's memory a plan may fill (fragmentation)
SNAPSHOTS = ("auto", "gpu", "cpu")
HESSIAN_METHODS = ("gptq", "shiftadd", "bcq")


@dataclass(frozen=True)
class ModelShape:
    """What a memory plan needs to know about a model (all counts exact, from its modules)."""

    n_params: int
    param_bytes: int  # every parameter at its dtype
    element_bytes: int  # bytes per value of the torch dtype (2: bf16/fp16, 4: fp32)
    d_model: int
    d_ff: int  # widest linear output inside a decoder block
    vocab_size: int
    n_layers: int
    max_matrix_params: int  # the largest quantizable matrix
    block_hessian_bytes: int  # one decoder block's Hessians: sum of in² × 4 over its linear weights
    hessian_bytes: int  # every quantizable matrix's Hessians (the shared set)


@dataclass(frozen=True)
class JobLoad:
    """The per-job settings a plan depends on."""

    batch_size: int  # sequences per evaluation forward
    seq_len: int  # tokens per sequence
    method: str = "rtn"
    recover_rank: int = 0  # 0: no recovery adapters
    recover_batch_tokens: int = 0  # recovery batch_size × seq_len


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per item and where each lives; `gpu_need` is per GPU of the worker."""

    items: tuple[tuple[str, int, str], ...]  # (name, bytes, "gpu" | "host" | "gpu/N" for sharded)
    n_gpus: int
    snapshot: str  # "gpu" | "cpu"
    gpu_need: int  # bytes on the most loaded GPU
    host_need: int  # pinned host bytes
    gpu_capacity: tuple[int, ...] = ()  # bytes per GPU; empty: unknown (not enforced)

    @property
    def fits(self) -> bool:
        return not self.gpu_capacity or self.gpu_need <= USABLE_FRACTION * min(self.gpu_capacity)

    def table(self, title: str = "") -> str:
        """A small text table: one line per item in GiB, then the need against the capacity."""
        head = f"memory plan{' of ' + title if title else ''}"
        lines = [f"{head} ({self.n_gpus} GPU(s), snapshot={self.snapshot})"]
        lines += [f"  {name:<14} {n / GIB:9.2f} GiB  {where}" for name, n, where in self.items]
        cap = f"{min(self.gpu_capacity) / GIB:.2f} GiB" if self.gpu_capacity else "unknown (no GPU visible)"
        verdict = "" if not self.gpu_capacity else ("  fits" if self.fits else "  DOES NOT FIT")
        lines.append(f"  {'per GPU':<14} {self.gpu_need / GIB:9.2f} GiB  of {cap}{verdict}")
        return "\n".join(lines)


def shape_of(model: nn.Module) -> ModelShape:
    """The `ModelShape` of a model (a meta-device one costs nothing: only shapes are read)."""
    from torch import Tensor

    from pipeline.models.weights import decoder_layers, linear_weights

    params = list({id(p): p for p in model.parameters()}.values())
    weights = linear_weights(model)  # type: ignore[arg-type]
    blocks = decoder_layers(model)
    first = blocks[0] if blocks else model
    candidates = (getattr(m, "weight", None) for m in first.modules())
    block_linears = [w for w in candidates if isinstance(w, Tensor) and w.dim() == 2]  # norms are 1-D
    config = getattr(model, "config", None)
    d_model = int(getattr(config, "hidden_size", 0) or block_linears[0].shape[1])
    return ModelShape(
        n_params=sum(p.numel() for p in params),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        element_bytes=params[0].element_size(),
        d_model=d_model,
        d_ff=max((int(w.shape[0]) for w in block_linears), default=d_model),
        vocab_size=int(getattr(config, "vocab_size", 0)),
        n_layers=len(blocks),
        max_matrix_params=max((w.numel() for w in weights.values()), default=0),
        block_hessian_bytes=sum(4 * int(w.shape[1]) ** 2 for w in block_linears),
        hessian_bytes=sum(4 * int(view.shape[1]) ** 2 for view in weights.values()),
    )


def meta_shape(config: Any, torch_dtype: Any = None) -> ModelShape:
    """The shape of a transformers config's causal LM, built on the meta device (no memory used)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype or torch.bfloat16)
    return shape_of(model)


def activation_bytes(shape: ModelShape, tokens: int) -> int:
    """One decoder block's live inference tensors for `tokens` tokens (see the module docstring)."""
    return tokens * (6 * shape.d_model + 3 * shape.d_ff) * shape.element_bytes


def logits_bytes(shape: ModelShape, tokens: int) -> int:
    """Logits in the torch dtype, their float32 copy and its float32 log-softmax."""
    return tokens * shape.vocab_size * (shape.element_bytes + 4 + 4)


def method_bytes(shape: ModelShape, load: JobLoad) -> int:
    """The quantization method's working memory on the GPU (see the module docstring)."""
    matrix = shape.max_matrix_params * shape.element_bytes
    # stack + output + two float32 temporaries: measured on one H200 (benchmarks/quantize_peak.py), RTN
    # peaks at 1.36 GiB above a 30B-shape model whose largest matrix has 119M values; this gives 1.39 GiB
    working = 2 * max(GROUP_BYTES, matrix) + 8 * shape.max_matrix_params
    if load.method in HESSIAN_METHODS:
        return working + shape.block_hessian_bytes
    return working


def recovery_bytes(shape: ModelShape, load: JobLoad) -> int:
    """Adapters (fp32 parameter, gradient, two AdamW moments) and backprop activations of every block."""
    if load.recover_rank <= 0:
        return 0
    per_block = 7 * load.recover_rank * (shape.d_model + shape.d_ff)  # ~7 adapted matrices of a block
    adapters = 16 * per_block * shape.n_layers
    saved = shape.n_layers * activation_bytes(shape, load.recover_batch_tokens)
    return adapters + saved + logits_bytes(shape, load.recover_batch_tokens)


def plan_memory(
    shape: ModelShape,
    load: JobLoad,
    *,
    snapshot: str = "auto",
    n_gpus: int = 1,
    gpu_capacity: Sequence[int] = (),
) -> MemoryPlan:
    """The plan of one worker of `n_gpus` GPUs; `snapshot="auto"` is "gpu" where that fits, else "cpu".

    Raises:
        ValueError: an unknown snapshot setting or a GPU count below 1.
    """
    check_snapshot(snapshot)
    if n_gpus < 1:
        raise ValueError(f"ray.gpus_per_worker={n_gpus}: must be >= 1")
    if snapshot == "auto":
        on_gpu = _plan(shape, load, "gpu", n_gpus, gpu_capacity)
        return on_gpu if on_gpu.fits else _plan(shape, load, "cpu", n_gpus, gpu_capacity)
    return _plan(shape, load, snapshot, n_gpus, gpu_capacity)


def _plan(
    shape: ModelShape, load: JobLoad, snapshot: str, n_gpus: int, capacity: Sequence[int]
) -> MemoryPlan:
    tokens = load.batch_size * load.seq_len
    shard = f"gpu/{n_gpus}" if n_gpus > 1 else "gpu"
    items = [
        ("weights", shape.param_bytes, shard),
        ("snapshot", shape.param_bytes, shard if snapshot == "gpu" else "host (pinned)"),
        ("activations", activation_bytes(shape, tokens), "gpu"),
        ("logits", logits_bytes(shape, tokens), "gpu"),
        (f"method {load.method}", method_bytes(shape, load), "gpu"),
    ]
    if load.recover_rank:
        items.append(("recovery", recovery_bytes(shape, load), "gpu"))
    if load.method in HESSIAN_METHODS:
        items.append(("hessians (all)", shape.hessian_bytes, "gpu if it fits, else host"))
    items.append(("runtime", RUNTIME_BYTES, "gpu"))
    split = {"weights", "snapshot"}  # spread over the worker's GPUs; the rest sits whole on each
    sharded = sum(n for name, n, where in items if name in split and where == shard)
    whole = sum(n for name, n, where in items if name not in split and where == "gpu")
    host = sum(n for _, n, where in items if where.startswith("host"))
    need = math.ceil(sharded / n_gpus) + whole
    return MemoryPlan(tuple(items), n_gpus, snapshot, need, host, tuple(capacity))


def check_snapshot(snapshot: str) -> None:
    """Raise ValueError naming the allowed settings unless `snapshot` is one."""
    if snapshot not in SNAPSHOTS:
        raise ValueError(f"model.snapshot={snapshot!r} is not allowed; allowed: {list(SNAPSHOTS)}")


def fit_problem(plan: MemoryPlan, shape: ModelShape, load: JobLoad, title: str) -> str | None:
    """Why `plan` cannot run, naming what to change (None: it fits, or capacity is unknown)."""
    if plan.fits:
        return None
    usable = USABLE_FRACTION * min(plan.gpu_capacity)
    fixes = []
    if plan.snapshot == "gpu":
        fixes.append("model.snapshot=cpu (the pristine copy in pinned host memory)")
    if not _plan(shape, load, "cpu", plan.n_gpus, plan.gpu_capacity).fits:
        batch = _largest_batch(shape, load, plan)
        if batch >= 1:
            fixes.append(f"eval.batch_size={batch} (now {load.batch_size}) with the snapshot on the host")
    more = _gpus_needed(shape, load, plan)
    if more is not None:
        fixes.append(f"ray.gpus_per_worker={more} (now {plan.n_gpus})")
    return (
        f"{title}: needs {plan.gpu_need / GIB:.1f} GiB per GPU but {usable / GIB:.1f} GiB are usable "
        f"({plan.n_gpus} GPU(s), snapshot={plan.snapshot}); "
        f"change one of: {'; '.join(fixes) or 'a larger GPU'}"
    )


def _largest_batch(shape: ModelShape, load: JobLoad, plan: MemoryPlan) -> int:
    """The largest eval batch that fits with the snapshot on the host (0: none does)."""
    low, high = 0, load.batch_size - 1  # the need grows with the batch: bisect for the last that fits
    while low < high:
        mid = (low + high + 1) // 2
        smaller = dataclasses.replace(load, batch_size=mid)
        if _plan(shape, smaller, "cpu", plan.n_gpus, plan.gpu_capacity).fits:
            low = mid
        else:
            high = mid - 1
    return low


def _gpus_needed(shape: ModelShape, load: JobLoad, plan: MemoryPlan, most: int = 64) -> int | None:
    """The fewest GPUs per worker (above the plan's) on which the job fits with the snapshot on the host."""
    for n in range(plan.n_gpus + 1, most + 1):
        if _plan(shape, load, "cpu", n, plan.gpu_capacity[:1] * n).fits:
            return n
    return None


def gpu_capacity(free: bool = False) -> tuple[int, ...]:
    """Bytes per visible GPU: free memory (`free=True`, creates a CUDA context: workers only) or total
    memory (the driver: from NVML where it can map the visible GPUs, which initialises no CUDA, seconds
    on a large GPU; else from torch); () without CUDA."""
    if not free and (totals := nvml_total_memory()) is not None:
        return totals
    import torch

    if not torch.cuda.is_available():
        return ()
    count = torch.cuda.device_count()
    if free:
        return tuple(torch.cuda.mem_get_info(i)[0] for i in range(count))
    return tuple(torch.cuda.get_device_properties(i).total_memory for i in range(count))


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def nvml_total_memory() -> tuple[int, ...] | None:
    """Total bytes of each GPU CUDA_VISIBLE_DEVICES shows, from NVML (libnvidia-ml, the driver's own
    library); None where NVML is missing or fails, or the visible set is not a list of indices (UUIDs,
    MIG), so the caller asks CUDA instead."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    parts = None if visible is None else [part.strip() for part in visible.split(",") if part.strip()]
    if parts is not None and not all(part.isdigit() for part in parts):
        return None
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if lib.nvmlInit_v2() != 0:
        return None
    try:
        count = ctypes.c_uint()
        if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        totals = []
        for index in range(count.value):
            handle, memory = ctypes.c_void_p(), _NvmlMemory()
            if lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                return None
            if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
                return None
            totals.append(int(memory.total))
    finally:
        lib.nvmlShutdown()
    if parts is None:
        return tuple(totals)
    picked = [int(part) for part in parts]
    if any(i >= len(totals) for i in picked):
        return None
    # NVML counts in PCI bus order, CUDA fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID: the same
    # totals on a box of one GPU model (then the order does not matter), else ask CUDA.
    if len(set(totals)) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        return None
    return tuple(totals[i] for i in picked)


def job_load(job: Any) -> JobLoad:
    """The `JobLoad` of a `pipeline.jobs.Job`: its eval batch of the longest perplexity window (at least
    `TASK_SEQ_LEN` tokens when it has lm-eval tasks), its method, and its recovery adapters."""
    evals = job.evals
    seq_len = max([p.context_length for p in evals.perplexity] + ([TASK_SEQ_LEN] if evals.tasks else [1]))
    recover = job.recover
    rank = recover.rank if recover.enabled else 0
    tokens = recover.batch_size * recover.seq_len if recover.enabled else 0
    return JobLoad(evals.batch_size, seq_len, job.recipe.method, rank, tokens)


TASK_SEQ_LEN = 512  # tokens assumed per lm-eval request (context + continuation) in a batch


def choose_snapshot(
    setting: str, shape: ModelShape, load: JobLoad, n_gpus: int, capacity: Sequence[int]
) -> str:
    """ "gpu" or "cpu": the setting, or for "auto" the GPU where the plan fits beside the model (always
    the GPU when capacity is unknown, e.g. a CPU worker, where both copies are host memory anyway)."""
    check_snapshot(setting)
    if setting != "auto":
        return setting
    return plan_memory(shape, load, snapshot="auto", n_gpus=n_gpus, gpu_capacity=capacity).snapshot


@functools.lru_cache(maxsize=64)
def model_shape(name_or_path: str, torch_dtype: str, on_cuda: bool) -> ModelShape | None:
    """The shape of a local model folder or a hub id in the hub cache, from its config alone (None: no
    config here, e.g. a ladder not trained yet, or an unreadable one). Cached on disk by the config's
    bytes (`fingerprint.config_fact_entry`), so a rerun's pre-flight imports no modeling code."""
    from pipeline.hub import HUB_ID, cached_snapshot

    folder = Path(name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        hub_id = HUB_ID.match(name_or_path) and not folder.exists()
        cached = cached_snapshot(name_or_path) if hub_id else None
        if cached is None or not (cached / "config.json").is_file():
            return None
        folder = cached
    from pipeline.fingerprint import config_fact_entry

    entry = config_fact_entry(
        folder / "config.json", SHAPE_CACHE, torch_dtype, str(on_cuda), str(SHAPE_CACHE_VERSION)
    )
    if entry is not None and (shape := _load_shape(entry)) is not None:
        return shape
    from transformers import AutoConfig

    from pipeline.models.loading import resolve_torch_dtype

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        shape = meta_shape(config, resolve_torch_dtype(torch_dtype, "cuda" if on_cuda else "cpu"))
    except (OSError, ValueError, KeyError):
        return None  # pre-flight's model check names the problem
    if entry is not None:
        from pipeline.fingerprint import store_text

        store_text(entry, json.dumps(dataclasses.asdict(shape)))
    return shape


SHAPE_CACHE = "shapes"  # under `fingerprint.cache_base()`
SHAPE_CACHE_VERSION = 1  # bump when `shape_of` counts differently


def _load_shape(entry: Path) -> ModelShape | None:
    """A cached shape, or None (absent, or unreadable: then it is computed again)."""
    try:
        return ModelShape(**json.loads(entry.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def describe_jobs(jobs: Sequence[Any], n_gpus: int, capacity: Sequence[int]) -> list[str]:
    """The memory plan of each distinct (model, job load) of `jobs`, as table lines (dry runs)."""
    lines: list[str] = []
    seen: set[Any] = set()
    for job in jobs:
        load = job_load(job)
        if (job.model, load) in seen:
            continue
        seen.add((job.model, load))
        shape = model_shape(job.model.name_or_path, job.model.torch_dtype, bool(capacity))
        if shape is None:
            continue
        plan = plan_memory(shape, load, snapshot=job.model.snapshot, n_gpus=n_gpus, gpu_capacity=capacity)
        label = job.model_label or job.model.name_or_path
        lines.append(plan.table(f"{label} (batch {load.batch_size}x{load.seq_len}, {load.method})"))
    return lines
