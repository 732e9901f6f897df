"""Start-up benchmark: seconds from `python -m pipeline.run` to a sweep's first row, cold and warm.

    python benchmarks/startup.py --shape pythia-1.4b --out benchmarks/results/startup-h200.json   # GPU
    python benchmarks/startup.py --shape tiny --eval smoke --out startup-cpu.json                 # CPU

1. Builds a random-weight GPT-NeoX of the shape (bf16 on CUDA, float32 on CPU) with a BPE tokenizer
   trained on the corpus (as benchmarks/evaluation.py does) and saves both with `save_pretrained`.
2. Runs the real CLI, `python -m pipeline.run -m`, as a subprocess on a 5-job grid of that model
   (int, 3/4/5/6/8 bits, block 64; `--eval`, paper_ladder by default) twice: cold (a fresh
   `$KBIT_CACHE`, which holds inductor's cache and the evaluation cache) and warm (the same cache, a
   fresh results folder). Per run it records, from the command's start: when each result file
   (`<job key>.parquet`) appeared, hence the first and the last row and the steady state per job
   (the median gap between result files after the first); the driver's own lines (Ray started,
   planned); the driver's and the worker's `startup phase=...` lines (`pipeline.startup`: the
   driver's imports, config, pre-flight and plan, Ray's start and the workers' creation; the worker's
   start with its parts, model load, snapshot, Evaluator build with its parts and cache hits, first
   job with its parts); the command's
   wall time; and the per-job seconds the rows hold (restore + quantize + evaluate).
3. `--runs cold,warm,kept-1,kept-2` adds sweeps on a cluster started with `ray start --head` (the
   machine's CPUs and GPUs) with `ray.address=auto ray.keep_workers=true` (`pipeline.kept`), into
   studies of one results folder: the first starts the kept worker, the next finds it with its model
   resident (the warm case of a researcher's next command); at the end the kept workers are released and
   the cluster stopped. The runs share one cache (only the first is cold); the JSON is rewritten after
   each run, so a cut run keeps what finished.
4. Prints a table and writes JSON (`--out`; the table goes next to it as .md).

One command, within ~5 minutes on one H200 at the 1.4B shape (model build ~30 s, two sweeps).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data"

from benchmarks.evaluation import SHAPES, build_model  # noqa: E402

GRID = ("quant.dtype=int", "quant.bits=3,4,5,6,8", "quant.block_size=64")  # 5 jobs
PHASE = re.compile(r"startup phase=(\w+) s=([0-9.]+) at=([0-9.]+)(.*)$")
DRIVER_LINES = {  # what the driver logs -> the name of its mark
    "ray_started": re.compile(r"Started a local Ray instance"),
    "planned": re.compile(r"planned in [0-9.]+s"),
    "dispatch": re.compile(r"\d+ worker\(s\), each"),
}
RUNS = ("cold", "warm")
# `startup phase=` lines (pipeline.startup), in the order they happen
DRIVER_PHASES = ("driver_imports", "driver_config", "ray_start", "driver_preflight", "workers_created",
                 "driver_plan")  # fmt: skip
WORKER_PHASES = ("worker_init", "model_load", "snapshot", "evaluator_build", "first_job")
PHASE_PARTS = {  # the facts of a phase line shown in the table
    "worker_init": ("process", "torch", "device_query", "job_modules"),
    "evaluator_build": ("texts", "kl", "tasks", "compile", "cache"),
    "first_job": ("load", "restore", "quantize", "eval"),
}


def sweep_command(
    model: Path, eval_name: str, data_root: Path, results: Path, extra: list[str], study: str = "startup"
) -> list[str]:
    """The CLI call: the 5-job grid on `model`, results under `results`/`study`."""
    return [
        sys.executable, "-m", "pipeline.run", "-m", f"model.name_or_path={model}", f"eval={eval_name}",
        f"eval.data_root={data_root}", *GRID, f"results_root={results}", f"study={study}", *extra,
    ]  # fmt: skip


def start_head(env: dict[str, str]) -> subprocess.Popen[str]:
    """`ray start --head --block` (this machine's CPUs and GPUs), once it has recorded the cluster for
    `ray.address=auto`; stop it with `stop_head`."""
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats",
         "--include-dashboard=false"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env,
        cwd=ROOT,
    )  # fmt: skip
    assert head.stdout is not None
    for line in head.stdout:
        if "block forever" in line:
            return head
    raise RuntimeError(f"ray start --head exited with {head.wait()}")


def stop_head(head: subprocess.Popen[str], env: dict[str, str]) -> None:
    """Release the kept workers, then stop the cluster `start_head` started."""
    release = [sys.executable, "-m", "pipeline.kept", "release", "--address", "auto"]
    subprocess.run(release, cwd=ROOT, env=env, capture_output=True, timeout=120)
    os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its cluster on SIGTERM
    head.wait(timeout=120)


def sweep_env(cache: Path) -> dict[str, str]:
    """The child's environment: its own $KBIT_CACHE (inductor's cache under it), offline, every
    worker line shown (Ray merges repeated lines across workers otherwise)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(KBIT_CACHE=str(cache), RAY_DEDUP_LOGS="0", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def watch_results(folder: Path, seen: dict[str, float], t0: float, stop: threading.Event) -> None:
    """Record when each `<job key>.parquet` first appears under `folder` (seconds after `t0`)."""
    pattern = re.compile(r"[0-9a-f]{64}\.parquet")
    while True:
        done = stop.is_set()
        if folder.is_dir():
            for path in folder.rglob("*.parquet"):
                if pattern.fullmatch(path.name) and path.name not in seen:
                    seen[path.name] = time.perf_counter() - t0
        if done:
            return
        time.sleep(0.05)


def parse_lines(lines: list[tuple[float, str]], t0_epoch: float) -> dict[str, Any]:
    """Worker phases (first of each name: seconds, end time after the start, facts) and driver marks."""
    phases: dict[str, Any] = {}
    marks: dict[str, float] = {}
    for at, line in lines:
        match = PHASE.search(line)
        if match and match.group(1) not in phases:
            name, seconds, end = match.group(1), float(match.group(2)), float(match.group(3))
            facts = dict(item.split("=", 1) for item in match.group(4).split() if "=" in item)
            phases[name] = {"s": seconds, "end_s": round(end - t0_epoch, 3), **facts}
            continue
        for mark, pattern in DRIVER_LINES.items():
            if mark not in marks and pattern.search(line):
                marks[mark] = round(at, 3)
    return {"phases": phases, "driver": marks}


def row_job_seconds(folder: Path) -> list[float]:
    """restore + quantize + evaluate seconds per job, from the rows (one value per job file)."""
    import pyarrow.parquet as pq

    seconds = []
    for path in sorted(folder.rglob("*.parquet")):
        table = pq.read_table(path, columns=["restore_s", "quantize_s", "eval_s"]).slice(0, 1).to_pylist()
        if table:
            seconds.append(sum(v or 0.0 for v in table[0].values()))
    return seconds


def run_sweep(command: list[str], env: dict[str, str], results: Path, timeout_s: float) -> dict[str, Any]:
    """Run the CLI once; the times of its result files, its lines and its phases."""
    seen: dict[str, float] = {}
    lines: list[tuple[float, str]] = []
    stop = threading.Event()
    t0, t0_epoch = time.perf_counter(), time.time()
    child = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    watcher = threading.Thread(target=watch_results, args=(results, seen, t0, stop), daemon=True)
    watcher.start()
    assert child.stdout is not None
    reader = threading.Thread(
        target=lambda: lines.extend((time.perf_counter() - t0, line.rstrip()) for line in child.stdout or []),
        daemon=True,
    )
    reader.start()
    try:
        rc = child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        rc = child.wait()
    wall = time.perf_counter() - t0
    reader.join(timeout=10)
    stop.set()
    watcher.join()
    times = sorted(seen.values())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    per_job = row_job_seconds(results)
    return {
        "rc": rc,
        "wall_s": round(wall, 3),
        "rows": len(times),
        "first_row_s": round(times[0], 3) if times else None,
        "last_row_s": round(times[-1], 3) if times else None,
        "steady_job_s": round(statistics.median(gaps), 3) if gaps else None,
        "row_job_s": round(statistics.median(per_job[1:]), 3) if len(per_job) > 1 else None,
        "row_times_s": [round(t, 3) for t in times],
        **parse_lines(lines, t0_epoch),
        "log_tail": [line for _, line in lines[-40:]] if rc != 0 else [],
    }


def device_name(device: str) -> str:
    import torch

    return (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    )


def fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def render(result: dict[str, Any]) -> str:
    """The table: per run, the first row, the last, the steady state and the worker's phases."""
    header = f"{result['device']}; {result['shape']}, eval={result['eval']}, {result['jobs']} jobs"
    runs = result["runs"]
    lines = [header, "", "| | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]

    def row(label: str, get: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(fmt(get(run)) for run in runs.values()) + " |")

    row("first row s (from the command's start)", lambda r: r["first_row_s"])
    row("last row s", lambda r: r["last_row_s"])
    row("whole command s", lambda r: r["wall_s"])
    row("steady state s/job (gap between rows)", lambda r: r["steady_job_s"])
    row("per-job s in the rows (restore+quantize+eval)", lambda r: r["row_job_s"])
    for mark in DRIVER_LINES:
        row(f"driver: {mark} at s", lambda r, m=mark: r["driver"].get(m))
    for phase in DRIVER_PHASES:
        row(f"driver: {phase} s (ends at s)", lambda r, p=phase: _phase_cell(r, p))
    for phase in WORKER_PHASES:
        row(f"worker: {phase} s (ends at s)", lambda r, p=phase: _phase_cell(r, p))
    for phase, parts in PHASE_PARTS.items():
        row(f"{phase} parts s", lambda r, p=phase, k=parts: _parts(r, p, k))
    return "\n".join(lines)


def _phase_cell(run: dict[str, Any], name: str) -> str | None:
    phase = run["phases"].get(name)
    return None if phase is None else f"{phase['s']:.2f} ({phase['end_s']:.1f})"


def _parts(run: dict[str, Any], name: str, keys: tuple[str, ...]) -> str | None:
    phase = run["phases"].get(name)
    return None if phase is None else " ".join(f"{k}={phase[k]}" for k in keys if k in phase)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="pythia-1.4b")
    parser.add_argument("--eval", default="paper_ladder", help="an eval config of conf/eval (CPU: smoke)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="model, caches, results (default: a temp dir)"
    )
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per sweep before it is killed")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (the table goes next to it, .md)")
    parser.add_argument(
        "--runs", default=",".join(RUNS),
        help="sweeps in order on one cache (the first is cold): cold/warm on an embedded cluster, kept-* on "
        "a `ray start --head` cluster with ray.keep_workers=true, e.g. cold,warm,kept-1,kept-2",
    )  # fmt: skip
    parser.add_argument("extra", nargs="*", help="more overrides for both sweeps, e.g. ray.max_workers=1")
    return parser.parse_args(argv)


def write(result: dict[str, Any], out: Path | None) -> str:
    """The table of `result`; with `out`, the JSON there and the table next to it (.md)."""
    table = render(result)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kbit-startup-"))
    data_root = args.data_root.resolve()
    start = time.perf_counter()
    model = build_model(args.shape, workdir / "model", device, data_root)
    build_s = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.empty_cache()  # the builder's copy goes; the sweep's worker loads its own
    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # cold: nothing cached, inductor's cache included
    result: dict[str, Any] = {
        "device": device_name(device), "torch": torch.__version__, "shape": args.shape, "eval": args.eval,
        "jobs": 5, "grid": list(GRID), "extra": args.extra, "model_build_s": round(build_s, 1), "runs": {},
    }  # fmt: skip
    env = sweep_env(cache)
    head: subprocess.Popen[str] | None = None
    try:
        for name in args.runs.split(","):
            kept = name.startswith("kept")
            if kept and head is None:
                head = start_head(env)  # its workers get the sweeps' environment: the same $KBIT_CACHE
            results = workdir / ("results-kept" if kept else f"results-{name}")
            study = name if kept else "startup"  # kept runs share a results root (part of a worker's name)
            shutil.rmtree(results / study, ignore_errors=True)
            extra = [*args.extra, *(("ray.address=auto", "ray.keep_workers=true") if kept else ())]
            command = sweep_command(model, args.eval, data_root, results, extra, study=study)
            result["command"] = " ".join(command[1:])
            run = result["runs"][name] = run_sweep(command, env, results / study, args.timeout)
            print(f"{name}: rc {run['rc']}, first row {run['first_row_s']} s, rows {run['rows']}", flush=True)
            if run["rc"] != 0:
                print("\n".join(run["log_tail"]), flush=True)
            write(result, args.out)  # what is done so far survives a cut
    finally:
        if head is not None:
            stop_head(head, env)
    print(write(result, args.out))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(run["rc"] == 0 for run in result["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
