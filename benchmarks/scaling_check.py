"""Issue 7's checks on the studies of a scaling run: same rows on 1 and N GPUs, none lost or doubled.

    python benchmarks/scaling_check.py --one results/scale-1 --many results/scale-n \
        --wall-one 300 --wall-many 160 [--out scaling.json]
    python benchmarks/scaling_check.py --kill results/paper-ppl --kill-jobs 1206 [--out kill.json]

Per study: jobs, ok/failed jobs, duplicated (job_key, task, metric) rows, and the devices the rows
name. Scaling: the 1-GPU and N-GPU runs must hold the same job keys with every job ok; efficiency =
wall(1) / (N x wall(N)), N = distinct GPUs named by the N-GPU rows. Killed worker: the study run
while a worker was killed must hold exactly the `--kill-jobs` jobs it planned, each once, all ok.
Prints a table and writes JSON; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.results import STATUS_OK, load_results  # noqa: E402


def study_facts(path: Path) -> dict:
    """Counts of one study folder's rows."""
    rows = load_results(path)
    per_job = rows.groupby("job_key")["status"].agg(lambda s: (s == STATUS_OK).all())
    duplicated = int(rows.duplicated(["job_key", "task", "metric"]).sum())
    gpus = sorted(rows["device"].str.rpartition("/")[2].unique())
    return {
        "path": str(path),
        "jobs": int(per_job.size),
        "ok_jobs": int(per_job.sum()),
        "failed_jobs": int((~per_job).sum()),
        "rows": len(rows),
        "duplicated_rows": duplicated,
        "devices": sorted(rows["device"].unique()),
        "gpus": gpus,
        "keys": sorted(per_job.index),
        "bits_by_key": rows.drop_duplicates("job_key").set_index("job_key")["bits"].astype(int).to_dict(),
    }


def _public(facts: dict) -> dict:
    return {f: v for f, v in facts.items() if f not in ("keys", "bits_by_key")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", type=Path, help="study run on one GPU")
    parser.add_argument("--many", type=Path, help="the same study run on N GPUs")
    parser.add_argument("--wall-one", type=float, help="seconds of the 1-GPU run")
    parser.add_argument("--wall-many", type=float, help="seconds of the N-GPU run")
    parser.add_argument("--kill", type=Path, default=None, help="study run while a worker was killed")
    parser.add_argument("--kill-jobs", type=int, default=None, help="jobs that study planned")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    args = parser.parse_args(argv)
    if args.one is None and args.kill is None:
        parser.error("give --one/--many/--wall-one/--wall-many, or --kill/--kill-jobs, or both")
    report: dict = {"checks": {}}
    if args.one is not None:
        if None in (args.many, args.wall_one, args.wall_many):
            parser.error("--one needs --many, --wall-one and --wall-many")
        report.update(scaling(args.one, args.many, args.wall_one, args.wall_many, report["checks"]))
    if args.kill is not None:
        if args.kill_jobs is None:
            parser.error("--kill needs --kill-jobs")
        kill = study_facts(args.kill)
        print(
            f"killed-worker run: {kill['jobs']} jobs (planned {args.kill_jobs}), {kill['ok_jobs']} ok, "
            f"{kill['failed_jobs']} failed, {kill['duplicated_rows']} duplicated rows, GPUs {kill['gpus']}"
        )
        report["checks"]["killed-worker run: every planned job once, all ok"] = (
            kill["jobs"] == kill["ok_jobs"] == args.kill_jobs and kill["duplicated_rows"] == 0
        )
        report["kill"] = _public(kill)
    for name, ok in report["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2, default=str))
    return 0 if all(report["checks"].values()) else 1


def scaling(one_path: Path, many_path: Path, wall_one: float, wall_many: float, checks: dict) -> dict:
    """The 1-GPU versus N-GPU comparison; adds its checks to `checks`."""
    one, many = study_facts(one_path), study_facts(many_path)
    n_gpus = len(many["gpus"])
    checks.update(
        {
            "same keys on 1 and N GPUs": one["keys"] == many["keys"],
            "every job ok (1 GPU)": one["failed_jobs"] == 0,
            "every job ok (N GPUs)": many["failed_jobs"] == 0,
            "no duplicated rows": one["duplicated_rows"] == many["duplicated_rows"] == 0,
            "N-GPU rows name several GPUs": n_gpus > 1,
        }
    )
    efficiency = wall_one / (n_gpus * wall_many) if n_gpus else float("nan")
    print("| run | jobs | ok | failed | duplicated rows | GPUs named | wall s | jobs/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, facts, wall in (("1 GPU", one, wall_one), (f"{n_gpus} GPUs", many, wall_many)):
        rate = facts["jobs"] / wall
        print(
            f"| {name} | {facts['jobs']} | {facts['ok_jobs']} | {facts['failed_jobs']} | "
            f"{facts['duplicated_rows']} | {', '.join(facts['gpus'])} | {wall:.0f} | {rate:.2f} |"
        )
    print(
        f"speed-up {wall_one / wall_many:.2f}x on {n_gpus} GPUs: efficiency {efficiency:.1%} (target >= 90%)"
    )
    return {
        "gpus": n_gpus,
        "jobs": many["jobs"],
        "wall_one_s": wall_one,
        "wall_many_s": wall_many,
        "jobs_per_s_one": one["jobs"] / wall_one,
        "jobs_per_s_many": many["jobs"] / wall_many,
        "speedup": wall_one / wall_many,
        "efficiency": efficiency,
        "one": _public(one),
        "many": _public(many),
    }


if __name__ == "__main__":
    sys.exit(main())
