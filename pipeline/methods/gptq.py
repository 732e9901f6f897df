"""`gptq`: one-shot quantization (Frantar et al., 2022) with any data type and block size of the zoo.

The solve is `kernels.gptq.gptq_quantize`; this module gathers its inputs from a resident model:
calibration windows (`pipeline.calibration`), per-layer Hessians, the original weights with proxy
columns removed, and the codebook. Two Hessian modes (`quant.params.hessians`):

- `shared` (default): every layer's H from the 16-bit model, collected once per model and calibration
  set and kept in the worker's per-model cache, so each further configuration pays only the solves.
- `sequential`: GPTQ's own order: decoder block by block, each block's H from inputs produced by the
  already-quantized blocks before it (the calibration pass is repeated for every configuration).

Proxy quantization: the kept 16-bit columns are taken out of the problem (W and H restricted to the
quantized columns), exactly the matrix RTN quantizes; the kept columns keep their original values.
Quantile codebooks are estimated from that matrix's original weights, the codebook RTN would use.
Same-shaped matrices (across layers) are solved together in batches of at most `SOLVE_BYTES` of H.

The solve of a batch is a parameter (`BatchSolver`: stacked weights and Hessians in, quantized weights
out): `quantize_with_hessians_` runs any such solver with either Hessian mode, so `shiftadd`
(`pipeline/methods/bcq.py`) reuses this module with ShiftAddLLM's binary codes in GPTQ's column loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.methods.hessians import Hessians, block_inputs, collect_hessians, finish_hessians, hessian_hooks
from pipeline.methods.registry import Method, QuantizationError, QuantizeRequest, register_method

log = logging.getLogger(__name__)

HESSIAN_MODES = ("shared", "sequential")
HESSIAN_DEVICES = ("auto", "cuda", "cpu")
SOLVE_BYTES = 2 << 30  # Hessians solved in one batch at most
BatchSolver = Callable[[Tensor, Tensor], Tensor]  # (w [G, out, in], h [G, in, in]) -> float32 quantized w


@dataclass(frozen=True)
class GPTQParams:
    """`quant.params` of `quant.method=gptq`."""

    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    lazy_block: int = 128  # columns per lazy batch update
    act_order: bool = False  # columns by descending diag(H), static block scales
    hessians: str = "shared"  # "shared" (16-bit model, once per model) or "sequential" (GPTQ's own)
    hessian_device: str = "auto"  # where Hessians live: "auto" (the model's device), "cuda", "cpu"

    def __post_init__(self) -> None:
        from kernels.gptq import GPTQSettings

        GPTQSettings(self.damp, self.lazy_block, self.act_order)  # validates the three
        if self.hessians not in HESSIAN_MODES:
            raise ValueError(
                f"gptq hessians={self.hessians!r} is not allowed; allowed: {list(HESSIAN_MODES)}"
            )
        if self.hessian_device not in HESSIAN_DEVICES:
            raise ValueError(
                f"gptq hessian_device={self.hessian_device!r} is not allowed; "
                f"allowed: {list(HESSIAN_DEVICES)}"
            )


def check_recipe(recipe: Any) -> None:
    """GPTQ needs input activations: embedding tables have none."""
    if recipe.quantize_embeddings:
        raise ValueError(
            "quant.method='gptq' cannot quantize embedding tables (they have no input activations); "
            "set quant.quantize_embeddings=false"
        )


def quantize_(request: QuantizeRequest) -> None:
    """GPTQ-quantize every weight of the request in place."""
    params = GPTQParams(**dict(request.recipe.params))
    solver = gptq_solver(request.recipe, params)
    quantize_with_hessians_(request, params.hessians, params.hessian_device, solver)


def gptq_solver(recipe: Any, params: GPTQParams) -> BatchSolver:
    """GPTQ over the recipe's codebook: shared by the batch, or (quantile) one per matrix from its weights."""
    from kernels import CODEBOOKS
    from kernels.blockwise import levels_for
    from kernels.gptq import Codebooks, GPTQSettings, gptq_quantize

    spec = recipe.spec
    settings = GPTQSettings(params.damp, params.lazy_block, params.act_order)

    def solve(w: Tensor, h: Tensor) -> Tensor:
        if CODEBOOKS[spec.dtype].data_dependent:  # one codebook per matrix, from its original weights
            levels: Any = Codebooks.stack([levels_for(m, spec) for m in w])
        else:
            levels = levels_for(w[0], spec)
        return gptq_quantize(w, h, levels, spec.block_size, spec.centering, settings)

    return solve


def quantize_with_hessians_(
    request: QuantizeRequest, hessians: str, hessian_device: str, solver: BatchSolver
) -> None:
    """Solve every weight of the request with its Hessian (`hessians`: "shared" or "sequential"), in place."""
    if request.calibration is None:
        raise ValueError(
            f"quant.method={request.recipe.method!r} needs calibration tokens (quant.calibration.source)"
        )
    from pipeline.models.compile import eager_layers

    with eager_layers(request.model):
        if hessians == "shared":
            solve_(request.weights, request.keep, _shared_hessians(request, hessian_device), solver)
        else:
            _sequential_(request, solver, _hessian_device(request.model, hessian_device, 0))
    _check_finite(request.weights)


def _shared_hessians(request: QuantizeRequest, hessian_device: str) -> Hessians:
    """The 16-bit model's Hessians, collected at a model's first job and kept in the worker's cache."""
    key = hessian_key(request.recipe, request.weights)
    if key not in request.cache:
        assert request.calibration is not None
        device = _hessian_device(request.model, hessian_device, hessian_bytes(request.weights))
        request.cache.clear()  # one set of Hessians per model at a time: they are large
        request.cache[key] = collect_hessians(request.model, request.weights, request.calibration, device)
    return request.cache[key]


def hessian_key(recipe: Any, weights: dict[str, Tensor]) -> tuple[Any, ...]:
    """What shared Hessians depend on: the calibration, the weights in scope, the device asked for (any
    method with a `hessian_device` parameter: gptq and shiftadd share them)."""
    return ("gptq-hessians", recipe.calibration, tuple(weights), dict(recipe.params)["hessian_device"])


def hessian_bytes(weights: dict[str, Tensor]) -> int:
    """An upper bound on the shared Hessians' float32 bytes: in² × 4 per matrix (layers that share an
    input share one H, so the real figure is lower: q/k/v count three times here)."""
    return sum(4 * view.shape[1] ** 2 for view in weights.values())


def choose_hessian_device(setting: str, model_device: str, need: int, free_gpu: int, free_host: int) -> str:
    """Where the shared Hessians go: the model's GPU if they fit in 80% of its free memory ("auto"),
    else the host; an explicit device that cannot hold them is refused with what to change.

    Raises:
        ValueError: naming the bytes needed and free, and the settings that would fit.
    """
    gib = 2**30
    fits_gpu, fits_host = need <= 0.8 * free_gpu, need <= 0.8 * free_host
    if setting == "auto":
        if model_device != "cpu" and fits_gpu:
            return model_device
        if fits_host:
            return "cpu"
    elif (setting == "cpu" and fits_host) or (setting == "cuda" and fits_gpu):
        return model_device if setting == "cuda" else "cpu"
    raise ValueError(
        f"gptq shared Hessians need up to {need / gib:.1f} GiB; free: {free_gpu / gib:.1f} GiB on the GPU, "
        f"{free_host / gib:.1f} GiB on the host (hessian_device={setting!r}); use "
        "quant.params.hessians=sequential (one block's Hessians at a time) or a device with more memory"
    )


def _hessian_device(model: nn.Module, setting: str, need: int) -> torch.device:
    model_device = next(model.parameters()).device
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("gptq hessian_device='cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    free_gpu = torch.cuda.mem_get_info(model_device)[0] if model_device.type == "cuda" else 0
    free_host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    where = "cuda" if model_device.type == "cuda" else "cpu"
    chosen = choose_hessian_device(setting, where, need, free_gpu, free_host)
    return model_device if chosen == "cuda" else torch.device("cpu")


def solve_bytes(device: torch.device) -> int:
    """Bytes of H solved in one batch: `SOLVE_BYTES`, or a tenth of the GPU's free memory where that is
    more (a batch's solve holds about five copies of its H: H, its damped clone, the factor, the inverse
    and U). Fewer, larger batches matter: the column loop is launch-bound, so its cost is per batch."""
    if device.type != "cuda":
        return SOLVE_BYTES
    return max(SOLVE_BYTES, torch.cuda.mem_get_info(device)[0] // 10)


@torch.no_grad()
def solve_(
    weights: dict[str, Tensor], keep: dict[str, Tensor], hessians: Hessians, solver: BatchSolver
) -> None:
    """Solve every named weight with its H (same shapes batched) and write the results in place."""
    batches: dict[tuple[Any, ...], list[str]] = {}
    for name, view in weights.items():
        n_keep = 0 if keep.get(name) is None else keep[name].numel()
        batches.setdefault((view.shape[0], view.shape[1] - n_keep, view.dtype), []).append(name)
    budget = solve_bytes(next(iter(weights.values())).device)
    for (_, cols, _), names in batches.items():
        per_batch = max(1, budget // (cols * cols * 4))
        for start in range(0, len(names), per_batch):
            _solve_batch_(names[start : start + per_batch], weights, keep, hessians, solver)


def _solve_batch_(
    names: list[str],
    weights: dict[str, Tensor],
    keep: dict[str, Tensor],
    hessians: Hessians,
    solver: BatchSolver,
) -> None:
    device = weights[names[0]].device
    columns = [quantized_columns(weights[n], keep.get(n)) for n in names]
    ws = [
        weights[n][:, cols] if cols is not None else weights[n]
        for n, cols in zip(names, columns, strict=True)
    ]
    hs = [_restrict(hessians.of(n), cols).to(device) for n, cols in zip(names, columns, strict=True)]
    solved = solver(torch.stack(ws), torch.stack(hs))
    for name, cols, q in zip(names, columns, solved, strict=True):
        view = weights[name]
        if cols is None:
            view.copy_(q)
        else:
            view[:, cols] = q.to(view.dtype)


def quantized_columns(view: Tensor, kept: Tensor | None) -> Tensor | None:
    """Indices of the columns a calibrated solve quantizes, proxy columns left out (None: all)."""
    if kept is None or kept.numel() == 0:
        return None
    mask = torch.ones(view.shape[1], dtype=torch.bool, device=view.device)
    mask[kept.to(view.device)] = False
    return torch.nonzero(mask).flatten()


def _restrict(h: Tensor, cols: Tensor | None) -> Tensor:
    if cols is None:
        return h
    cols = cols.to(h.device)
    return h.index_select(0, cols).index_select(1, cols)


def _sequential_(request: QuantizeRequest, solver: BatchSolver, device: torch.device) -> None:
    """Block by block: H from the quantized earlier blocks' outputs, then solve, then move on."""
    from pipeline.methods.hessians import run_block
    from pipeline.models.weights import decoder_layers

    model, weights = request.model, request.weights
    blocks = decoder_layers(model)
    if not blocks:
        raise ValueError(f"hessians='sequential': no decoder blocks found in {type(model).__name__}")
    assert request.calibration is not None
    inputs = block_inputs(model, blocks[0], request.calibration)
    owner = _block_of(model, blocks, weights)
    for index, block in enumerate(blocks):
        names = [n for n in weights if owner.get(n) == index]
        hessians = Hessians()
        with torch.no_grad(), hessian_hooks(model, names, hessians, device, root=block):
            run_block(block, inputs)
        solve_({n: weights[n] for n in names}, request.keep, finish_hessians(hessians), solver)
        inputs = run_block(block, inputs)  # the next block sees this block quantized
    rest = [n for n in weights if n not in owner]  # e.g. the LM head: after every block is quantized
    if rest:
        solve_(
            {n: weights[n] for n in rest},
            request.keep,
            collect_hessians(model, rest, request.calibration, device),
            solver,
        )


def _block_of(model: nn.Module, blocks: list[nn.Module], weights: dict[str, Tensor]) -> dict[str, int]:
    """Weight name -> index of the decoder block holding its module (absent: outside every block)."""
    from pipeline.methods.hessians import module_of

    index = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    found = {n: index.get(id(model.get_submodule(module_of(n)))) for n in weights}
    return {n: i for n, i in found.items() if i is not None}


def _check_finite(weights: dict[str, Tensor]) -> None:
    flags = torch.stack([torch.isfinite(w).all() for w in weights.values()]).tolist() if weights else []
    bad = [n for n, ok in zip(weights, flags, strict=True) if not ok]
    if bad:
        raise QuantizationError(f"non-finite values after the solve: {bad[:5]}")


GPTQ = register_method(
    Method(
        name="gptq",
        quantize_=quantize_,
        description="GPTQ one-shot quantization (Frantar et al. 2022): Hessian-weighted error feedback",
        params=GPTQParams,
        needs_calibration=True,
        extra_check=check_recipe,
    )
)
