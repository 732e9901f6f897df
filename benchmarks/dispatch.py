"""Orchestration benchmark: driver cost of a 35,000-job sweep, and per-job overhead on a real shape.

    python benchmarks/dispatch.py                       # both parts, CPU, full sizes
    python benchmarks/dispatch.py --quick               # seconds: 2,000 jobs and a small model
    python benchmarks/dispatch.py --part overhead --device cuda --jobs 12   # on a GPU machine

Part `dispatch`: `+sweep=paper` over enough hub-id models for >= 35,000 jobs; times expansion,
pre-flight checks, job building (content keys), resume filtering, and dispatch of every job
through real Ray to no-op actors (the same driver loop a real sweep uses). Targets: < 60 s of
driver time in all, < 10 ms scheduling per job.

Part `overhead`: a Pythia-410M-shaped GPT-NeoX (hidden 1024, 24 layers, 16 heads; random weights)
saved locally, one real worker, several 4-bit jobs: load once, then per job restore + quantize +
perplexity. Reports restore + quantize + scheduling as a share of job time (target < 5%).
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAPER_CELLS_PER_MODEL = 201  # sweeps/paper.yaml: 150 + baseline + 50 proxy cells


class NoopWorker:
    """Stands in for ModelWorker: answers at once, writes nothing (isolates the driver's cost)."""

    def __init__(self, results_root: str, cpu_threads: int = 1, plugins: Sequence[str] = ()) -> None:
        # Import at start what unpickling a Job needs (kernels imports torch), as ModelWorker does.
        import kernels  # noqa: F401
        import pipeline.worker  # noqa: F401

        self.results_root = results_root

    def describe(self) -> str:
        return "noop"

    def run_batch(self, jobs: list[Any]) -> list[Any]:
        from pipeline.jobrows import JobResult

        return [JobResult(job.key, "ok", None, (), {"job_s": 0.0}, "noop") for job in jobs]


def _fake_hub_cache(repo_ids: Sequence[str], cache: Path) -> None:
    """A hub cache holding a small Llama config per repo id (at commit 0...0), set as HF_HUB_CACHE."""
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 2048}
    for repo_id in repo_ids:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text(json.dumps(config))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text("0" * 40)
    os.environ["HF_HUB_CACHE"] = str(cache)


def bench_dispatch(n_jobs: int, results_root: Path) -> dict[str, float]:
    """Seconds per driver phase for a paper-grid sweep of about `n_jobs` jobs (no-op workers)."""
    import ray

    from pipeline.cluster import plan_workers, start_workers
    from pipeline.dispatch import run_jobs
    from pipeline.jobs import build_jobs
    from pipeline.progress import Progress
    from pipeline.run import Plan, Settings, preflight, select_jobs
    from pipeline.sweep import expand, plan_sweep

    n_models = math.ceil(n_jobs / PAPER_CELLS_PER_MODEL)
    names = [f"bench/model-{i:04d}" for i in range(n_models)]
    _fake_hub_cache(names, results_root / "hub")  # offline, pre-flight reads hub ids from the hub cache
    models = ",".join(names)
    overrides = [
        "+sweep=paper",
        f"model.name_or_path={models}",
        f"results_root={results_root}",
        "study=bench",
    ]
    times: dict[str, float] = {}
    cpu0, t = time.process_time(), time.perf_counter()
    cells = expand(plan_sweep(overrides, multirun=True))
    times["expand_s"], t = time.perf_counter() - t, time.perf_counter()
    preflight(cells)
    times["preflight_s"], t = time.perf_counter() - t, time.perf_counter()
    jobs = build_jobs(cells)
    times["build_jobs_s"], t = time.perf_counter() - t, time.perf_counter()
    to_run, skipped = select_jobs(jobs, results_root, rerun_failed=False)
    times["resume_filter_s"] = time.perf_counter() - t
    times["plan_cpu_s"] = time.process_time() - cpu0
    first = cells[0]
    settings = Settings(results_root, False, False, first.ray)
    plan = Plan(len(cells), tuple(jobs), tuple(to_run), skipped, settings)
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    times["ray_init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cfg = first.ray
    workers = start_workers(
        plan_workers(cfg, ray.cluster_resources(), len(jobs)), results_root, 3, NoopWorker
    )
    ray.get([w.describe.remote() for w in workers])
    times["workers_start_s"] = time.perf_counter() - t
    progress = Progress(total=len(plan.to_run))
    cpu0, t = time.process_time(), time.perf_counter()
    run_jobs(plan.to_run, workers, progress, results_root, cfg.max_attempts, cfg.in_flight_per_worker)
    times["dispatch_s"] = time.perf_counter() - t
    times["dispatch_cpu_s"] = time.process_time() - cpu0
    times["workers"] = len(workers)
    ray.shutdown()
    assert progress.done == len(jobs) and progress.failed == 0, progress.summary()
    times["cells"], times["jobs"] = len(cells), len(jobs)
    times["driver_total_s"] = sum(times[k] for k in ("expand_s", "preflight_s", "build_jobs_s",
                                                      "resume_filter_s", "dispatch_s"))  # fmt: skip
    times["dispatch_ms_per_job"] = 1000 * times["dispatch_s"] / len(jobs)
    return times


def save_model(path: Path, quick: bool) -> Path:
    """A GPT-NeoX of Pythia-410M's shape (or a small one with `quick`), random weights, fp16 on disk."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from pipeline.ladders.corpus import split_corpus
    from pipeline.ladders.tokenizer import train_tokenizer

    train_text, _ = split_corpus(ROOT.parent / "shared" / "data")
    tokenizer = train_tokenizer([train_text[:300_000]], 1024)
    shape: dict[str, Any] = {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    }
    if not quick:  # Pythia-410M
        shape = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    config = GPTNeoXConfig(vocab_size=50304, max_position_embeddings=2048, **shape)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).half()  # fp16 on disk
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def bench_overhead(device: str, n_jobs: int, quick: bool, work: Path) -> dict[str, Any]:
    """Per-job timings of real 4-bit jobs on one warm worker (model loaded, Evaluator built)."""
    import ray
    import torch

    from pipeline.cluster import plan_workers, start_workers
    from pipeline.dispatch import run_jobs
    from pipeline.progress import Progress
    from pipeline.results import load_results
    from pipeline.run import plan_run

    model_dir = save_model(work / "model", quick)
    context, tokens = (256, 2048) if quick else (1024, 2048 if device == "cpu" else 65536)
    blocks = ["64", "128", "256", "1024", "null"][: max(1, math.ceil((n_jobs + 1) / 5))]
    overrides = [
        f"model.name_or_path={model_dir}", "quant.dtype=int,fp,nf,quantile,dynamic",
        f"quant.block_size={','.join(blocks)}", "quant.bits=4", "eval.batch_size=8",
        f"eval.perplexity=[{{name:wikitext2,path:eval/wikitext-2-raw/wiki.test.raw,"
        f"context_length:{context},stride:{context},max_tokens:{tokens}}}]",
        f"results_root={work / 'results'}", "study=overhead", "ray.max_workers=1",
        f"ray.cpus_per_worker={os.cpu_count() if device == 'cpu' else 1}",
    ]  # fmt: skip
    plan = plan_run(overrides)
    jobs = plan.to_run[: n_jobs + 1]
    ray.init(num_cpus=os.cpu_count(), num_gpus=0 if device == "cpu" else None, include_dashboard=False)
    cfg, root = plan.settings.ray, plan.settings.results_root
    workers = start_workers(plan_workers(cfg, ray.cluster_resources(), 1), root, cfg.max_attempts)
    ray.get([w.describe.remote() for w in workers])
    t = time.perf_counter()
    run_jobs(jobs[:1], workers, Progress(total=1), root)  # load + Evaluator: once per model per worker
    first_s, t = time.perf_counter() - t, time.perf_counter()
    progress = Progress(total=len(jobs) - 1)
    run_jobs(jobs[1:], workers, progress, root, cfg.max_attempts, cfg.in_flight_per_worker)
    wall = time.perf_counter() - t
    ray.shutdown()
    assert progress.failed == 0, progress.summary()
    df = load_results(root / "overhead").drop_duplicates("job_key")
    df = df[df.job_key.isin([j.key for j in jobs[1:]])]
    n = len(df)
    restore, quantize, evals = (float(df[c].sum()) / n for c in ("restore_s", "quantize_s", "eval_s"))
    job_s = wall / n
    other = max(0.0, job_s - restore - quantize - evals)  # Ray call, row writes, driver, Python
    n_params = int(df.n_params.iloc[0])
    return {
        "device": df.device.iloc[0], "model_params": n_params, "jobs": n, "first_job_s": first_s,
        "restore_ms": 1000 * restore, "quantize_ms": 1000 * quantize, "eval_ms": 1000 * evals,
        "scheduling_and_rest_ms": 1000 * other, "job_ms": 1000 * job_s,
        "overhead_share": (restore + quantize + other) / job_s, "scheduling_share": other / job_s,
        "eval_tokens": tokens, "context_length": context, "torch_threads": torch.get_num_threads(),
    }  # fmt: skip


def table(title: str, values: dict[str, Any]) -> str:
    rows = [f"{title}", "-" * len(title)]
    for key, value in values.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else f"{value}"
        rows.append(f"  {key:<22} {shown:>16}")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["dispatch", "overhead", "all"], default="all")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the overhead part)")
    parser.add_argument("--quick", action="store_true", help="2,000 jobs and a small model: seconds")
    parser.add_argument("--jobs", type=int, default=None, help="dispatch: jobs (35,000); overhead: jobs (10)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON output (default benchmarks/dispatch-<dev>.json)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs"}
    with tempfile.TemporaryDirectory(prefix="kbit-bench-") as tmp:
        if args.part in ("dispatch", "all"):
            n = args.jobs or (2000 if args.quick else 35000)
            out["dispatch"] = bench_dispatch(n, Path(tmp) / "dispatch")
            print(table(f"dispatch: {out['dispatch']['jobs']:,} jobs, no-op workers", out["dispatch"]))
        if args.part in ("overhead", "all"):
            n = args.jobs if args.part == "overhead" and args.jobs else (5 if args.quick else 10)
            out["overhead"] = bench_overhead(args.device, n, args.quick, Path(tmp))
            shape = "small GPT-NeoX" if args.quick else "Pythia-410M-shaped GPT-NeoX"
            print(table(f"per-job overhead: {shape}, {args.device}", out["overhead"]))
    path = args.out or ROOT / "benchmarks" / f"dispatch-{args.device}{'-quick' if args.quick else ''}.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**earlier, **out}, indent=2) + "\n")  # one part run keeps the other
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
