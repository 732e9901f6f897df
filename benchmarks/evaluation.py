"""Evaluation benchmark: where a job's time goes, evaluation MFU, and the naive lm-eval baseline.

    python benchmarks/evaluation.py --shape tiny --device cpu --limit 20 --configs 3 --out eval-cpu.json
    python benchmarks/evaluation.py --shape pythia-410m --device cuda --limit 500 --configs 5 \\
        --out benchmarks/results/evaluation-h100.json

1. Builds a GPT-NeoX of the named shape with random weights and a BPE tokenizer trained by
   `pipeline.ladders.tokenizer.train_tokenizer`, saved to a temporary directory, so every load is real.
2. The pipeline's way, as `ModelWorker` runs a job: load once, snapshot once, build an `Evaluator`
   once per scorer ("hflm": lm-eval's HFLM; "fast": `FastScorer`), then per quantization config
   restore + quantize + `Evaluator.run()`. Every phase is timed by wrapping the functions that do
   it (task loading, request building, tokenization, forward passes, log-likelihood scoring, the
   rest of lm-eval's `evaluate` = metrics), first run and later runs apart.
3. Evaluation MFU: forward FLOPs actually done (counted per decoder and LM-head call, padding
   included) over the evaluation time, against a dense matmul measured in the same run (bf16 on
   CUDA, fp32 on CPU). FLOPs of a decoder forward of B rows of T new tokens after P cached ones:
   2 * N_body * B * T + 4 * L * d * B * T * (P + (T + 1) / 2); of the LM head at K positions: 2 * d * V * K;
   N_body = parameters outside the input embedding and the LM head, L layers, d hidden, V vocab.
4. The naive baseline, per config: a fresh Python process (`--naive process`, the default) that
   imports torch and lm-eval, loads the model from disk, quantizes it, wraps it in a fresh HFLM and
   runs `lm_eval.simple_evaluate` with a fresh TaskManager (lm-eval's task index plus pipeline/tasks,
   `--naive-index all`, as the CLI does) and lm-eval's default bootstrap, as one CLI run per config.
5. The forward floor (FastScorer): a job's own forwards alone, back to back with no scoring, metrics,
   restore or quantize, run right after each uninstrumented job (pairs, so clock drift cancels); the
   overhead share of an uninstrumented job is 1 - median floor / median job.
6. `--compile on|off|auto` sets `EvalSpec.compile` (torch.compile of the decoder blocks; auto: CUDA).
7. Prints a table and writes JSON (device, torch version, matmul rate, every timing) to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data"
TASKS = "lambada_openai,piqa,hellaswag,winogrande"
# (dtype, bits, block size) in the order --configs takes them
CONFIGS = [
    ("nf", 4, 64),
    ("fp", 4, 64),
    ("int", 4, 64),
    ("quantile", 4, 64),
    ("dynamic", 4, 64),
    ("nf", 3, 64),
    ("int", 8, 64),
    ("fp", 5, 128),
    ("nf", 4, 1024),
    ("int", 4, None),
]
SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    "pythia-410m": dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        vocab_size=50304,
    ),
    "pythia-1.4b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=8192,
        vocab_size=50304,
    ),
}
COMPILE = {"auto": None, "on": True, "off": False}
TOKENIZER_VOCAB = 1024
TOKENIZER_CHARS = 300_000


@dataclass
class Timers:
    """Seconds and counts accumulated by name; `sync` runs before every clock read (CUDA sync)."""

    sync: Callable[[], None] = lambda: None
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counts: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        """`fn` with its wall time added to `seconds[name]` on every call."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed

    @contextlib.contextmanager
    def block(self, name: str) -> Iterator[None]:
        """Time a `with` block, synchronizing the device at both ends."""
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> dict[str, float]:
        """Everything measured since the last reset (seconds as `<name>_s`, counts as is), then clear."""
        out = {f"{k}_s": v for k, v in self.seconds.items()} | dict(self.counts)
        self.seconds.clear()
        self.counts.clear()
        return out


def device_sync(device: str) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model and core count."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def matmul_rate(device: str, reps: int = 10) -> dict[str, Any]:
    """Dense matmul FLOP/s measured now: bf16 8192^2 on CUDA, fp32 1024^2 on CPU."""
    import torch

    cuda = device.startswith("cuda")
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = device_sync(device)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    seconds = (time.perf_counter() - start) / reps
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": seconds,
        "flops": 2 * n**3 / seconds,
    }


def build_model(shape: str, path: Path, device: str, data_root: Path) -> Path:
    """Save a random-weight GPT-NeoX of `shape` with a trained BPE tokenizer under `path`."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from pipeline.ladders.corpus import split_corpus
    from pipeline.ladders.tokenizer import train_tokenizer

    train_text, _ = split_corpus(data_root)
    tokenizer = train_tokenizer([train_text[:TOKENIZER_CHARS]], TOKENIZER_VOCAB)
    dims: dict[str, Any] = dict(SHAPES[shape])
    vocab = dims.pop("vocab_size", len(tokenizer))
    config = GPTNeoXConfig(
        vocab_size=vocab,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **dims,
    )
    torch.manual_seed(0)
    torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # load_model's "auto"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):  # initialised on the device in its dtype: seconds, not a minute, at 1.4B
            model = GPTNeoXForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@dataclass(frozen=True)
class FlopModel:
    """The numbers the forward-FLOP formula needs."""

    body_params: int
    layers: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, model: Any) -> FlopModel:
        """Read them off a causal LM (body = all parameters but input embedding and LM head)."""
        skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
        body = sum(p.numel() for p in model.parameters() if id(p) not in skip)
        cfg = model.config
        return cls(
            body, cfg.num_hidden_layers, cfg.hidden_size, model.get_output_embeddings().weight.shape[0]
        )

    def body_flops(self, rows: int, new: int, past: int) -> float:
        """FLOPs of one decoder forward: `rows` x `new` tokens after `past` cached ones."""
        tokens = rows * new
        return 2 * self.body_params * tokens + 4 * self.layers * self.hidden * tokens * (past + (new + 1) / 2)

    def head_flops(self, positions: int) -> float:
        """FLOPs of the LM head at `positions` positions."""
        return 2 * self.hidden * self.vocab * positions


def count_forwards(model: Any, timers: Timers) -> Callable[[], None]:
    """Time every decoder and LM-head forward and count tokens and FLOPs; returns a remover.

    The hooks sit on the decoder (`model.base_model`) and the LM head, so they see HFLM's forwards
    (the causal LM calls both) and FastScorer's (it calls them itself) alike.
    """
    flop_model = FlopModel.of(model)
    clock: list[float] = []

    def before_body(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        assert ids is not None, "a decoder forward without input ids"
        rows, new = ids.shape
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        timers.counts["forward_calls"] += 1
        timers.counts["forward_tokens"] += rows * new
        timers.counts["forward_flops"] += flop_model.body_flops(rows, new, past)
        start()

    def before_head(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["input"]
        positions = hidden.numel() // hidden.shape[-1]
        timers.counts["head_positions"] += positions
        timers.counts["forward_flops"] += flop_model.head_flops(positions)
        start()

    def start() -> None:
        timers.sync()
        clock.append(time.perf_counter())

    def after(*_: Any) -> None:
        timers.sync()
        timers.seconds["forward"] += time.perf_counter() - clock.pop()

    body, head = model.base_model, model.get_output_embeddings()
    handles = [
        body.register_forward_pre_hook(before_body, with_kwargs=True),
        body.register_forward_hook(after),
        head.register_forward_pre_hook(before_head, with_kwargs=True),
        head.register_forward_hook(after),
    ]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


def quant_specs(n: int) -> list[Any]:
    """The first `n` configurations of CONFIGS (cycled) as QuantSpecs."""
    from kernels import QuantSpec

    return [QuantSpec(*config) for config in quant_configs(n)]


def build_evaluator(model: Any, tokenizer: Any, spec: Any, scorer: str, timers: Timers) -> Any:
    """An Evaluator built as the worker builds it, with task loading, requests and tokenization timed."""
    from unittest import mock

    from lm_eval.api.model import TemplateLM
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

    from pipeline.evals.evaluate import Evaluator

    patches = [
        (TaskManager, "__init__", "task_index"),
        (TaskManager, "load", "task_load"),
        (Task, "build_all_requests", "requests"),
        (TemplateLM, "_encode_pair", "tokenize"),
    ]
    with contextlib.ExitStack() as stack:
        for cls, attr, name in patches:
            stack.enter_context(mock.patch.object(cls, attr, timers.wrap(getattr(cls, attr), name)))
        with timers.block("build"):
            evaluator = Evaluator(model, tokenizer, spec, scorer=scorer)
    suite = evaluator.suite
    assert suite is not None, "the evaluation benchmark scores lm-eval tasks"
    for task in suite.task_dict["tasks"].values():  # later runs: the reused requests, reset
        task.build_all_requests = timers.wrap(task.build_all_requests, "requests")
    suite.lm.loglikelihood = timers.wrap(suite.lm.loglikelihood, "loglikelihood")
    return evaluator


def breakdown(raw: dict[str, float]) -> dict[str, float]:
    """Job phases from the nested timers: scoring and metrics are what is left around the forwards."""
    get = raw.get
    out = dict(raw)
    out["scoring_s"] = get("loglikelihood_s", 0.0) - get("forward_s", 0.0) - get("tokenize_s", 0.0)
    out["metrics_s"] = get("eval_s", 0.0) - get("loglikelihood_s", 0.0) - get("requests_s", 0.0)
    out["job_s"] = get("restore_s", 0.0) + get("quantize_s", 0.0) + get("eval_s", 0.0)
    out["overhead_s"] = out["job_s"] - get("forward_s", 0.0)
    out["overhead_share"] = out["overhead_s"] / out["job_s"]
    out["restore_quantize_share"] = (get("restore_s", 0.0) + get("quantize_s", 0.0)) / out["job_s"]
    return out


def pipeline_runs(
    model_dir: Path,
    device: str,
    tasks: tuple[str, ...],
    limit: int,
    batch_size: int,
    n_configs: int,
    data_root: Path,
    scorers: tuple[str, ...],
    peak: float,
    compile_blocks: bool | None = None,
    profile_job: bool = False,
) -> dict[str, Any]:
    """The pipeline's way: load and snapshot once, an Evaluator per scorer, then restore+quantize+run.

    Jobs alternate between the scorers config by config, so a drifting machine load (shared CPUs)
    hits both alike; each scorer's first job is its first run after its Evaluator was built.
    """
    from pipeline.models import load_model, snapshot_weights
    from pipeline.specs import EvalSpec, ModelRef

    timers = Timers(sync=device_sync(device))
    with timers.block("load"):
        model, tokenizer = load_model(ModelRef(str(model_dir)), device)
    with timers.block("snapshot"):
        snapshot = snapshot_weights(model)
    out: dict[str, Any] = {"setup": timers.reset(), "n_params": sum(p.numel() for p in model.parameters())}
    out["body_params"] = FlopModel.of(model).body_params
    spec = EvalSpec(
        tasks=tasks, limit=limit, batch_size=batch_size, data_root=str(data_root), compile=compile_blocks
    )
    remove = count_forwards(model, timers)
    evaluators = {}
    for scorer in scorers:
        evaluators[scorer] = build_evaluator(model, tokenizer, spec, scorer, timers)
        out[scorer] = {"build": timers.reset(), "jobs": []}
    for index, quant in enumerate(quant_specs(n_configs)):
        for scorer in scorers:
            job = timed_job(
                model, snapshot, quant, evaluators[scorer], timers, dirty=index > 0 or scorer != scorers[0]
            )
            job["mfu_eval"] = job["forward_flops"] / job["eval_s"] / peak
            job["mfu_forward"] = job["forward_flops"] / job["forward_s"] / peak
            out[scorer]["jobs"].append(job)
    remove()
    for scorer in scorers:  # the same jobs again without the hooks' syncs: the time a study sees
        lm = evaluators[scorer].suite.lm
        clean, floors = [], []
        for quant in quant_specs(n_configs):  # each job paired with its forwards alone: drift cancels
            clean.append(clean_job(model, snapshot, quant, evaluators[scorer], timers))
            if hasattr(lm, "layout_stats"):
                floors.append(forward_floor(lm, timers))
        out[scorer]["clean_jobs_s"] = clean
        if floors:
            out[scorer]["floors_s"] = floors
            out[scorer]["floor_s"] = statistics.median(floors)
    if profile_job and device.startswith("cuda"):
        for scorer in scorers:
            try:
                out[scorer]["job_profile"] = job_profile(
                    model, snapshot, quant_specs(2)[1], evaluators[scorer]
                )
            except Exception as err:  # a profiler problem must not cost the run's other numbers
                out[scorer]["job_profile_error"] = repr(err)
    for scorer in scorers:
        out[scorer]["steady"] = steady_state(out[scorer]["jobs"])
        lm = evaluators[scorer].suite.lm
        if hasattr(lm, "layout_stats"):
            out[scorer]["layout"] = lm.layout_stats()
    return out


def job_profile(model: Any, snapshot: Any, quant: Any, evaluator: Any) -> dict[str, Any]:
    """One uninstrumented job under torch.profiler: wall seconds, GPU kernel seconds by class, and the
    GPU's idle time (wall minus kernel time: launch latency, host syncs, CPU work the GPU waits for)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    from benchmarks.forward_profile import kernel_class

    run_job(model, snapshot, quant, evaluator)  # warm
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run_job(model, snapshot, quant, evaluator)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    by_class: dict[str, float] = defaultdict(float)
    cpu_ops = []
    for event in prof.key_averages():
        if event.device_type == DeviceType.CUDA:  # kernels and copies, each counted once
            by_class[kernel_class(event.key)] += event.device_time_total / 1e6
        if event.self_cpu_time_total > 0:
            cpu_ops.append((event.self_cpu_time_total / 1e6, event.count, event.key[:100]))
    cpu_ops.sort(reverse=True)
    busy = sum(by_class.values())
    return {
        "wall_s": wall,
        "kernel_s": busy,
        "idle_s": wall - busy,
        "by_class": dict(by_class),
        "top_cpu_self": cpu_ops[:25],
    }


def forward_floor(scorer: Any, timers: Timers) -> float:
    """Seconds of a FastScorer job's forward passes alone (decoder + LM head at the scored positions,
    back to back, synced only at the ends): what a job cannot do without."""
    import torch

    with torch.inference_mode(), timers.block("floor"):
        for batch in scorer._plan[1]:
            hidden = scorer.hidden(batch)
            for start, end, _, _ in batch.chunks:
                scorer.head(hidden[batch.scored[start:end]])
    return timers.reset()["floor_s"]


def timed_job(
    model: Any, snapshot: Any, quant: Any, evaluator: Any, timers: Timers, *, dirty: bool
) -> dict[str, Any]:
    """One job as the worker runs it (restore when dirty, quantize, evaluate), every phase timed."""
    from pipeline.models import quantize_model_, restore_weights_

    with timers.block("restore"):
        if dirty:
            restore_weights_(model, snapshot)
    with timers.block("quantize"):
        quantize_model_(model, Recipe.of(quant))
    with timers.block("eval"):
        metrics = evaluator.run()
    job: dict[str, Any] = breakdown(timers.reset())
    job["config"] = quant.name
    job["metrics"] = {f"{m.task}/{m.metric}": m.value for m in metrics}
    return job


def run_job(model: Any, snapshot: Any, quant: Any, evaluator: Any) -> None:
    """One job as the worker runs it after the first: restore, quantize, evaluate."""
    from pipeline.models import quantize_model_, restore_weights_

    restore_weights_(model, snapshot)
    quantize_model_(model, Recipe.of(quant))
    evaluator.run()


def clean_job(model: Any, snapshot: Any, quant: Any, evaluator: Any, timers: Timers) -> float:
    """Wall seconds of one uninstrumented job (device synced at the ends)."""
    with timers.block("clean"):
        run_job(model, snapshot, quant, evaluator)
    return timers.reset()["clean_s"]


def steady_state(jobs: list[dict[str, Any]]) -> dict[str, float]:
    """Median of each numeric field over the jobs after the first (all of them when there is one)."""
    later = jobs[1:] or jobs
    keys = [k for k, v in later[0].items() if isinstance(v, int | float)]
    return {k: statistics.median(j[k] for j in later) for k in keys}


def naive_job(args: dict[str, Any]) -> dict[str, float]:
    """One configuration the way lm-eval's CLI does it: load from disk, quantize, fresh HFLM and tasks."""
    times: dict[str, float] = {}
    t = time.perf_counter()
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from kernels import QuantSpec
    from pipeline.evals.tasks import TASKS_DIR
    from pipeline.models import load_model, quantize_model_
    from pipeline.specs import ModelRef

    times["import_s"], t = time.perf_counter() - t, time.perf_counter()
    sync = device_sync(args["device"])
    model, tokenizer = load_model(ModelRef(args["model_dir"]), args["device"])
    sync()
    times["load_s"], t = time.perf_counter() - t, time.perf_counter()
    quantize_model_(model, Recipe.of(QuantSpec(*args["config"])))
    sync()
    times["quantize_s"], t = time.perf_counter() - t, time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args["batch_size"])
    times["hflm_s"], t = time.perf_counter() - t, time.perf_counter()
    manager = TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=args["index"] == "all",
        metadata={"data_root": args["data_root"]},
    )
    times["task_index_s"], t = time.perf_counter() - t, time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(args["tasks"]),
        task_manager=manager,
        limit=args["limit"],
        bootstrap_iters=args["bootstrap"],
    )
    sync()
    times["evaluate_s"] = time.perf_counter() - t
    times["accuracy"] = {k: v.get("acc,none") for k, v in results["results"].items()}  # type: ignore[assignment]
    del torch
    return times


def naive_runs(
    mode: str,
    model_dir: Path,
    device: str,
    tasks: tuple[str, ...],
    limit: int,
    batch_size: int,
    n_configs: int,
    data_root: Path,
    index: str,
    bootstrap: int,
) -> Iterator[dict[str, Any]]:
    """Per configuration, the naive evaluation's wall seconds (and its own phase times), as each ends."""
    for config in quant_configs(n_configs):
        job = dict(
            model_dir=str(model_dir),
            device=device,
            tasks=list(tasks),
            limit=limit,
            batch_size=batch_size,
            data_root=str(data_root),
            config=list(config),
            index=index,
            bootstrap=bootstrap,
        )
        start = time.perf_counter()
        if mode == "process":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--naive-job", json.dumps(job)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"naive job failed ({done.returncode}):\n{done.stderr[-3000:]}")
            phases = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            phases = naive_job(job)
        phases["wall_s"] = time.perf_counter() - start
        phases["config"] = "/".join(map(str, config))
        yield phases


def quant_configs(n: int) -> list[tuple[Any, ...]]:
    """The first `n` configurations of CONFIGS, cycled."""
    return [CONFIGS[i % len(CONFIGS)] for i in range(n)]


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers: seconds and configs/hour per way, overhead, MFU, speed-up over naive."""
    pipe = result["pipeline"]
    n_cfg = result["settings"]["configs"]
    naive = result.get("naive") or []
    naive_s = sum(r["wall_s"] for r in naive) / len(naive) if naive else None
    naive_best = min(r["wall_s"] for r in naive) if naive else None
    out: dict[str, Any] = {"naive_s_per_config": naive_s, "naive_s_best": naive_best}
    setup = sum(pipe["setup"].values())
    for scorer in result["settings"]["scorers"]:
        steady = pipe[scorer]["steady"]
        build = pipe[scorer]["build"]["build_s"]
        amortized = (setup + build + sum(j["job_s"] for j in pipe[scorer]["jobs"])) / n_cfg
        out[scorer] = {
            "s_per_config": steady["job_s"],
            "s_per_config_best": min(j["job_s"] for j in pipe[scorer]["jobs"]),
            "configs_per_hour": 3600 / steady["job_s"],
            "s_per_config_amortized": amortized,
            "overhead_share": steady["overhead_share"],
            "mfu_eval": steady["mfu_eval"],
            "mfu_forward": steady["mfu_forward"],
            "speedup": naive_s / steady["job_s"] if naive_s else None,
            "speedup_amortized": naive_s / amortized if naive_s else None,
            "speedup_best": naive_best / min(j["job_s"] for j in pipe[scorer]["jobs"])
            if naive_best
            else None,
        }
        clean = pipe[scorer].get("clean_jobs_s")
        if clean:  # uninstrumented: no sync around every forward
            clean_s = statistics.median(clean)
            out[scorer] |= {
                "s_per_config_clean": clean_s,
                "configs_per_hour_clean": 3600 / clean_s,
                "mfu_job_clean": steady["forward_flops"] / clean_s / result["matmul"]["flops"],
                "speedup_clean": naive_s / clean_s if naive_s else None,
            }
            floor = pipe[scorer].get("floor_s")
            if floor:  # the job's own forwards, back to back: the rest of a clean job is overhead
                out[scorer] |= {"floor_s": floor, "overhead_share_clean": 1 - floor / clean_s}
    return out


def fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits, None as '-'."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render(result: dict[str, Any]) -> str:
    """Markdown tables: per-phase steady-state job times per scorer, the naive runs, the headline."""
    pipe, scorers = result["pipeline"], result["settings"]["scorers"]
    lines = [
        f"{result['device']}; matmul {result['matmul']['flops'] / 1e9:.1f} GFLOP/s "
        f"({result['matmul']['dtype']} {result['matmul']['n']}^2); model {pipe['n_params']:,} params; "
        f"load {pipe['setup']['load_s']:.3f} s, snapshot {pipe['setup']['snapshot_s']:.4f} s; "
        f"decoder blocks compiled: {result['settings'].get('compile', 'off')}",
        "",
    ]
    phases = [
        "restore_s",
        "quantize_s",
        "requests_s",
        "tokenize_s",
        "forward_s",
        "scoring_s",
        "metrics_s",
        "eval_s",
        "job_s",
        "overhead_share",
        "forward_tokens",
        "mfu_eval",
        "mfu_forward",
    ]
    lines.append("| phase | " + " | ".join(f"{s} first | {s} later (median)" for s in scorers) + " |")
    lines.append("|---|" + "---|---|" * len(scorers))
    for key in ["build_s", "task_index_s", "task_load_s"]:
        cells = [f"{fmt(pipe[s]['build'].get(key, 0.0))} | -" for s in scorers]
        lines.append(f"| setup {key} | " + " | ".join(cells) + " |")
    for key in ["requests_s", "tokenize_s"]:
        cells = [f"{fmt(pipe[s]['build'].get(key, 0.0))} | -" for s in scorers]
        lines.append(f"| setup {key} | " + " | ".join(cells) + " |")
    for key in phases:
        cells = [
            f"{fmt(pipe[s]['jobs'][0].get(key, 0.0))} | {fmt(pipe[s]['steady'].get(key, 0.0))}"
            for s in scorers
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if result.get("naive"):
        lines += [
            "",
            "| naive config | wall s | import s | load s | quantize s | hflm s | task index s | evaluate s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["naive"]:
            keys = ["wall_s", "import_s", "load_s", "quantize_s", "hflm_s", "task_index_s", "evaluate_s"]
            lines.append(f"| {r['config']} | " + " | ".join(fmt(r[k]) for k in keys) + " |")
    lines += [
        "",
        "| scorer | s/config | best s/config | configs/hour | s/config amortized | overhead share "
        "| MFU eval | MFU forward | speed-up | speed-up amortized | speed-up best/best |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scorers:
        h = result["summary"][s]
        keys = [
            "s_per_config",
            "s_per_config_best",
            "configs_per_hour",
            "s_per_config_amortized",
            "overhead_share",
            "mfu_eval",
            "mfu_forward",
            "speedup",
            "speedup_amortized",
            "speedup_best",
        ]
        lines.append(f"| {s} | " + " | ".join(fmt(h[k]) for k in keys) + " |")
    lines += [
        "",
        "Uninstrumented (the same configs again, device synced only around each job):",
        "",
        "| scorer | s/config | configs/hour | MFU over the whole job | speed-up | forwards alone s "
        "| overhead share (1 - forwards alone / job) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in scorers:
        h = result["summary"][s]
        keys = [
            "s_per_config_clean",
            "configs_per_hour_clean",
            "mfu_job_clean",
            "speedup_clean",
            "floor_s",
            "overhead_share_clean",
        ]
        lines.append(f"| {s} | " + " | ".join(fmt(h.get(k)) for k in keys) + " |")
    for s in scorers:
        prof = pipe[s].get("job_profile")
        if prof:
            classes = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(prof["by_class"].items()))
            lines += [
                "",
                f"One {s} job under the profiler: wall {prof['wall_s'] * 1e3:.1f} ms, GPU kernels "
                f"{prof['kernel_s'] * 1e3:.1f} ms ({classes}), GPU idle {prof['idle_s'] * 1e3:.1f} ms",
            ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--tasks", default=TASKS, help="comma-separated offline lm-eval tasks")
    parser.add_argument("--limit", type=int, default=20, help="documents per task")
    parser.add_argument("--configs", type=int, default=3, help="quantization configs (first N of CONFIGS)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--scorers", default="hflm,fast", help="pipeline scorers to time")
    parser.add_argument(
        "--compile",
        choices=sorted(COMPILE),
        default="auto",
        help="torch.compile the decoder blocks (EvalSpec.compile): auto = on CUDA only",
    )
    parser.add_argument("--profile-job", action="store_true", help="profile one job (CUDA): GPU idle time")
    parser.add_argument("--naive", choices=["process", "inprocess", "none"], default="process")
    parser.add_argument("--naive-configs", type=int, default=None, help="naive runs (default: --configs)")
    parser.add_argument(
        "--naive-index",
        choices=["all", "offline"],
        default="all",
        help="all: lm-eval's task index + pipeline/tasks, as the CLI; offline: pipeline/tasks",
    )
    parser.add_argument("--naive-bootstrap", type=int, default=100_000, help="lm-eval's default: 100000")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=None, help="JSON output (the table goes next to it, .md)")
    parser.add_argument("--naive-job", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def offline_environment() -> None:
    """No hub or dataset downloads, no tokenizer thread pools (set before transformers is imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    offline_environment()
    if args.naive_job is not None:  # child process of the naive baseline
        print(json.dumps(naive_job(json.loads(args.naive_job))))
        return 0
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tasks = tuple(t for t in args.tasks.split(",") if t)
    scorers = tuple(s for s in args.scorers.split(",") if s)
    data_root = args.data_root.expanduser().resolve()
    started = time.time()
    result: dict[str, Any] = {
        "device": device_name(device),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "load_average": os.getloadavg(),
        "settings": {
            "shape": args.shape,
            "device": device,
            "tasks": tasks,
            "limit": args.limit,
            "configs": args.configs,
            "batch_size": args.batch_size,
            "scorers": scorers,
            "compile": args.compile,
            "naive": args.naive,
            "naive_index": args.naive_index,
            "naive_bootstrap": args.naive_bootstrap,
            "argv": sys.argv[1:],
        },
    }
    result["matmul"] = matmul_rate(device)
    with tempfile.TemporaryDirectory(prefix="kbit-evalbench-") as tmp:
        model_dir = build_model(args.shape, Path(tmp) / "model", device, data_root)
        result["pipeline"] = pipeline_runs(
            model_dir,
            device,
            tasks,
            args.limit,
            args.batch_size,
            args.configs,
            data_root,
            scorers,
            result["matmul"]["flops"],
            COMPILE[args.compile],
            args.profile_job,
        )
        save(result, args.out)  # a run cut short by a time limit keeps what finished
        if args.naive != "none":
            result["naive"] = []
            n_naive = args.naive_configs or args.configs
            for run in naive_runs(
                args.naive,
                model_dir,
                device,
                tasks,
                args.limit,
                args.batch_size,
                n_naive,
                data_root,
                args.naive_index,
                args.naive_bootstrap,
            ):
                result["naive"].append(run)
                save(result, args.out)
    result["summary"] = summary(result)
    result["total_s"] = time.time() - started
    table = render(result)
    print(table)
    save(result, args.out, table)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def save(result: dict[str, Any], out: Path | None, table: str | None = None) -> None:
    """Write the JSON to `out` (and the table next to it, .md), when `out` is set."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if table is not None:
        out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
