"""The Hydra structured-config schema, composition, and the conversion to plain value types.

The schema lives here as dataclasses registered in Hydra's ConfigStore (`base_config`); the values
live in `conf/` (one YAML per group option). Only this module and `pipeline.run` touch Hydra or
OmegaConf: a composed `DictConfig` becomes a typed `Config` at once (`OmegaConf.to_object`), and
`model_ref` / `quant_spec` / `eval_spec` turn its parts into the frozen specs the rest of the
pipeline takes. Relative paths (`eval.data_root`, `results_root`) are relative to the project root,
never to the current directory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.specs import EvalSpec, ModelRef, PerplexitySpec

if TYPE_CHECKING:
    from kernels import QuantSpec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
SWEEPS_DIR = PROJECT_ROOT / "sweeps"
BASELINE_BITS = 16  # quant.bits=16: the unquantized 16-bit baseline
GROUPS = ("model", "quant", "eval", "ray")
T = TypeVar("T")


@dataclass
class ModelConfig:
    """`model` group: what to load. Remote code is never trusted (no option to turn it on)."""

    name_or_path: str = "ladder:tiny"  # hub id, local dir, or a ladder ("ladder:tiny", "ladder:tiny/2")
    torch_dtype: str = "auto"
    revision: str | None = None
    gguf_file: str | None = None
    quantize_embeddings: bool = False
    quantize_lm_head: bool = False


@dataclass
class QuantConfig:
    """`quant` group: the QuantSpec fields plus the proxy-quantization outlier fraction."""

    dtype: str = "int"
    bits: int = 4  # 16: the unquantized baseline, whatever dtype and block_size say
    block_size: int | None = 64  # null: one absmax per tensor
    exponent_bits: int | None = None  # fp only; null: the paper's choice for the bits
    centering: bool = False
    outlier_fraction: float = 0.0  # p of proxy quantization; 0: off


@dataclass
class PerplexityConfig:
    """One text set scored by strided perplexity (see `PerplexitySpec`)."""

    name: str = "wikitext2"
    path: str = "eval/wikitext-2-raw/wiki.test.raw"
    context_length: int = 512
    stride: int = 512
    max_tokens: int | None = None


@dataclass
class EvalConfig:
    """`eval` group: perplexity text sets and lm-eval tasks."""

    perplexity: list[PerplexityConfig] = field(default_factory=lambda: [PerplexityConfig()])
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 32
    data_root: str = "../shared/data"  # relative to the project root
    # "hflm" (lm-eval's HFLM + evaluate) or "fast" (FastScorer + pipeline.evals.fastmetrics: same values)
    scorer: str = "hflm"
    # torch.compile the decoder blocks once per resident model: null (auto: on CUDA, except for lm-eval
    # tasks scored by hflm), true, false. Not in the job key: it changes speed, not the numbers.
    compile: bool | None = None


@dataclass
class RayConfig:
    """`ray` group: where jobs run.

    `address=None` starts an embedded local cluster; "auto" (or host:port) joins a running one.
    One worker actor per GPU, or `workers_per_gpu` actors sharing each GPU (fractional GPUs);
    without GPUs, one actor per `cpus_per_worker` CPUs.
    """

    address: str | None = None
    num_gpus: int | None = None  # local cluster only; None: Ray's detection
    num_cpus: int | None = None  # local cluster only; None: Ray's detection
    workers_per_gpu: int = 1
    cpus_per_worker: int = 1
    max_workers: int | None = None  # cap on worker actors; None: as many as the resources allow
    max_attempts: int = 3  # a job whose worker dies this many times is recorded as failed
    in_flight_per_worker: int = 2  # jobs queued on each actor, so it never waits for the driver


@dataclass
class Config:
    """The root config, as `python -m pipeline.run` composes it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    study: str = "default"
    results_root: str = "results"  # relative to the project root
    rerun_failed: bool = False
    dry_run: bool = False
    report: bool = False  # write the analysis report of each study after the sweep (the demo does)


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore as `base_config` (conf/config.yaml extends it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


@contextmanager
def hydra_context() -> Iterator[None]:
    """A Compose-API context over conf/, without Hydra's run or output directories."""
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="kbitscale"):
        yield


def compose(overrides: Sequence[str] = ()) -> Any:
    """Compose conf/config.yaml with `overrides` (call inside `hydra_context`); returns a DictConfig."""
    from hydra import compose as hydra_compose

    return hydra_compose(config_name="config", overrides=list(overrides))


def to_config(cfg: Any) -> Config:
    """A composed DictConfig -> the typed `Config` (the only place a DictConfig is unpacked)."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config), type(obj)
    return obj


def load_config(overrides: Sequence[str] = ()) -> Config:
    """Compose and convert in one call (tests, notebooks)."""
    with hydra_context():
        return to_config(compose(overrides))


def group_options(group: str) -> list[str]:
    """The options of a config group, e.g. ["hf", "ladder/tiny", ...] for `model`."""
    folder = CONF_DIR / group
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


def project_path(path: str) -> Path:
    """`path` made absolute: relative paths are relative to the project root, `~` expands."""
    expanded = Path(path).expanduser()
    return expanded if expanded.is_absolute() else (PROJECT_ROOT / expanded).resolve()


def model_ref(model: ModelConfig, name_or_path: str | None = None) -> ModelRef:
    """The `ModelRef` of a model config; `name_or_path` replaces the configured one (ladder members)."""
    return ModelRef(
        name_or_path=name_or_path or model.name_or_path,
        torch_dtype=model.torch_dtype,
        revision=model.revision,
        gguf_file=model.gguf_file,
        quantize_embeddings=model.quantize_embeddings,
        quantize_lm_head=model.quantize_lm_head,
    )


def quant_spec(quant: QuantConfig) -> QuantSpec | None:
    """The `QuantSpec` of a quant config, or None for the 16-bit baseline.

    Raises:
        ValueError, KeyError: from `QuantSpec`, naming the bad value and the allowed ones.
    """
    if quant.bits == BASELINE_BITS:
        return None
    from kernels import QuantSpec

    return QuantSpec(
        dtype=quant.dtype,
        bits=quant.bits,
        block_size=quant.block_size,
        exponent_bits=quant.exponent_bits,
        centering=quant.centering,
    )


def eval_spec(evals: EvalConfig) -> EvalSpec:
    """The `EvalSpec` of an eval config, with `data_root` made absolute."""
    return EvalSpec(
        perplexity=tuple(PerplexitySpec(**dataclasses.asdict(p)) for p in evals.perplexity),
        tasks=tuple(evals.tasks),
        limit=evals.limit,
        batch_size=evals.batch_size,
        data_root=str(project_path(evals.data_root)),
        scorer=evals.scorer,
        compile=evals.compile,
    )


def replace_path(cfg: T, updates: dict[str, Any]) -> T:
    """`cfg` with dotted keys set (`{"quant.bits": 4}`), rebuilt through `dataclasses.replace`.

    Values must already have the schema's types (the sweep expander validates them once per
    distinct value); this is the fast path that lets a 35,000-cell grid skip per-cell composition.
    """
    nested: dict[str, Any] = {}
    for key, value in updates.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    changes: dict[str, Any] = {}
    for head, value in nested.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(cfg, head, None)):
            changes[head] = replace_path(getattr(cfg, head), value)
        else:
            changes[head] = value
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
