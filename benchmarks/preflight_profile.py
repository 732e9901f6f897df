"""Where the driver's pre-flight goes: the CLI's first steps, timed and profiled, in this process.

    python benchmarks/preflight_profile.py --out p.json -- -m model.name_or_path=<dir> eval=paper_ladder

Runs what `python -m pipeline.run` does before any job (import `pipeline.run`, expand the overrides,
`check_cells`: every pre-flight check, the memory plan included) and prints the seconds of each step and
cProfile's top functions of `check_cells` by cumulative time (`--top`). Run it twice on one
`$KBIT_CACHE` to see a cold and a warm pre-flight (the model's shape and causal check are cached by its
config). Writes the step seconds and the top rows as JSON (`--out`). Nothing starts Ray or a GPU, except
with `--prestart`: Ray starts on a background thread first, as on the CLI's first line
(`pipeline.prestart`), to show whether pre-flight waits on it (its wall seconds against the main
thread's CPU seconds; Ray is stopped at the end).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def top_rows(profile: cProfile.Profile, limit: int) -> list[dict[str, object]]:
    """The `limit` functions with the most cumulative seconds: calls, cumulative s, own s, where."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(path).name}:{line}({name})", "calls": calls,
                     "cumulative_s": round(cumulative, 4), "own_s": round(own, 4)})  # fmt: skip
    return sorted(rows, key=lambda r: -float(r["cumulative_s"]))[:limit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the steps and top rows as JSON")
    parser.add_argument("--top", type=int, default=30, help="profile rows to print")
    parser.add_argument("--prestart", action="store_true", help="start Ray first, as the CLI does")
    parser.add_argument("overrides", nargs="*", help="the CLI's arguments (after --)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.prestart:
        from pipeline import prestart

        prestart.prestart(args.overrides)
    import pipeline.run as run

    imported = time.perf_counter()
    multirun, _, overrides = run.parse_argv(args.overrides)
    cells = run.expand(run.plan_sweep(overrides, multirun))
    expanded = time.perf_counter()
    early = run.start_early(cells) if args.prestart else None
    adopted = time.perf_counter()
    profile = cProfile.Profile()
    cpu = time.thread_time()
    profile.enable()
    run.check_cells(cells)
    profile.disable()
    checked, cpu = time.perf_counter(), time.thread_time() - cpu
    steps = {"import_s": imported - start, "expand_s": expanded - imported,
             "start_early_s": adopted - expanded, "preflight_s": checked - adopted,
             "preflight_thread_cpu_s": cpu}  # fmt: skip
    if early is not None:
        early.cancel()  # Ray's own start time is its `startup phase=ray_start` log line
    rows = top_rows(profile, args.top)
    print(" ".join(f"{k}={v:.2f}" for k, v in steps.items()))
    print("\n| cumulative s | own s | calls | function |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['cumulative_s']:.3f} | {r['own_s']:.3f} | {r['calls']} | {r['function']} |")
    if args.out is not None:
        result = {"steps": steps, "top": rows, "argv": args.overrides}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
