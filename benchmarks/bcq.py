"""Binary-coding quantization's cost: one square matrix per q, and whole configurations against RTN.

    python benchmarks/bcq.py --device cuda --out benchmarks/results/bcq-h200.json
    python benchmarks/bcq.py --device cpu --matrix 1024 --shape tiny --reps 1     (a quick check)

Part 1: one random [matrix, matrix] float32 weight (4096² by default) fitted with `kernels.bcq` at
q = 1..4 bit planes, block 128, fp16 scales, `--iters` refinement rounds: seconds for the fit, for the
greedy start alone, and the relative weight error ||W − Ŵ||² / ||W||² of both; RTN (`fake_quantize`,
int at the same bits where int has them, block 128) on the same matrix for scale.
Part 1 also counts the refinement rounds a block ran before it reached a fixed point (mean over blocks;
a block whose round changed neither α nor codes stops, with the result all rounds would give), times
the floor (a clone of the matrix: one read, one write) and, where `fit_blocks` takes the one-kernel path
(`kernels.triton_bcq`, CUDA), the batched torch loop it replaced (`refine_blocks`), with the share of
blocks whose α and codes both paths agree on.
Part 2: a random-weight GPT-NeoX of the shape (bf16 on CUDA) with a BPE tokenizer trained on the corpus
(`benchmarks.evaluation.build_model`, as benchmarks/allocation.py builds it) quantized as a job does it
(restore, then `quantize_model_`): rtn int3-b128 against bcq at q = 2, 3, 4 (block 128), and the target
ratio (issue 18: a BCQ configuration at most 3x an RTN one); then each as a whole job: restore, quantize
and a held-out perplexity pass (`--windows` windows of `--seq-len` tokens of the corpus' held-out split,
scored by `calibration_loss`), the ratio to RTN's job. Then the two calibrated solves with the same
Hessians (synthetic: one correlated H per input width, shared by every matrix of that width, as
layers reading one input share theirs): gptq int3-b128 against shiftadd bcq3-b128.
Prints a table and writes JSON (device, versions, every timing) to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.evaluation import SHAPES, build_model, device_name, device_sync  # noqa: E402

BLOCK = 128


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--matrix", type=int, default=4096, help="side of the square matrix of part 1")
    parser.add_argument("--shape", default="pythia-410m", choices=sorted(SHAPES), help="model of part 2")
    parser.add_argument("--iters", type=int, default=15, help="refinement rounds (bcq's default)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median) after a warm-up")
    parser.add_argument("--no-model", action="store_true", help="part 1 only")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"), help="the corpus")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of a whole job's score")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per held-out window")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def timed(fn: Callable[[], Any], reps: int, sync: Callable[[], None]) -> float:
    """Median seconds of `fn` over `reps` calls after one warm-up, the device synced around each."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matrix_rows(args: argparse.Namespace, sync: Callable[[], None]) -> list[dict[str, Any]]:
    """Part 1: fit seconds and weight error per q on one square matrix."""
    import torch

    from kernels import QuantSpec, fake_quantize
    from kernels.bcq import BCQSettings, bcq_fake_quantize, decode, greedy_fit, refine_blocks, use_triton

    gen = torch.Generator(device=args.device).manual_seed(0)
    w = torch.randn(args.matrix, args.matrix, device=args.device, generator=gen) * 0.02
    norm = float((w.double() ** 2).sum())
    rows = []
    for q in (1, 2, 3, 4):
        spec = QuantSpec("bcq", q, BLOCK)
        row: dict[str, Any] = {"q": q, "values": w.numel()}
        for label, settings in (("fit", BCQSettings(iters=args.iters)), ("greedy", BCQSettings(iters=0))):
            row[f"{label}_s"] = timed(
                functools.partial(bcq_fake_quantize, w, spec, settings), args.reps, sync
            )
            quantized = bcq_fake_quantize(w, spec, settings)
            row[f"{label}_rel_error"] = float(((w - quantized).double() ** 2).sum()) / norm
        blocks, settings = w.reshape(-1, BLOCK), BCQSettings(iters=args.iters)

        def loop(b: Any = blocks, s: Any = settings, q: int = q) -> Any:  # the batched torch loop
            return refine_blocks(b, *greedy_fit(b, q, s.scales), s)

        alpha, codes, rounds = loop()
        row["rounds_mean"] = float(rounds.double().mean())
        row["copy_s"] = timed(w.clone, args.reps, sync)  # the floor: read the weights once, write once
        row["fit_x_copy"] = row["fit_s"] / row["copy_s"]
        if q >= 2:
            row["loop_s"] = timed(lambda: decode(*loop()[:2]), args.reps, sync)
            row["kernel"] = use_triton(blocks, q, settings)
            if row["kernel"]:
                from kernels.triton_bcq import fit_blocks_triton

                k_alpha, k_codes, _, k_rounds = fit_blocks_triton(blocks, q, args.iters)
                same = (k_alpha == alpha).all(1) & (k_codes.long() == codes).all(1)
                row["same_as_loop"] = float(same.double().mean())
                row["kernel_rounds_mean"] = float(k_rounds.double().mean())
        if q >= 2:
            rtn = QuantSpec("int", q, BLOCK)
            row["rtn_int_s"] = timed(functools.partial(fake_quantize, w, rtn), args.reps, sync)
            row["rtn_int_rel_error"] = float(((w - fake_quantize(w, rtn)).double() ** 2).sum()) / norm
        rows.append(row)
    return rows


def heldout_tokens(tokenizer: Any, data_root: Path, windows: int, seq_len: int) -> Any:
    """int64 [windows, seq_len]: consecutive windows from the start of the corpus' held-out split."""
    import torch

    from pipeline.ladders.corpus import split_corpus

    text = split_corpus(data_root)[1][: windows * seq_len * 8]  # ~4 characters a token: ample
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: windows * seq_len]
    return torch.tensor(ids, dtype=torch.int64).view(windows, seq_len)


def model_rows(args: argparse.Namespace, sync: Callable[[], None]) -> dict[str, Any]:
    """Part 2: whole configurations (restore + quantize, and + a held-out score) and the calibrated solves."""
    import torch

    from pipeline.methods.sensitivity import calibration_loss
    from pipeline.models import (
        linear_weights,
        load_model,
        quantize_model_,
        restore_weights_,
        snapshot_weights,
    )
    from pipeline.recipe import Recipe
    from pipeline.specs import ModelRef

    data_root = Path(args.data_root).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(args.shape, Path(tmp) / "model", args.device, data_root)
        model, tokenizer = load_model(ModelRef(str(path)), args.device)
    heldout = heldout_tokens(tokenizer, data_root, args.windows, args.seq_len)
    snapshot = snapshot_weights(model)
    restore = timed(lambda: restore_weights_(model, snapshot), args.reps, sync)
    iters = (("iters", args.iters),)
    recipes = [Recipe(dtype="int", bits=3, block_size=BLOCK)] + [
        Recipe(method="bcq", dtype="bcq", bits=q, block_size=BLOCK, params=iters) for q in (2, 3, 4)
    ]
    configs: list[dict[str, Any]] = []
    with torch.no_grad():
        score = timed(lambda: calibration_loss(model, heldout), args.reps, sync)
        for recipe in recipes:

            def quantize(r: Recipe = recipe) -> None:
                restore_weights_(model, snapshot)
                quantize_model_(model, r)

            def job(r: Recipe = recipe) -> None:  # as a worker runs one: restore, quantize, score
                quantize(r)
                calibration_loss(model, heldout)

            row = {"config": recipe.name, "seconds": timed(quantize, args.reps, sync)}
            row["job_s"] = timed(job, args.reps, sync)
            row["heldout_ppl"] = math.exp(float(calibration_loss(model, heldout)))
            configs.append(row)
    for row in configs:
        row["x_rtn"] = row["seconds"] / configs[0]["seconds"]
        row["job_x_rtn"] = row["job_s"] / configs[0]["job_s"]
    weights = linear_weights(model)
    result = {
        "shape": args.shape,
        "params": sum(p.numel() for p in model.parameters()),
        "matrices": len(weights),
        "restore_s": restore,
        "score_s": score,
        "heldout_tokens": int(heldout.numel()),
        "configs": configs,
        "bcq3_over_rtn3": configs[2]["x_rtn"],
        "bcq3_job_over_rtn3_job": configs[2]["job_x_rtn"],
    }
    result["solves"] = solve_rows(model, snapshot, weights, args, sync)
    return result


def solve_rows(model: Any, snapshot: Any, weights: Any, args: argparse.Namespace, sync: Any) -> list[dict]:
    """gptq int3 against shiftadd bcq3 (block 128) with the same synthetic Hessians."""
    import torch

    from pipeline.calibration import CalibrationSpec
    from pipeline.methods.gptq import hessian_key
    from pipeline.methods.hessians import Hessians
    from pipeline.models import quantize_model_, restore_weights_
    from pipeline.recipe import Recipe

    hessians = Hessians()
    gen = torch.Generator(device=args.device).manual_seed(1)
    for name, view in weights.items():
        width = f"in{view.shape[1]}"
        if width not in hessians.h:
            x = torch.randn(view.shape[1], 2 * view.shape[1], device=args.device, generator=gen)
            hessians.h[width] = 2 * x @ x.T / x.shape[1] + 0.1 * torch.eye(view.shape[1], device=args.device)
        hessians.owner[name] = width
    spec = CalibrationSpec(source="corpus:train")
    tokens = torch.zeros(1, 2, dtype=torch.long)  # never read: the Hessians are in the cache
    rows = []
    for recipe in (
        Recipe(method="gptq", dtype="int", bits=3, block_size=BLOCK, calibration=spec),
        Recipe(method="shiftadd", dtype="bcq", bits=3, block_size=BLOCK, calibration=spec,
               params=(("iters", args.iters),)),
    ):  # fmt: skip
        cache = {hessian_key(recipe, weights): hessians}

        def job(r: Recipe = recipe, c: dict = cache) -> None:
            restore_weights_(model, snapshot)
            quantize_model_(model, r, c, tokens)

        rows.append({"config": recipe.name, "seconds": timed(job, max(1, args.reps - 1), sync)})
    return rows


def render(result: dict[str, Any]) -> str:
    lines = [f"BCQ on {result['device']} (torch {result['torch']})", "",
             f"one {result['matrix']}x{result['matrix']} matrix, block {BLOCK}, {result['iters']} rounds:",
             "| q | fit s | x copy | torch loop s | same as loop | greedy s | rel. error fit "
             "| rel. error greedy | rtn int s | rel. error rtn int | rounds run (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["matrix_rows"]:
        rtn = f"{r['rtn_int_s']:.4f} | {r['rtn_int_rel_error']:.4f}" if "rtn_int_s" in r else "- | -"
        loop = f"{r['loop_s']:.4f}" if "loop_s" in r else "-"
        same = f"{r['same_as_loop']:.4f}" if "same_as_loop" in r else "-"
        lines.append(f"| {r['q']} | {r['fit_s']:.4f} | {r['fit_x_copy']:.1f} | {loop} | {same} | "
                     f"{r['greedy_s']:.4f} | {r['fit_rel_error']:.4f} | {r['greedy_rel_error']:.4f} | "
                     f"{rtn} | {r['rounds_mean']:.2f} |")  # fmt: skip
    model = result.get("model")
    if model:
        lines += ["", f"whole configuration, {model['shape']} ({model['params'] / 1e6:.0f}M params, "
                  f"{model['matrices']} matrices; restore {model['restore_s']:.3f} s; held-out score of "
                  f"{model['heldout_tokens']:,} tokens {model['score_s']:.3f} s):",
                  "| config | restore + quantize s | x rtn | + held-out score s | x rtn | held-out ppl |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {c['config']} | {c['seconds']:.3f} | {c['x_rtn']:.2f} | {c['job_s']:.3f} | "
                  f"{c['job_x_rtn']:.2f} | {c['heldout_ppl']:.1f} |" for c in model["configs"]]  # fmt: skip
        lines.append(f"bcq3 / rtn int3: {model['bcq3_over_rtn3']:.2f}x quantize only, "
                     f"{model['bcq3_job_over_rtn3_job']:.2f}x whole job (target <= 3x)")  # fmt: skip
        lines += ["", "| calibrated solve (cached Hessians) | seconds |", "|---|---|"]
        lines += [f"| {s['config']} | {s['seconds']:.3f} |" for s in model["solves"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    sync = device_sync(args.device)
    result: dict[str, Any] = {"device": device_name(args.device), "torch": torch.__version__,
                              "matrix": args.matrix, "iters": args.iters, "block_size": BLOCK}  # fmt: skip
    result["matrix_rows"] = matrix_rows(args, sync)
    if not args.no_model:
        result["model"] = model_rows(args, sync)
    print(render(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
