"""Scorer numerics: FastScorer against lm-eval's HFLM in bfloat16, both against the float32 model.

    python benchmarks/scorer_numerics.py --model ladder:tiny/d64 --limit 100 --out scorer-numerics.json

Loads the model in float32 and scores the four offline tasks' requests (`--limit` documents each)
with FastScorer (the float32 reference), then casts it to bfloat16 and scores them with FastScorer and
with HFLM. HFLM (softmax_dtype unset) rounds each token's log-probability and each request's sum to
bf16; FastScorer takes float32 log-softmax and sums of the same bf16 logits. Reports the relative
log-likelihood differences, the share of HFLM answers that are bf16 numbers, and per task the
accuracy of each scorer and the documents whose answer differs. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("lambada_openai", "piqa", "hellaswag", "winogrande")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="a local model folder or a ladder member (ladder:tiny/d64)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default="scorer-numerics.json")
    return parser.parse_args(argv)


def model_path(model: str, data_root: Path) -> str:
    from pipeline.ladders.configs import LADDER_PREFIX

    if not model.startswith(LADDER_PREFIX):
        return model
    from pipeline.ladders.ladder import resolve_ladder

    (member,) = resolve_ladder(model, data_root)
    return str(member.path)


def relative(a: list[float], b: list[float]) -> dict[str, float]:
    errors = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True)]
    return {"max": max(errors), "mean": sum(errors) / len(errors)}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pipeline.evals.lmeval import LmEvalSuite
    from pipeline.models import load_model
    from pipeline.specs import ModelRef

    data_root = Path(args.data_root)
    model, tokenizer = load_model(ModelRef(model_path(args.model, data_root), "float32"), args.device)
    runs: dict[str, tuple[list[float], dict[tuple[str, str], Any]]] = {}
    for name, torch_dtype, scorer in [
        ("fp32", torch.float32, "fast"),
        ("fast", None, "fast"),
        ("hflm", None, "hflm"),
    ]:
        if torch_dtype is None:
            model = model.bfloat16()
        suite = LmEvalSuite(
            model, tokenizer, TASKS, data_root=data_root, limit=args.limit, batch_size=args.batch_size,
            scorer=scorer, metrics="numpy",
        )  # fmt: skip
        assert suite.plan is not None
        lls = [ll for ll, _ in suite.lm.loglikelihood(list(suite.plan.requests))]
        runs[name] = (lls, {(m.task, m.metric): m for m in suite.run()})
    hflm_lls = runs["hflm"][0]
    tasks = {
        f"{task}/{metric}": {
            **{name: runs[name][1][task, metric].value for name in runs},
            "docs": runs["fast"][1][task, metric].n_examples,
            "differ": sum(
                a != b
                for a, b in zip(
                    runs["fast"][1][task, metric].unit_sums,
                    runs["hflm"][1][task, metric].unit_sums,
                    strict=True,
                )
            ),
        }
        for task, metric in runs["fast"][1]
        if metric != "perplexity"
    }
    return {
        "model": args.model,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "requests": len(hflm_lls),
        "fast_vs_hflm": relative(runs["fast"][0], hflm_lls),
        "fast_vs_fp32": relative(runs["fast"][0], runs["fp32"][0]),
        "hflm_vs_fp32": relative(hflm_lls, runs["fp32"][0]),
        "hflm_bf16_numbers": sum(float(torch.tensor(x).bfloat16()) == x for x in hflm_lls) / len(hflm_lls),
        "tasks": tasks,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    print(f"{result['model']} on {result['device']}: {result['requests']} requests, bf16")
    for key in ("fast_vs_hflm", "fast_vs_fp32", "hflm_vs_fp32"):
        print(f"  {key:14s} relative |dll|: max {result[key]['max']:.2e}, mean {result[key]['mean']:.2e}")
    print(f"  HFLM answers that are bf16 numbers: {result['hflm_bf16_numbers']:.0%}")
    print(f"  {'task/metric':26s} {'fp32':>7s} {'fast':>7s} {'hflm':>7s} {'differ':>9s}")
    for name, row in result["tasks"].items():
        values = " ".join(f"{row[run]:7.3f}" for run in ("fp32", "fast", "hflm"))
        print(f"  {name:26s} {values} {row['differ']:4d}/{row['docs']}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
