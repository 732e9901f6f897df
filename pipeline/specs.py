"""Plain, frozen value types that cross module boundaries inside `pipeline`.

These are the contracts between config parsing (`config.py`, `jobs.py`), the model side
(`models/`, `evals/`) and the orchestration side (`worker.py`, `run.py`). They hold no
torch, ray or transformers objects, so a config check or `--help` never pays for those imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from and how it is loaded.

    `name_or_path` is a Hugging Face hub id or a local directory (after ladder resolution,
    always something `AutoModelForCausalLM.from_pretrained` takes).
    """

    name_or_path: str
    torch_dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU
    revision: str | None = None
    gguf_file: str | None = None
    # "auto" | "gpu" | "cpu": where the pristine copy lives (pipeline.snapshot); not in the job key
    snapshot: str = "auto"


@dataclass(frozen=True)
class PerplexitySpec:
    """One text set scored by strided perplexity."""

    name: str  # e.g. "wikitext2"; becomes the `task` column
    path: str  # absolute, or relative to EvalSpec.data_root; .xz files are read transparently
    context_length: int = 512  # tokens per window
    stride: int = 512  # tokens between window starts; == context_length means disjoint windows
    max_tokens: int | None = None  # a fixed leading slice of the tokenized text; None: all of it
    # KL(16-bit || quantized) on the first kl_tokens scored tokens (metric `kl_to_16bit`); None: off.
    # Costs kl_tokens x vocab x 2 bytes (bf16 logits) on the device, kept while the model is resident
    kl_tokens: int | None = None


@dataclass(frozen=True)
class EvalSpec:
    """What a job measures after quantizing."""

    perplexity: tuple[PerplexitySpec, ...] = ()
    tasks: tuple[str, ...] = ()  # lm-eval task names (the offline ones in pipeline/evals/tasks/ by default)
    limit: int | None = None  # examples per lm-eval task; None: all
    batch_size: int = 32
    data_root: str = "../shared/data"
    # folders of lm-eval task YAMLs (lm-eval's --include_path), indexed after pipeline/evals/tasks; not in
    # the key as paths: a task defined there is keyed by its content (`fingerprint.eval_data_sha256`)
    include_path: tuple[str, ...] = ()
    # "hflm": lm-eval's HFLM + lm-eval's evaluate (the reference); "fast": pipeline.evals.fastscore's scorer +
    # pipeline.evals.fastmetrics (lm-eval's exact metric values; lm-eval's evaluate for tasks it cannot plan);
    # "auto": "fast" unless the architecture cannot pack (`evaluate.resolve_scorer`), keyed as "auto"
    scorer: str = "auto"
    # torch.compile the decoder blocks before scoring (`models.compile_layers`); None (auto): on CUDA,
    # unless lm-eval tasks are scored by HFLM (its batch widths vary: a compile per width).
    # Not in the job key (like data_root): it changes speed, and the numbers only by bf16 rounding.
    compile: bool | None = None


@dataclass(frozen=True)
class MetricValue:
    """One measured number; becomes one results row."""

    task: str
    metric: str  # e.g. "perplexity", "nats_per_token", "bits_per_byte", "acc", "acc_norm"
    value: float
    stderr: float | None = None
    n_examples: int | None = None
    # What a paired bootstrap resamples (columns `unit_sums`/`unit_counts`; see pipeline/evals/units.py):
    # per unit (text chunk or document) a sum and a count; None on metrics without them
    unit_sums: tuple[float, ...] | None = None
    unit_counts: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        sums, counts = self.unit_sums, self.unit_counts
        if (sums is None) != (counts is None) or (sums is not None and len(sums) != len(counts or ())):
            raise ValueError(f"{self.task}/{self.metric}: unit_sums and unit_counts need equal lengths")


@dataclass(frozen=True)
class QuantReport:
    """Exact parameter and bit counts of a model after `quantize_model_`."""

    n_params: int  # every parameter of the model
    n_quantized_params: int  # parameters stored in k bits
    n_kept_params: int  # parameters of quantized matrices kept in 16 bits (proxy columns)
    total_model_bits: int  # sum over all parameters, constants and codebooks included
    bits_per_param: float  # over the quantized matrices only (k + 16/B + ...), the paper's definition
    calibration: str | None = None  # canonical JSON of the calibration used (spec + token-id sha256)
    allocation: str | None = None  # mixed precision: canonical JSON, layer -> candidate (allocation.py)

    @classmethod
    def of_counts(cls, total: int, n_quantized: int, n_kept: int, quant_bits: int) -> QuantReport:
        """From the quantized matrices' counts: the rest of the model's `total` parameters is 16-bit."""
        n_matrix = n_quantized + n_kept
        return cls(
            n_params=total,
            n_quantized_params=n_quantized,
            n_kept_params=n_kept,
            total_model_bits=quant_bits + 16 * (total - n_matrix),
            bits_per_param=quant_bits / n_matrix if n_matrix else math.nan,
        )
