"""Results at scale (issue 17, item 5): open a 35,000-job study before and after compaction.

    python benchmarks/results_scale.py [--jobs 35000] [--template results/h100-ladder-heldout-paired]
        [--dir /tmp/kbit-results-scale] [--out benchmarks/results/results_scale-cpu.json] [--no-report]
    python benchmarks/results_scale.py --report-only [--jobs 35000] [--out ...]

Builds a synthetic study of `--jobs` jobs from a real study (`--template`): its jobs replicated into
families `<family>-r<k>` (model label and job JSON renamed, so each copy is a distinct job with its
own key), each job written as its own file by the real row writer (`results.write_job_rows`), as
workers write them. Then it times, on this machine:
- `job_status` (what planning reads) and `load_results` on the per-job files;
- `python -m pipeline.compact` (as a subprocess, the CLI);
- `job_status` and `load_results` on the compacted study;
- `python -m analysis.report` on the compacted study (a subprocess; `--report-timeout` caps it).
`--report-only` writes the same study straight as one compacted part (what compaction leaves) and
times only `load_results` and the report (wall clock, the report's CPU seconds over all its processes,
and the 1-minute load average before and after it: the machine may be shared).
Prints a table and writes the figures as JSON. Timings are one run each (wall clock, seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402

from pipeline.resultlayout import COMPACT_PREFIX  # noqa: E402
from pipeline.results import (  # noqa: E402
    job_status,
    load_results,
    rows_to_table,
    study_files,
    write_job_rows,
)


def template_jobs(template: Path) -> list[list[dict[str, Any]]]:
    """The template study's rows, grouped by job (file order)."""
    frame = load_results(template)
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    jobs: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        for name in ("unit_sums", "unit_counts"):
            if row[name] is not None:
                row[name] = [float(x) for x in row[name]]
        jobs.setdefault(row["job_key"], []).append(row)
    return list(jobs.values())


def replica(rows: list[dict[str, Any]], copy: int, study: str) -> tuple[str, list[dict[str, Any]]]:
    """One template job as copy `copy`: a distinct model label and family, hence a distinct key."""
    first = rows[0]
    suffix = f"-r{copy}"
    model, family = f"{first['model']}{suffix}", f"{first['model_family']}{suffix}"
    job = json.loads(first["job_json"])
    job["model"] = {**job["model"], "replica": copy}
    job_json = json.dumps(job, sort_keys=True, separators=(",", ":"))
    key = hashlib.sha256(job_json.encode()).hexdigest()
    fields = {"job_key": key, "study": study, "model": model, "model_family": family, "job_json": job_json}
    return key, [{**row, **fields} for row in rows]


def _write_share(args: tuple[Path, Path, int, int, int]) -> int:
    template, study_dir, n_jobs, start, step = args
    jobs = template_jobs(template)
    written = 0
    for index in range(start, n_jobs, step):
        key, rows = replica(jobs[index % len(jobs)], index // len(jobs), study_dir.name)
        write_job_rows(study_dir, key, rows)
        written += 1
    return written


def build_compacted(template: Path, study_dir: Path, n_jobs: int) -> float:
    """The same synthetic study written straight as ONE compacted part (what `pipeline.compact`
    leaves), for timing the report without building and compacting 35,000 files first."""
    if study_dir.exists():
        shutil.rmtree(study_dir)
    study_dir.mkdir(parents=True)
    start = time.perf_counter()
    jobs = template_jobs(template)
    rows = [
        row
        for index in range(n_jobs)
        for row in replica(jobs[index % len(jobs)], index // len(jobs), study_dir.name)[1]
    ]
    pq.write_table(rows_to_table(rows), study_dir / f"{COMPACT_PREFIX}000001-{'0' * 8}.parquet")
    return time.perf_counter() - start


def build_study(template: Path, study_dir: Path, n_jobs: int, processes: int) -> float:
    if study_dir.exists():
        shutil.rmtree(study_dir)
    start = time.perf_counter()
    shares = [(template, study_dir, n_jobs, i, processes) for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        assert sum(pool.map(_write_share, shares)) == n_jobs
    return time.perf_counter() - start


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def run_cli(argv: list[str], timeout: float) -> tuple[float, int | None]:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    try:
        rc: int | None = subprocess.run(
            argv, cwd=ROOT, env=env, timeout=timeout, capture_output=True
        ).returncode
    except subprocess.TimeoutExpired:
        rc = None
    return time.perf_counter() - start, rc


def children_cpu_s() -> float:
    """CPU seconds (user + system) of the finished child processes so far, their children included:
    on a machine shared with other work, what a command cost apart from waiting for a core."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=35_000)
    parser.add_argument("--template", type=Path, default=ROOT / "results" / "h100-ladder-heldout-paired")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/kbit-results-scale"))
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "results_scale-cpu.json"
    )
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="writers of the study")
    parser.add_argument("--reuse", action="store_true", help="reuse an uncompacted study of --jobs jobs")
    parser.add_argument("--no-report", action="store_true", help="skip timing analysis.report")
    parser.add_argument("--report-timeout", type=float, default=600.0)
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the study as one compacted part and time only load_results and analysis.report",
    )
    args = parser.parse_args()
    study = args.dir / "synthetic-35k"
    figures: dict[str, Any] = {
        "device": f"CPU ({os.cpu_count()} cores, {platform.machine()}; the machine may be shared: see the "
        "1-minute load averages)",
        "command": " ".join(["python", *sys.argv]),
        "jobs": args.jobs,
        "template": str(args.template),
        "cpus": os.cpu_count(),
    }
    figures["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    if args.report_only:
        return report_only(args, study, figures)
    if args.reuse and len(study_files(study)) == args.jobs:  # an uncompacted study a last run built
        figures["build_s"] = None
    else:
        figures["build_s"] = build_study(args.template, study, args.jobs, args.processes)
    figures["files_before"] = len(study_files(study))
    figures["job_status_before_s"], status = timed(job_status, study)
    figures["load_before_s"], frame = timed(load_results, study)
    figures["rows"] = len(frame)
    assert len(status) == args.jobs
    del frame
    figures["compact_s"], rc = run_cli([sys.executable, "-m", "pipeline.compact", str(study)], 1800)
    assert rc == 0, f"compaction failed (rc {rc})"
    figures["files_after"] = len(study_files(study))
    figures["bytes_after"] = sum(p.stat().st_size for p in study_files(study))
    figures["job_status_after_s"], after = timed(job_status, study)
    figures["load_after_s"], frame = timed(load_results, study)
    assert after == status and len(frame) == figures["rows"]
    del frame
    if not args.no_report:
        argv = [sys.executable, "-m", "analysis.report", str(study), "--out", str(args.dir / "report")]
        figures["report_s"], figures["report_rc"] = run_cli(argv, args.report_timeout)
    return emit(figures, args.out)


def report_only(args: argparse.Namespace, study: Path, figures: dict[str, Any]) -> int:
    """`--report-only`: the compacted study written directly, then load_results and the report."""
    figures["build_compacted_s"] = build_compacted(args.template, study, args.jobs)
    figures["load_after_s"], frame = timed(load_results, study)
    figures["rows"] = len(frame)
    del frame
    argv = [sys.executable, "-m", "analysis.report", str(study), "--out", str(args.dir / "report")]
    figures["load_average_before"] = os.getloadavg()[0]
    cpu = children_cpu_s()
    figures["report_s"], figures["report_rc"] = run_cli(argv, args.report_timeout)
    figures["report_cpu_s"] = children_cpu_s() - cpu
    figures["load_average_after"] = os.getloadavg()[0]
    return emit(figures, args.out)


def emit(figures: dict[str, Any], out: Path) -> int:
    """Print the figures as a table and write them as JSON to `out`."""
    print(f"{'measure':<28}{'value':>14}")
    for name, value in figures.items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{name:<28}{shown:>14}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
