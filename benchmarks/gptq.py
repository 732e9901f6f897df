"""GPTQ's cost: Hessian collection per model, solves per configuration, and whole jobs against RTN's.

    python benchmarks/gptq.py --shape pythia-1.4b --device cuda --data-root .carry/data --out gptq.json

A random-weight GPT-NeoX of the shape (bf16 on CUDA) with a BPE tokenizer trained on the corpus,
calibrated on `corpus:train` windows. Per model: the shared Hessians (one forward pass over the
windows with hooks). Per configuration: the GPTQ solve with those Hessians cached (what every job
after a model's first pays), against two references measured in the same run: the floor (the
solve's GEMM FLOPs at the float32 matmul rate measured in the run) and the naive way (the
reference implementation's one matrix at a time instead of same-shaped matrices batched). Whole jobs
(restore, quantize, evaluate with the `eval=paper_ladder` suite, 500 documents a task) for RTN and
for shared-Hessian GPTQ: the issue's target is a GPTQ job at most 2x an RTN job at the 1.4B shape.
Prints a table and writes JSON (device, versions, every timing) to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.evaluation import SHAPES, build_model, device_name, device_sync  # noqa: E402

SHAPES.setdefault(
    "pythia-1.4b",
    dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=8192,
        vocab_size=50304,
    ),
)
CONFIGS = [("int", 4, 64), ("nf", 3, 64), ("fp", 4, 1024), ("int", 3, None), ("quantile", 4, 64)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration window")
    parser.add_argument("--limit", type=int, default=500, help="documents per lm-eval task in whole jobs")
    parser.add_argument(
        "--jobs", type=int, default=2, help="whole jobs per method (median of the later ones)"
    )
    parser.add_argument("--no-jobs", action="store_true", help="solves only (no evaluation)")
    parser.add_argument("--dtypes", default="int,nf,fp,quantile", help="data types of the solves to time")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def timed(fn: Any, sync: Any) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def solve_flops(weights: dict[str, Any], keep: dict[str, Any]) -> float:
    """FLOPs of GPTQ's solves: per matrix [rows, cols], the lazy updates (~2·rows·cols²) and U (~cols³)."""
    total = 0.0
    for view in weights.values():
        rows, cols = view.shape
        total += 2.0 * rows * cols * cols + 2.0 * cols**3
    return total


def float32_rate(device: str) -> float:
    """Measured float32 matmul FLOP/s (TF32 off, as the solve runs), 8192² GEMMs."""
    import torch

    n = 8192 if device.startswith("cuda") else 512
    a = torch.randn(n, n, device=device)
    sync = device_sync(device)
    a @ a
    seconds = min(timed(lambda: a @ a, sync) for _ in range(5))
    return 2.0 * n**3 / seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from pipeline.calibration import CalibrationSpec, calibration_tokens
    from pipeline.config import eval_spec, load_config
    from pipeline.methods import gptq as gptq_module
    from pipeline.methods.hessians import collect_hessians
    from pipeline.models import (
        linear_weights,
        load_model,
        quantize_model_,
        restore_weights_,
        snapshot_weights,
    )
    from pipeline.recipe import Recipe
    from pipeline.specs import ModelRef

    torch.backends.cuda.matmul.allow_tf32 = False
    sync = device_sync(args.device)
    data_root = Path(args.data_root).resolve()
    result: dict[str, Any] = {
        "shape": args.shape,
        "device": device_name(args.device),
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(args.shape, Path(tmp) / "model", args.device, data_root)
        model, tokenizer = load_model(ModelRef(str(path)), args.device)
    snapshot = snapshot_weights(model)
    weights = linear_weights(model)
    result["params"] = sum(p.numel() for p in model.parameters())
    spec = CalibrationSpec(source="corpus:train", n_samples=args.samples, seq_len=args.seq_len)
    tokens = calibration_tokens(spec, tokenizer, data_root, 2048)
    device = next(model.parameters()).device
    hessians: Any = None

    def collect() -> None:
        nonlocal hessians
        hessians = collect_hessians(model, weights, tokens, device)

    result["hessians_s"] = timed(collect, sync)
    result["hessians_gib"] = hessians.nbytes / 2**30
    checkpoint(args.out, result)
    result["calibration_tokens"] = int(tokens.numel())
    rate = float32_rate(args.device)
    result["float32_flops"] = rate
    floor_s = solve_flops(weights, {}) / rate
    rows: list[dict[str, Any]] = []
    for dtype, bits, block in [c for c in CONFIGS if c[0] in args.dtypes.split(",")]:
        recipe = Recipe(method="gptq", dtype=dtype, bits=bits, block_size=block, calibration=spec)
        key = gptq_module.hessian_key(recipe, weights)

        def solve(r: Recipe = recipe, k: tuple[Any, ...] = key) -> None:
            restore_weights_(model, snapshot)
            quantize_model_(model, r, {k: hessians}, tokens)

        restore_s = timed(lambda: restore_weights_(model, snapshot), sync)
        seconds = statistics.median(timed(solve, sync) for _ in range(2)) - restore_s
        result["solves"] = rows  # so far: a run cut by its time limit keeps what it measured
        checkpoint(args.out, result)
        rows.append(
            {"config": recipe.name, "solve_s": seconds, "floor_s": floor_s, "of_floor": floor_s / seconds}
        )
    naive = dict(rows[0])
    saved = gptq_module.solve_bytes
    gptq_module.solve_bytes = lambda device: 1  # one matrix a batch: the reference implementation's way
    recipe = Recipe(
        method="gptq", dtype=CONFIGS[0][0], bits=CONFIGS[0][1], block_size=CONFIGS[0][2], calibration=spec
    )
    key = gptq_module.hessian_key(recipe, weights)
    naive["solve_s"] = timed(lambda: quantize_model_(model, recipe, {key: hessians}, tokens), sync)
    gptq_module.solve_bytes = saved
    result["solves"] = rows
    checkpoint(args.out, result)
    result["naive_one_matrix_at_a_time_s"] = naive["solve_s"]
    if not args.no_jobs:
        cfg = load_config(["eval=paper_ladder", f"eval.data_root={data_root}", f"eval.limit={args.limit}"])
        from pipeline.evals.evaluate import Evaluator

        evaluator = Evaluator(model, tokenizer, eval_spec(cfg.eval), scorer="fast")
        jobs: dict[str, list[float]] = {"rtn": [], "gptq": []}
        cache = {key: hessians}
        for _ in range(args.jobs):
            for method in ("rtn", "gptq"):
                r = Recipe(method=method, dtype="int", bits=4, block_size=64,
                           calibration=spec if method == "gptq" else None)  # fmt: skip

                def job(r: Recipe = r) -> None:
                    restore_weights_(model, snapshot)
                    quantize_model_(model, r, cache, tokens)
                    evaluator.run()

                jobs[method].append(timed(job, sync))
        result["jobs"] = {m: statistics.median(v[1:] or v) for m, v in jobs.items()}
        result["gptq_over_rtn"] = result["jobs"]["gptq"] / result["jobs"]["rtn"]
    print(render(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


def checkpoint(out: Path | None, result: dict[str, Any]) -> None:
    """Write what has been measured so far (the final write adds the rest)."""
    if out:
        out.write_text(json.dumps(result, indent=2))


def render(result: dict[str, Any]) -> str:
    lines = [
        f"GPTQ on {result['shape']} ({result['params'] / 1e6:.0f}M params), {result['device']}",
        f"shared Hessians: {result['hessians_s']:.2f} s for {result['calibration_tokens']:,} calibration "
        "tokens, "
        f"{result['hessians_gib']:.2f} GiB (float32)",
        f"float32 matmul rate: {result['float32_flops'] / 1e12:.1f} TFLOP/s",
        "",
        "| config | solve s | GEMM floor s | floor / solve |",
        "|---|---|---|---|",
    ]
    for row in result["solves"]:
        lines.append(
            f"| {row['config']} | {row['solve_s']:.2f} | {row['floor_s']:.3f} | {row['of_floor']:.1%} |"
        )
    lines.append(f"\nnaive (one matrix at a time, {result['solves'][0]['config']}): "
                 f"{result['naive_one_matrix_at_a_time_s']:.2f} s")  # fmt: skip
    if "jobs" in result:
        jobs = result["jobs"]
        lines.append(f"whole job (int4-b64, paper_ladder suite): rtn {jobs['rtn']:.2f} s, "
                     f"gptq {jobs['gptq']:.2f} s "
                     f"= {result['gptq_over_rtn']:.2f}x (target <= 2x)")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
