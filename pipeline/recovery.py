"""Recovery fine-tuning: 16-bit adapters trained on a quantized model whose weights stay frozen.

After quantization (fake-quantized weights in place), `attach_adapters_` injects peft adapters into
every linear layer of the resident model (peft's `all-linear`: the output head excluded), in place,
so the `Evaluator` built on that model object scores the adapted model; `train_adapters_` runs
`steps` AdamW steps of next-token loss on windows drawn from `data` (the same sources as
calibration text: `corpus:train`, a text file, `file.jsonl:field`, `file.parquet:column`; never an
evaluation text, refused in pre-flight); `detach_adapters_` unloads them, so the model is the
quantized one again and the worker's restore makes it pristine for the next job.

Methods: `lora` (peft's LoRA: A [rank, in] and B [out, rank] per layer) and `vblora` (peft's
VB-LoRA: one bank of `num_vectors` vectors of `vector_length` shared by every layer, and per layer
the logits that pick `topk` of them for each sub-vector of A and B). The adapters are stored in 16
bits: `adapter_bits` is 16 x the adapter parameters as peft stores them (VB-LoRA: the bank once,
plus every layer's logits), added to the model's bits (`with_adapter_bits`). `shears` (Shears, seed
000; `pipeline.shears`) trains an elastic LoRA super-adapter at the largest of `ranks` and keeps the
per-layer ranks a search picks within the parameters of a LoRA at `rank`, on windows held out of
training. `sparsity` (SQFT) prunes the base before quantization (`pipeline.sparsity`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.calibration import CalibrationSpec, calibration_tokens, check_calibration, tokens_hash
from pipeline.specs import QuantReport

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

NONE = "none"
RECOVER_METHODS = (NONE, "lora", "vblora", "shears")
ADAPTER_BITS_PER_PARAM = 16  # adapters are stored in 16 bits (bf16/fp16)
ADAPTER_NAME = "recover"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RecoverSpec:
    """Which adapters to train after quantization, on what, and for how long.

    Attributes:
        method: "none", "lora", "vblora" or "shears".
        rank: adapter rank r (>= 1); shears: the average-rank budget (the parameters of a LoRA at r).
        steps: optimizer steps (0: adapters attached untrained; LoRA's B starts at zero).
        lr: AdamW learning rate (> 0).
        data: training text, a calibration source form; never an evaluation text.
        seq_len: tokens per training window.
        batch_size: windows per step.
        seed: seeds the adapters' initialization and the windows.
        num_vectors, vector_length, topk: VB-LoRA's bank (vectors x length) and picks per sub-vector.
        ranks: shears: the elastic ranks, increasing (the super-adapter has the largest).
        sparsity: fraction of each quantized matrix's weights pruned before quantization, in [0, 1).
    """

    method: str = NONE
    rank: int = 8
    steps: int = 100
    lr: float = 1e-3
    data: str = "corpus:train"
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    num_vectors: int = 256
    vector_length: int = 64
    topk: int = 2
    ranks: tuple[int, ...] = ()
    sparsity: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in RECOVER_METHODS:
            raise ValueError(f"recover.method={self.method!r} unknown; allowed: {', '.join(RECOVER_METHODS)}")
        least = {"rank": 1, "steps": 0, "seq_len": 2, "batch_size": 1, "seed": 0}
        least |= {"num_vectors": 1, "vector_length": 1, "topk": 1}
        for name, low in least.items():
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"recover.{name} must be an int >= {low}, got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not self.lr > 0:
            raise ValueError(f"recover.lr must be a number > 0, got {self.lr!r}")
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"recover.data must name a text source, got {self.data!r}")
        if self.topk > self.num_vectors:
            raise ValueError(f"recover.topk={self.topk} exceeds recover.num_vectors={self.num_vectors}")
        object.__setattr__(self, "ranks", tuple(self.ranks))
        self._check_ranks()
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, int | float):
            raise ValueError(f"recover.sparsity must be a number in [0, 1), got {self.sparsity!r}")
        if not 0 <= self.sparsity < 1:
            raise ValueError(f"recover.sparsity={self.sparsity!r} is outside [0, 1) (0: dense base)")
        if self.sparsity and not self.enabled:
            raise ValueError(
                f"recover.sparsity={self.sparsity!r} needs adapters: recover.method one of "
                f"{', '.join(RECOVER_METHODS[1:])}, got {self.method!r}"
            )

    def _check_ranks(self) -> None:
        if any(not _is_int(r) or r < 1 for r in self.ranks):
            raise ValueError(f"recover.ranks={list(self.ranks)!r} must be ints >= 1")
        if list(self.ranks) != sorted(set(self.ranks)):
            raise ValueError(f"recover.ranks={list(self.ranks)!r} must be increasing, without duplicates")
        if self.method != "shears":
            return
        if not self.ranks:
            raise ValueError("recover.method='shears' needs recover.ranks, e.g. [4, 8, 16]; got []")
        if self.rank < self.ranks[0]:
            raise ValueError(
                f"recover.rank={self.rank} (shears: the average-rank budget) is below the smallest of "
                f"recover.ranks={list(self.ranks)}; allowed: >= {self.ranks[0]}"
            )

    @property
    def enabled(self) -> bool:
        return self.method != NONE

    def plain(self) -> dict[str, Any]:
        """JSON-able fields, the VB-LoRA bank only where the method has one."""
        fields = dataclasses.asdict(self)
        if self.method != "vblora":
            for name in ("num_vectors", "vector_length", "topk"):
                fields.pop(name)
        if self.method == "shears":
            fields["ranks"] = list(self.ranks)
        else:
            fields.pop("ranks")
        if not self.sparsity:  # a dense base keeps the key it had before sparsity existed
            fields.pop("sparsity")
        return fields

    def windows(self) -> CalibrationSpec:
        """The training windows as a calibration spec: one window per (step, batch row); shears adds
        `batch_size` more at the end, held out of training, for its search."""
        search = self.batch_size if self.method == "shears" else 0
        return CalibrationSpec(
            self.data, max(1, self.steps * self.batch_size) + search, self.seq_len, self.seed
        )


NO_RECOVERY = RecoverSpec()


@dataclass(frozen=True)
class RecoveryReport:
    """What a recovery did: adapter size and the training loss at the first and last step; shears
    also the chosen per-layer ranks (module order), how they were chosen and their validation loss."""

    adapter_params: int
    adapter_bits: int
    tokens_sha256: str | None
    first_loss: float | None
    last_loss: float | None
    chosen_ranks: tuple[int, ...] | None = None
    search: str | None = None
    search_loss: float | None = None

    def recover_json(self, spec: RecoverSpec) -> str:
        """The `recover_params` column: the settings, the windows' hash and the losses (and the
        search's result, where there was one)."""
        fields = {**spec.plain(), **{k: v for k, v in dataclasses.asdict(self).items() if v is not None}}
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def check_recover(
    spec: RecoverSpec, data_root: Path, eval_paths: Sequence[str], max_positions: int | None
) -> list[str]:
    """Pre-flight problems of a recovery: its data source (form, file, overlap with an evaluation
    text, via `check_calibration`) and windows longer than the model's positions."""
    if not spec.enabled:
        return []
    problems = [
        f"recover.data: {p}".replace("quant.calibration.source", "recover.data")
        for p in check_calibration(spec.windows(), data_root, eval_paths, needed=True)
    ]
    if max_positions is not None and spec.seq_len > max_positions:
        problems.append(
            f"recover.seq_len={spec.seq_len} is longer than the model's {max_positions} positions"
        )
    return problems


def with_adapter_bits(report: QuantReport, adapter_bits: int) -> QuantReport:
    """`report` with the adapters' bits added to `total_model_bits` and to `bits_per_param` (over the
    quantized matrices, which the adapters correct)."""
    n_matrix = report.n_quantized_params + report.n_kept_params
    return dataclasses.replace(
        report,
        total_model_bits=report.total_model_bits + adapter_bits,
        bits_per_param=report.bits_per_param + adapter_bits / n_matrix,
    )


def _peft_config(spec: RecoverSpec) -> Any:
    from peft import LoraConfig, VBLoRAConfig

    if spec.method in ("lora", "shears"):  # shears: the super-adapter, scale 1 at every rank
        rank = spec.ranks[-1] if spec.method == "shears" else spec.rank
        return LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", lora_dropout=0.0)
    return VBLoRAConfig(
        r=spec.rank,
        num_vectors=spec.num_vectors,
        vector_length=spec.vector_length,
        topk=spec.topk,
        target_modules="all-linear",
        vblora_dropout=0.0,
    )


def attach_adapters_(model: Any, spec: RecoverSpec) -> Any:
    """Inject `spec`'s adapters into `model` in place (base weights frozen); returns the peft tuner
    that `detach_adapters_` takes. Adapter weights are seeded by `spec.seed`."""
    import torch
    from peft import LoraModel, VBLoRAModel

    assert spec.enabled, "no adapters for recover.method=none"
    tuner_type = VBLoRAModel if spec.method == "vblora" else LoraModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        tuner = tuner_type(model, _peft_config(spec), ADAPTER_NAME)
    device = next(model.parameters()).device
    for param in adapter_parameters(model):
        param.data = param.data.to(device)
    return tuner


def adapter_parameters(model: Any) -> list[Any]:
    """The trainable parameters of an adapted model (a shared VB-LoRA bank once)."""
    return [param for param in model.parameters() if param.requires_grad]


def adapter_param_count(model: Any) -> int:
    """Parameters the adapters store: every trainable parameter, a shared tensor once (peft marks the
    adapters trainable and the base frozen; VB-LoRA's bank is one Parameter shared by every layer, and
    peft saves it once beside every layer's logits)."""
    return sum(param.numel() for param in adapter_parameters(model))


def detach_adapters_(model: Any, tuner: Any) -> None:
    """Remove the adapters (no merge): `model` holds exactly its weights from before `attach_adapters_`."""
    tuner.unload()
    if hasattr(model, "peft_config"):
        del model.peft_config
    model.requires_grad_(False)


def train_adapters_(
    model: Any, tokens: torch.Tensor, spec: RecoverSpec, before_step: Callable[[int], None] | None = None
) -> tuple[float | None, float | None]:
    """`spec.steps` AdamW steps of next-token loss on `tokens` ([steps * batch_size, seq_len]) in
    order, `before_step(step)` called first in each (shears samples its ranks there); returns the
    loss of the first and the last step (None, None for zero steps)."""
    import torch

    params = adapter_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    device = next(model.parameters()).device
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for step in range(spec.steps):
                if before_step is not None:
                    before_step(step)
                batch = tokens[step * spec.batch_size : (step + 1) * spec.batch_size].to(device)
                loss = model(input_ids=batch, labels=batch).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    if not losses:
        return None, None
    return losses[0], losses[-1]


def train_recovery_(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    spec: RecoverSpec,
    data_root: Path,
    max_positions: int | None,
) -> RecoveryReport:
    """Train the adapters `attach_adapters_` put on the quantized `model`, and count them.

    The caller removes them with `detach_adapters_(model, tuner)` when the job is done, also when this
    raises.
    """
    needs_tokens = spec.steps or spec.method == "shears"
    tokens = calibration_tokens(spec.windows(), tokenizer, data_root, max_positions) if needs_tokens else None
    if spec.method == "shears":
        assert tokens is not None
        return _train_shears_(model, tokens, spec)
    first, last = (None, None) if tokens is None else train_adapters_(model, tokens, spec)
    n_params = adapter_param_count(model)
    digest = None if tokens is None else tokens_hash(tokens)
    return RecoveryReport(n_params, ADAPTER_BITS_PER_PARAM * n_params, digest, first, last)


def _train_shears_(model: Any, tokens: torch.Tensor, spec: RecoverSpec) -> RecoveryReport:
    """Train the super-adapter with sampled ranks, search the ranks on the held-out windows (the
    last `batch_size`), and cut the adapter down to them."""
    from pipeline import shears

    layers = shears.elastic_layers(model)
    shears.install_masks_(layers)
    held_out = tokens[-spec.batch_size :]
    first, last = train_adapters_(model, tokens, spec, shears.sampler(layers, spec.ranks, spec.seed))
    budget = shears.rank_budget(layers, spec.rank)
    found = shears.search_ranks(layers, spec.ranks, budget, lambda: shears.validation_loss(model, held_out))
    shears.truncate_(layers, found.ranks)
    n_params = adapter_param_count(model)
    assert n_params == shears.adapter_params(layers, found.ranks) <= budget
    return RecoveryReport(
        n_params,
        ADAPTER_BITS_PER_PARAM * n_params,
        tokens_hash(tokens),
        first,
        last,
        found.ranks,
        found.search,
        found.loss,
    )
