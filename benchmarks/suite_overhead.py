"""Suite overhead: the CPU work of one `LmEvalSuite.run()` outside the forward passes.

    python benchmarks/suite_overhead.py --limit 500 --runs 5 --out suite-overhead-cpu.json
    python benchmarks/suite_overhead.py --limit 500 --profile fast:lm_eval

Builds the "tiny" random-weight GPT-NeoX of `benchmarks/evaluation.py` (BPE trained by
`pipeline.ladders.tokenizer.train_tokenizer` on the corpus), then one `LmEvalSuite` per variant over the
four offline tasks (lambada_openai, piqa, hellaswag, winogrande) with `--limit` documents each. A
variant is `scorer[:metrics]`: the scorer ("hflm": lm-eval's HFLM, "fast": `FastScorer`) and the
metrics path ("lm_eval": lm-eval's `evaluate`, "numpy": `pipeline.evals.fastmetrics`; left out: the
suite's default for that scorer). Each `run()` is split into
- forward: top-level model forwards (forward hooks),
- scoring: the scorer's `loglikelihood` minus its forwards (batching, padding, log-softmax, gathers),
- metrics: the rest of `run()` (filters, process_results, aggregation, stderr),
and the median over `--runs` runs after one warm-up run is reported. All variants must report the
same metric values (checked; perplexity to 1e-5 between scorers). `--profile VARIANT` prints the
cProfile of one run instead. Prints a table and writes JSON to `--out`.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from evaluation import (  # noqa: E402
    DEFAULT_DATA,
    Timers,
    build_model,
    count_forwards,
    device_name,
    offline_environment,
)

TASKS = ("lambada_openai", "piqa", "hellaswag", "winogrande")
VARIANTS = "hflm:lm_eval,hflm:numpy,fast:lm_eval,fast"
PHASES = ("run", "forward", "scoring", "metrics", "overhead")


def build_suite(model: Any, tokenizer: Any, variant: str, args: argparse.Namespace) -> Any:
    """The `LmEvalSuite` of one variant (`scorer[:metrics]`)."""
    from pipeline.evals.lmeval import LmEvalSuite

    scorer, _, metrics = variant.partition(":")
    extra = {"metrics": metrics} if metrics else {}
    return LmEvalSuite(
        model,
        tokenizer,
        TASKS,
        data_root=args.data_root,
        limit=args.limit,
        batch_size=args.batch_size,
        scorer=scorer,
        **extra,
    )


def timed_run(suite: Any, timers: Timers) -> tuple[dict[str, float], list[Any]]:
    """One `run()` split into forward, scoring and metrics seconds, and its metric values."""
    with timers.block("run"):
        metrics = suite.run()
    raw = timers.reset()
    forward, loglikelihood = raw.get("forward_s", 0.0), raw.get("loglikelihood_s", 0.0)
    times = {"run": raw["run_s"], "forward": forward, "scoring": loglikelihood - forward}
    times["metrics"] = times["run"] - loglikelihood
    times["overhead"] = times["run"] - forward
    return times, metrics


def measure(suite: Any, timers: Timers, runs: int) -> tuple[dict[str, Any], list[Any]]:
    """Median seconds per phase over `runs` runs after a warm-up run."""
    timed_run(suite, timers)
    samples = []
    for _ in range(runs):
        times, metrics = timed_run(suite, timers)
        samples.append(times)
    median = {phase: statistics.median(s[phase] for s in samples) for phase in PHASES}
    return {"median_s": median, "runs_s": samples}, metrics


def check_same_metrics(reference: list[Any], other: list[Any], variant: str) -> None:
    """Every variant reports the reference's metrics; values equal up to summed-log-prob rounding."""
    ref = {(m.task, m.metric): m for m in reference}
    got = {(m.task, m.metric): m for m in other}
    if ref.keys() != got.keys():
        raise AssertionError(f"{variant}: metrics {sorted(got)} != {sorted(ref)}")
    for key, m in ref.items():
        if abs(got[key].value - m.value) > 1e-5 * abs(m.value) or got[key].n_examples != m.n_examples:
            raise AssertionError(f"{variant}: {key} {got[key]} != {m}")


def profile_run(suite: Any, top: int) -> str:
    """cProfile of one `run()` after a warm-up, by cumulative and by own time."""
    suite.run()
    profiler = cProfile.Profile()
    profiler.enable()
    suite.run()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def render(result: dict[str, Any]) -> str:
    """A markdown table: median seconds per phase, one row per variant."""
    lines = [
        "| variant | run s | forward s | scoring s | metrics s | non-forward s |",
        "|---|---|---|---|---|---|",
    ]
    for variant, data in result["variants"].items():
        med = data["median_s"]
        cells = " | ".join(f"{med[p]:.3f}" for p in PHASES)
        lines.append(f"| {variant} | {cells} |")
    settings = result["settings"]
    lines.append(
        f"\n{settings['limit']} documents per task, {result['requests']} requests, "
        f"batch {settings['batch_size']}, median of {settings['runs']} runs after a warm-up; "
        f"{result['device']}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=500, help="documents per task")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant after a warm-up")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--variants", default=VARIANTS, help="comma-separated scorer[:metrics]")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", default=None, help="print the cProfile of one run of this variant")
    parser.add_argument("--top", type=int, default=30, help="functions per cProfile listing")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    offline_environment()
    import torch

    from pipeline.models import load_model
    from pipeline.specs import ModelRef

    if args.threads:
        torch.set_num_threads(args.threads)
    args.data_root = args.data_root.expanduser().resolve()
    with tempfile.TemporaryDirectory(prefix="kbit-overhead-") as tmp:
        model, tokenizer = load_model(
            ModelRef(str(build_model("tiny", Path(tmp) / "model", "cpu", args.data_root))), "cpu"
        )
    if args.profile:
        print(profile_run(build_suite(model, tokenizer, args.profile, args), args.top))
        return 0
    timers = Timers()
    remove = count_forwards(model, timers)
    result: dict[str, Any] = {
        "device": device_name("cpu"),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "load_average": os.getloadavg(),
        "settings": {
            "tasks": TASKS,
            "limit": args.limit,
            "runs": args.runs,
            "batch_size": args.batch_size,
            "argv": sys.argv[1:],
        },
        "variants": {},
    }
    reference: list[Any] | None = None
    for variant in (v for v in args.variants.split(",") if v):
        suite = build_suite(model, tokenizer, variant, args)
        suite.lm.loglikelihood = timers.wrap(suite.lm.loglikelihood, "loglikelihood")
        result["requests"] = sum(len(t.instances) for t in suite.task_dict["tasks"].values())
        timers.reset()
        result["variants"][variant], metrics = measure(suite, timers, args.runs)
        reference = reference or metrics
        check_same_metrics(reference, metrics, variant)
        result["variants"][variant]["metrics"] = [dataclasses.asdict(m) for m in metrics]
        print(f"{variant}: {result['variants'][variant]['median_s']}", file=sys.stderr, flush=True)
        save(result, args.out)  # a run cut short keeps the variants that finished
    remove()
    result["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    table = render(result)
    print(table)
    save(result, args.out)
    if args.out:
        print(f"wrote {args.out}")
    return 0


def save(result: dict[str, Any], out: Path | None) -> None:
    """Write the JSON to `out`, when set."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
