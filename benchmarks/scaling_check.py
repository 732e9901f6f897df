"""Issue 7's checks on the studies of a scaling run: same rows on 1 and N GPUs, none lost or doubled.

    python benchmarks/scaling_check.py --one results/scale-1 --many results/scale-n \
        --wall-one 300 --wall-many 160 [--kill results/scale-kill] [--out scaling.json]

Per study: jobs, ok/failed jobs, duplicated (job_key, task, metric) rows, and the devices the rows
name. Across studies: the 1-GPU and N-GPU runs must hold the same job keys with every job ok, and a
study run while a worker was killed must hold every key of the same grid that the 1-GPU run holds
(its grid is the 1-GPU grid cut to fewer bit widths). Efficiency = wall(1) / (N x wall(N)), N = distinct GPUs
named by the N-GPU rows. Prints a table and writes JSON; exits 1 if a check fails.
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
    parser.add_argument("--one", type=Path, required=True, help="study run on one GPU")
    parser.add_argument("--many", type=Path, required=True, help="the same study run on N GPUs")
    parser.add_argument("--wall-one", type=float, required=True, help="seconds of the 1-GPU run")
    parser.add_argument("--wall-many", type=float, required=True, help="seconds of the N-GPU run")
    parser.add_argument("--kill", type=Path, default=None, help="study run while a worker was killed")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    args = parser.parse_args(argv)

    one, many = study_facts(args.one), study_facts(args.many)
    n_gpus = len(many["gpus"])
    checks = {
        "same keys on 1 and N GPUs": one["keys"] == many["keys"],
        "every job ok (1 GPU)": one["failed_jobs"] == 0,
        "every job ok (N GPUs)": many["failed_jobs"] == 0,
        "no duplicated rows": one["duplicated_rows"] == many["duplicated_rows"] == 0,
        "N-GPU rows name several GPUs": n_gpus > 1,
    }
    kill = None
    if args.kill is not None:
        kill = study_facts(args.kill)
        bits = set(kill["bits_by_key"].values())  # its grid is the 1-GPU grid cut to these bits
        expected = {k for k, b in one["bits_by_key"].items() if b in bits}
        checks["killed-worker run: every key once, all ok"] = (
            set(kill["keys"]) == expected and kill["failed_jobs"] == 0 and kill["duplicated_rows"] == 0
        )
    efficiency = args.wall_one / (n_gpus * args.wall_many) if n_gpus else float("nan")
    report = {
        "gpus": n_gpus,
        "jobs": many["jobs"],
        "wall_one_s": args.wall_one,
        "wall_many_s": args.wall_many,
        "jobs_per_s_one": one["jobs"] / args.wall_one,
        "jobs_per_s_many": many["jobs"] / args.wall_many,
        "speedup": args.wall_one / args.wall_many,
        "efficiency": efficiency,
        "checks": checks,
        "studies": {name: _public(s) for name, s in (("one", one), ("many", many), ("kill", kill)) if s},
    }
    print("| run | jobs | ok | failed | duplicated rows | GPUs named | wall s | jobs/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, facts, wall in (("1 GPU", one, args.wall_one), (f"{n_gpus} GPUs", many, args.wall_many)):
        rate = facts["jobs"] / wall
        print(
            f"| {name} | {facts['jobs']} | {facts['ok_jobs']} | {facts['failed_jobs']} | "
            f"{facts['duplicated_rows']} | {', '.join(facts['gpus'])} | {wall:.0f} | {rate:.2f} |"
        )
    if kill is not None:
        print(f"| killed worker | {kill['jobs']} | {kill['ok_jobs']} | {kill['failed_jobs']} | "
              f"{kill['duplicated_rows']} | {', '.join(kill['gpus'])} | - | - |")  # fmt: skip
    print(f"speed-up {report['speedup']:.2f}x on {n_gpus} GPUs: efficiency {efficiency:.1%} (target >= 90%)")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2, default=str))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
