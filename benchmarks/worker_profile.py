"""Where a worker's start goes, step by step, outside Ray: the imports a Ray worker makes before the actor
begins, torch and the CUDA context, the job modules, and the model load against a bare safetensors read.

    python benchmarks/worker_profile.py --model <saved model dir> --out worker-profile.json

Each step runs the way a worker runs it (`pipeline.worker.import_job_modules`, `pipeline.models.load_model`),
in this one fresh process, in the worker's order; the Ray worker's own imports are timed in a child with
`python -X importtime` (top modules by cumulative time, nesting depth <= 4), and so are the driver's
(`import pipeline.run`). The load is profiled (cProfile, top rows) and compared with its floors: reading
the weight files from the page cache, and `safetensors.torch.load_file` straight onto the device.
Prints the steps and writes them as JSON. A diagnosis, not a pass/fail check.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RAY_WORKER_IMPORTS = "import ray; import pipeline.cluster; import pipeline.worker"
DRIVER_IMPORTS = "import pipeline.run"  # what `python -m pipeline.run` imports before its first line


def importtime_top(code: str, limit: int) -> dict[str, Any]:
    """Run `code` in a fresh `python -X importtime`; its wall seconds and the `limit` slowest top-level
    imports by cumulative time (what each import statement of `code` cost, its own imports included)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - start
    rows: list[tuple[float, int, str]] = []  # (cumulative s, depth, module)
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue  # the header line, or anything else on stderr
        name = parts[2][1:]  # one space, then two per level of nesting
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append((int(parts[1]) / 1e6, depth, name.strip()))
    top = [{"module": m, "depth": d, "cumulative_s": s} for s, d, m in sorted(rows, reverse=True) if d <= 4]
    return {"wall_s": round(wall, 3), "top": top[:limit]}


def profile_rows(profile: cProfile.Profile, limit: int, key: str) -> list[dict[str, Any]]:
    """The `limit` functions with the most `key` ("cumulative_s" or "own_s") seconds."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = [
        {"function": f"{Path(path).name}:{line}({name})", "calls": calls, "cumulative_s": round(cum, 4),
         "own_s": round(own, 4)}
        for (path, line, name), (_, calls, own, cum, _) in stats.stats.items()  # type: ignore[attr-defined]
    ]  # fmt: skip
    return sorted(rows, key=lambda r: -float(r[key]))[:limit]


def timed(steps: dict[str, float], name: str, fn: Any, profile: cProfile.Profile | None = None) -> Any:
    """Run `fn()`, record its seconds under `name` (under `profile` when given); returns its result."""
    start = time.perf_counter()
    if profile is not None:
        profile.enable()
    try:
        return fn()
    finally:
        if profile is not None:
            profile.disable()
        steps[name] = round(time.perf_counter() - start, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a saved model directory")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "model": str(args.model),
        "ray_worker_imports": importtime_top(RAY_WORKER_IMPORTS, args.top),
        "driver_imports": importtime_top(DRIVER_IMPORTS, args.top),
    }
    steps: dict[str, float] = {}
    torch = timed(steps, "import_torch", lambda: __import__("torch"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        timed(steps, "cuda_init", lambda: torch.zeros(1, device="cuda").sum().item())
    from pipeline.worker import import_job_modules

    imports = cProfile.Profile()
    modules = timed(steps, "job_modules", import_job_modules, imports)
    result["job_modules"] = {name: round(s, 3) for name, s in modules.items()}
    result["job_modules_top_own"] = profile_rows(imports, args.top, "own_s")
    from pipeline.models import load_model
    from pipeline.specs import ModelRef

    files = sorted(args.model.glob("*.safetensors"))
    timed(steps, "read_files", lambda: sum(len(f.read_bytes()) for f in files))  # page cache, warm by now
    load = cProfile.Profile()
    model, _ = timed(steps, "load_model", lambda: load_model(ModelRef(str(args.model)), device), load)
    result["load_top_cumulative"] = profile_rows(load, args.top, "cumulative_s")
    result["load_top_own"] = profile_rows(load, args.top, "own_s")
    del model
    from safetensors.torch import load_file

    def bare() -> int:
        tensors = [load_file(str(f), device=device) for f in files]
        if device == "cuda":
            torch.cuda.synchronize()
        return sum(t.numel() for part in tensors for t in part.values())

    timed(steps, "safetensors_to_device", bare)
    timed(steps, "load_model_again", lambda: load_model(ModelRef(str(args.model)), device))
    result["steps"] = steps
    result["weight_bytes"] = sum(f.stat().st_size for f in files)
    if args.out:  # before the printout, so that nothing printed can lose the measurement
        args.out.write_text(json.dumps(result, indent=1))
    print(" ".join(f"{k}={v}" for k, v in steps.items()))
    for part in ("driver_imports", "ray_worker_imports"):
        print(f"{part} (python -X importtime): {result[part]['wall_s']} s")
        for row in result[part]["top"][:14]:
            print(f"  {row['cumulative_s']:.3f} s  {'  ' * row['depth']}{row['module']}")
    print("job modules:", result["job_modules"])
    for title, key in (("load, cumulative", "load_top_cumulative"), ("load, own", "load_top_own"),
                       ("job modules, own", "job_modules_top_own")):  # fmt: skip
        print(f"\n{title}:")
        for row in result[key][:14]:
            print(f"  {row['cumulative_s']:8.3f} {row['own_s']:8.3f} {row['calls']:6} {row['function']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
