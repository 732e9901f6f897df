"""The Hydra structured-config schema, composition, and the conversion to plain value types.

The schema lives here as dataclasses registered in Hydra's ConfigStore (`base_config`); the values
live in `conf/` (one YAML per group option). Only this module and `pipeline.run` touch Hydra or
OmegaConf: a composed `DictConfig` becomes a typed `Config` at once (`OmegaConf.to_object`), and one
generic path, `to_spec`, turns a config part into the frozen spec of the same field names (lists
become tuples, dicts sorted pairs): `model_ref`, `recipe` and `eval_spec` are that call plus what
differs (ladder member paths, absolute data roots). Relative paths (`eval.data_root`,
`results_root`) are relative to the project root, never to the current directory.

Mutable config dataclasses beside frozen specs, rather than one class: OmegaConf updates a config in
place while a sweep's values are checked, and a frozen structured config cannot be updated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from pipeline.recipe import Recipe
from pipeline.recovery import RecoverSpec
from pipeline.specs import EvalSpec, ModelRef

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
SWEEPS_DIR = PROJECT_ROOT / "sweeps"
GROUPS = ("model", "quant", "eval", "ray")
# Keys that hold for the whole run: a sweep giving them several values is refused (`run_wide_problems`)
RUN_WIDE = ("results_root", "rerun_failed", "dry_run", "report", "plugins", "ray", "verbose", "compact")
T = TypeVar("T")


@dataclass
class ModelConfig:
    """`model` group: what to load. Remote code is never trusted (no option to turn it on)."""

    name_or_path: str = "ladder:tiny"  # hub id, local dir, or a ladder ("ladder:tiny", "ladder:tiny/2")
    torch_dtype: str = "auto"
    revision: str | None = None
    gguf_file: str | None = None
    # where the pristine copy restored before each job lives: "gpu", "cpu" (pinned host memory, restored
    # by asynchronous copies), or "auto" (the GPU where the memory plan fits, else the host; pipeline.memplan)
    snapshot: str = "auto"


@dataclass
class CalibrationConfig:
    """`quant.calibration`: the text a calibrating method (gptq) reads; see `CalibrationSpec`."""

    source: str | None = None  # corpus:train, a text file, file.jsonl:field, file.parquet:column
    n_samples: int = 128
    seq_len: int | None = None  # null: min(2048, the model's positions)
    seed: int = 0


@dataclass
class SearchConfig:
    """`quant.search`: the search allocator's settings (`pipeline.allocators.SearchSpec`)."""

    steps: int = 100  # Adam steps on the per-layer logits
    lr: float = 0.1
    lam: float = 10.0  # weight of max(0, expected bits per parameter - target)
    batch_size: int = 4  # calibration windows per step
    temperature: float = 1.0  # Gumbel-softmax temperature
    seed: int = 0


@dataclass
class QuantConfig:
    """`quant` group: the fields of `pipeline.recipe.Recipe` (one recipe per cell)."""

    method: str = "rtn"  # a registered method (pipeline.methods.METHODS)
    dtype: str = "int"
    bits: int = 4  # 16: the unquantized baseline, whatever else this group says
    block_size: int | None = 64  # null: one absmax per tensor
    exponent_bits: int | None = None  # fp only; null: the paper's choice for the bits
    centering: bool = False
    outlier_fraction: float = 0.0  # p of proxy quantization; 0: off
    quantize_embeddings: bool = False  # quantize the embedding tables too
    quantize_lm_head: bool = False  # quantize the LM head too (a tied head needs quantize_embeddings)
    params: dict[str, Any] = field(default_factory=dict)  # the method's own parameters
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)  # methods that calibrate
    # mixed precision (docs/ARCHITECTURE.md, "Mixed precision"): "uniform" (every layer the codes above)
    # or knapsack / shiftadd / search (each linear layer one of `candidates`, e.g.
    # [nf3-b64,nf4-b64,int8-b64,16-bit], within `target_bits` per quantized parameter, block constants
    # included; needs quant.calibration). `sensitivity` scores layers for knapsack and shiftadd (hessian,
    # measured, first_order); `search` sets the search allocator (steps, lr, lam, batch_size, ...)
    allocation: str = "uniform"
    target_bits: float | None = None
    candidates: list[str] = field(default_factory=list)
    sensitivity: str = "hessian"
    search: SearchConfig = field(default_factory=SearchConfig)


@dataclass
class RecoverConfig:
    """`recover`: adapters trained after quantization, base frozen (`pipeline.recovery.RecoverSpec`)."""

    method: str = "none"  # none, lora, vblora, shears
    rank: int = 8
    steps: int = 100  # AdamW steps
    lr: float = 1e-3
    data: str = "corpus:train"  # a calibration source form; never an evaluation text
    seq_len: int = 256  # tokens per training window
    batch_size: int = 8  # windows per step
    seed: int = 0
    num_vectors: int = 256  # vblora: vectors in the shared bank
    vector_length: int = 64  # vblora: must divide every adapted layer's in and out features
    topk: int = 2  # vblora: bank vectors mixed per sub-vector
    ranks: list[int] = field(default_factory=list)  # shears: elastic ranks, increasing, e.g. [4, 8, 16]
    sparsity: float = 0.0  # SQFT: fraction of each quantized matrix pruned (Wanda) before quantization


@dataclass
class PerplexityConfig:
    """One text set scored by strided perplexity (see `PerplexitySpec`)."""

    name: str = "wikitext2"
    path: str = "eval/wikitext-2-raw/wiki.test.raw"
    context_length: int = 512
    stride: int = 512
    max_tokens: int | None = None
    kl_tokens: int | None = None  # KL to the 16-bit model on the first kl_tokens scored tokens; null: off


@dataclass
class EvalConfig:
    """`eval` group: perplexity text sets and lm-eval tasks."""

    perplexity: list[PerplexityConfig] = field(default_factory=lambda: [PerplexityConfig()])
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    batch_size: int = 32
    data_root: str = "../shared/data"  # relative to the project root
    # folders of lm-eval task YAMLs (as lm-eval's --include_path), relative to the project root; their
    # tasks override pipeline/evals/tasks and lm-eval's own of the same name
    include_path: list[str] = field(default_factory=list)
    # "hflm" (lm-eval's HFLM + evaluate), "fast" (FastScorer + pipeline.evals.fastmetrics: the same
    # values in float32; in bf16 HFLM rounds log-probs to bf16: docs/ARCHITECTURE.md, "Scorer numerics")
    # or "auto": fast where the architecture packs, else hflm (the rows' `scorer` names the one used)
    scorer: str = "auto"
    # torch.compile the decoder blocks once per resident model: null (auto: on CUDA, except for lm-eval
    # tasks scored by hflm, and only where a worker runs enough jobs of the model to pay: dispatch.
    # resolve_compile), true, false. Not in the job key: it changes speed, not the numbers.
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
    gpus_per_worker: int = 1  # >1: one worker spans this many GPUs of a node, the model sharded over them
    cpus_per_worker: int = 1
    max_workers: int | None = None  # cap on worker actors; None: as many as the resources allow
    max_attempts: int = 3  # a job whose worker dies this many times is recorded as failed
    in_flight_per_worker: int = 2  # jobs queued on each actor, so it never waits for the driver
    keep_workers: bool = False  # a joined cluster only: workers (and their models) outlive the command


@dataclass
class Config:
    """The root config, as `python -m pipeline.run` composes it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)  # recovery adapters after quantization
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    study: str = "default"
    results_root: str = "results"  # relative to the project root
    rerun_failed: bool = False
    dry_run: bool = False
    report: bool = False  # write the analysis report of each study after the sweep (the demo does)
    plugins: list[str] = field(default_factory=list)  # modules imported by the driver and every worker
    verbose: bool = False  # workers' progress bars and lm-eval's notices (off: the driver's progress line)
    # after the sweep, merge each study's per-job files into one part (pipeline/compact.py): "auto" (when
    # more than 1000), "always" or "never"
    compact: str = "auto"


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
    """Compose conf/config.yaml with `overrides` (call inside `hydra_context`); returns a DictConfig.

    `quant.params` takes any key (each method has its own; `Recipe` checks them against the method,
    naming the allowed ones), so it is the one node outside Hydra's struct mode.
    """
    from hydra import compose as hydra_compose
    from omegaconf import OmegaConf

    cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.set_struct(cfg.quant.params, False)
    return cfg


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


def to_spec(part: Any, spec_type: type[T]) -> T:
    """The frozen spec of a config part: fields of the same names, lists as tuples, dicts as sorted
    pairs, nested config dataclasses converted to the spec type the field names."""
    hints = get_type_hints(spec_type)
    values = {
        f.name: _frozen(getattr(part, f.name), hints[f.name])
        for f in dataclasses.fields(spec_type)  # type: ignore[arg-type]
        if hasattr(part, f.name)
    }
    return spec_type(**values)


def _frozen(value: Any, hint: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    if isinstance(value, list | tuple):
        args = [a for a in get_args(hint) if a is not Ellipsis]
        item = args[0] if args and get_origin(hint) is tuple else None
        return tuple(_frozen(v, item) for v in value)
    if dataclasses.is_dataclass(value):
        spec_types = [
            t for t in (hint, *get_args(hint)) if isinstance(t, type) and dataclasses.is_dataclass(t)
        ]
        return to_spec(value, spec_types[0]) if spec_types else value
    return value


def model_ref(model: ModelConfig, name_or_path: str | None = None) -> ModelRef:
    """The `ModelRef` of a model config; `name_or_path` replaces the configured one (ladder members)."""
    ref = to_spec(model, ModelRef)
    return dataclasses.replace(ref, name_or_path=name_or_path) if name_or_path else ref


def recipe(quant: QuantConfig) -> Recipe:
    """The `Recipe` of a quant config (the baseline for bits=16).

    Raises:
        ValueError, KeyError: from `Recipe`, naming the bad value and the allowed ones.
    """
    return to_spec(quant, Recipe)


def recover_spec(recover: RecoverConfig) -> RecoverSpec:
    """The `RecoverSpec` of a recover config.

    Raises:
        ValueError: from `RecoverSpec`, naming the bad value and the allowed ones.
    """
    return to_spec(recover, RecoverSpec)


def eval_spec(evals: EvalConfig) -> EvalSpec:
    """The `EvalSpec` of an eval config, with `data_root` made absolute."""
    spec = to_spec(evals, EvalSpec)
    include_path = tuple(str(project_path(p)) for p in evals.include_path)
    return dataclasses.replace(spec, data_root=str(project_path(evals.data_root)), include_path=include_path)


def run_wide_problems(cells: Sequence[Config]) -> list[str]:
    """A message per run-wide key (`RUN_WIDE`) that the cells give more than one value."""
    problems = []
    for key in RUN_WIDE:
        values = list(dict.fromkeys(repr(getattr(cell, key)) for cell in cells))
        if len(values) > 1:
            problems.append(
                f"{key} holds for the whole run but the sweep gives it {len(values)} values "
                f"({', '.join(values[:4])}); run one command per value"
            )
    return problems


def import_plugins(modules: Sequence[str]) -> None:
    """Import the `plugins` modules (each registers methods or other records when imported).

    Raises:
        ValueError: a module that cannot be imported, naming it and the error.
    """
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ValueError(
                f"plugins: cannot import {name!r} ({err}); give a module on the Python path"
            ) from err


def replace_path(cfg: T, updates: dict[str, Any]) -> T:
    """`cfg` with dotted keys set (`{"quant.bits": 4}`), rebuilt through `dataclasses.replace`; an
    integer part indexes a list (`{"eval.perplexity.0.max_tokens": 2048}` sets the first text set's).

    Values must already have the schema's types (the sweep expander validates them once per
    distinct value); this is the fast path that lets a 35,000-cell grid skip per-cell composition.
    Nothing is modified in place: changed dataclasses and lists are new objects.
    """
    nested: dict[str, Any] = {}
    for key, value in updates.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    if isinstance(cfg, list):
        items = list(cfg)
        for head, value in nested.items():
            items[int(head)] = _replaced(items[int(head)], value)
        return items  # type: ignore[return-value]
    changes = {head: _replaced(getattr(cfg, head, None), value) for head, value in nested.items()}
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def list_index_problem(cfg: Any, key: str) -> str | None:
    """Why dotted `key` indexes past the end of a list in the composed `cfg` (None: it does not).

    An indexed override sets a field of an item the config already has; it cannot add one.
    """
    from omegaconf import ListConfig, OmegaConf

    parts = key.split(".")
    for i, part in enumerate(parts[1:], start=1):
        parent = OmegaConf.select(cfg, ".".join(parts[:i]), default=None)
        if part.isdigit() and isinstance(parent, ListConfig) and int(part) >= len(parent):
            where = ".".join(parts[:i])
            return (
                f"{where} has {len(parent)} item(s) (indices 0..{len(parent) - 1}); an indexed override "
                f"sets a field of an existing item: give the whole list to change its length ({where}=[...])"
            )
    return None


def _replaced(current: Any, value: Any) -> Any:
    """`value`, or for the nested updates of a dataclass or list, `current` with them set."""
    if isinstance(value, dict) and (dataclasses.is_dataclass(current) or isinstance(current, list)):
        return replace_path(current, value)
    return value
