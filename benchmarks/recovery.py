"""Recovery training speed: adapter steps per second for LoRA, VB-LoRA and Shears' elastic LoRA.

    python benchmarks/recovery.py --shape pythia-410m --device cuda --data-root .carry/data \
        --out recovery.json

A random-weight GPT-NeoX of the shape (bf16 on CUDA) with a BPE tokenizer trained on the corpus,
quantized with RTN (int, 4 bits, block 64), then for each method the adapters of `sweeps/recovery.yaml`
(rank 8; VB-LoRA 32 vectors of 32; Shears ranks [4, 8, 16] within the budget of rank 8) are attached
and trained on `corpus:train` windows: a few warm-up steps, then `--steps` timed ones
(`pipeline.recovery.train_adapters_`, the worker's loop; Shears samples its ranks per layer each step).
Shears' search (greedy, one held-out pass per candidate) and its cut to the chosen ranks are timed
apart. Prints a table and writes JSON (device, versions, every timing) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.evaluation import SHAPES, build_model, device_name, device_sync  # noqa: E402

METHODS = ("lora", "vblora", "shears")
SETTINGS: dict[str, Any] = dict(rank=8, ranks=(4, 8, 16), num_vectors=32, vector_length=32, lr=1e-3)
WARMUP_STEPS = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per method")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def time_method(model: Any, tokens: Any, method: str, args: argparse.Namespace, sync: Any) -> dict[str, Any]:
    """Attach `method`'s adapters, warm up, time `args.steps` steps (and Shears' search), detach."""
    from pipeline import shears
    from pipeline.recovery import (
        RecoverSpec,
        adapter_param_count,
        attach_adapters_,
        detach_adapters_,
        train_adapters_,
    )

    spec = RecoverSpec(
        method=method, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, **SETTINGS
    )
    warm = dataclasses.replace(spec, steps=WARMUP_STEPS)
    tuner = attach_adapters_(model, spec)
    try:
        layers = shears.elastic_layers(model) if method == "shears" else []
        if layers:
            shears.install_masks_(layers)
        sample = shears.sampler(layers, spec.ranks, spec.seed) if layers else None
        train_adapters_(model, tokens, warm, sample)
        sync()
        start = time.perf_counter()
        train_adapters_(model, tokens, spec, sample)
        sync()
        train_s = time.perf_counter() - start
        row: dict[str, Any] = {"method": method, "train_s": train_s, "steps_per_s": args.steps / train_s}
        if layers:
            held_out = tokens[-args.batch_size :]
            start = time.perf_counter()
            budget = shears.rank_budget(layers, spec.rank)
            found = shears.search_ranks(
                layers, spec.ranks, budget, lambda: shears.validation_loss(model, held_out)
            )
            shears.truncate_(layers, found.ranks)
            sync()
            row |= {"search_s": time.perf_counter() - start, "search_evaluations": found.evaluations}
        row["adapter_params"] = adapter_param_count(model)
        return row
    finally:
        detach_adapters_(model, tuner)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from pipeline.calibration import CalibrationSpec, calibration_tokens
    from pipeline.models import load_model, quantize_model_
    from pipeline.recipe import Recipe
    from pipeline.specs import ModelRef

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
    result["params"] = sum(p.numel() for p in model.parameters())
    quantize_model_(model, Recipe(dtype="int", bits=4, block_size=64))
    n_windows = (max(args.steps, WARMUP_STEPS) + 1) * args.batch_size
    spec = CalibrationSpec(source="corpus:train", n_samples=n_windows, seq_len=args.seq_len)
    tokens = calibration_tokens(spec, tokenizer, data_root, 2048)
    result |= {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "settings": SETTINGS,
    }
    result["methods"] = [time_method(model, tokens, m, args, sync) for m in args.methods.split(",")]
    print(render(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=list))
    return 0


def render(result: dict[str, Any]) -> str:
    """The table: one line per method."""
    lines = [
        f"Recovery on {result['shape']} ({result['params'] / 1e6:.0f}M params), {result['device']}, "
        f"batch {result['batch_size']} x {result['seq_len']} tokens",
        f"{'method':<8} {'steps/s':>9} {'tokens/s':>10} {'adapter params':>15} {'search s':>9}",
    ]
    tokens_per_step = result["batch_size"] * result["seq_len"]
    for row in result["methods"]:
        search = f"{row['search_s']:9.2f}" if "search_s" in row else f"{'-':>9}"
        lines.append(
            f"{row['method']:<8} {row['steps_per_s']:9.2f} {row['steps_per_s'] * tokens_per_step:10.0f} "
            f"{row['adapter_params']:15,d} {search}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
