"""Where a packed scoring forward's GPU time goes: kernels by class, for a ~400M GPT-NeoX.

    python benchmarks/forward_profile.py --device cuda --out benchmarks/results/forward-profile-h200.json

One synthetic batch shaped like FastScorer's (rows of a context followed by continuations, a 4-D
additive mask from `pipeline.evals.fastscore.attention_bias`, restarting position ids) runs through the
decoder in several variants, each timed (CUDA events, median of reps) and profiled:
- `packed`: as FastScorer runs it (eager, SDPA with the 4-D bias);
- `causal`: the same tokens with a plain causal mask (SDPA may take flash attention): attention's price;
- `compiled-dynamic`, `compiled-static`, `compiled`: `packed` with the decoder blocks compiled with every
  size dynamic, with none, and as `pipeline.models.compile_layers` does (rows dynamic, widths static);
  with the first-call (compile) seconds at this shape and at three others;
- `gemm`: only the decoder's matmuls at the batch's token count (torch.mm of each Linear): the floor.
Prints per variant the seconds, the MFU against a matmul measured in the same run, and the top
kernels grouped by class (gemm, attention, elementwise/norm, copies); writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def kernel_class(name: str) -> str:
    """A coarse class for a CUDA kernel name."""
    n = name.lower()
    if any(k in n for k in ("gemm", "sm90_xmma", "cutlass", "nvjet", "cublas")) and "fmha" not in n:
        return "gemm"
    if any(k in n for k in ("fmha", "flash", "attention", "efficient")):
        return "attention"
    if any(k in n for k in ("copy", "memcpy", "cat", "index")):
        return "copy/index"
    if any(k in n for k in ("layer_norm", "layernorm", "norm")):
        return "norm"
    if "triton" in n:
        return "triton (fused)"
    return "elementwise/other"


def timed(fn: Any, reps: int) -> float:
    """Median seconds of `fn` (after one warm-up call), the device synchronized around each call."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile(fn: Any) -> dict[str, Any]:
    """CUDA time per kernel class and the top kernels of one call."""
    import torch
    from torch.profiler import ProfilerActivity

    cuda = torch.cuda.is_available()
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    by_class: dict[str, float] = defaultdict(float)
    kernels = []
    for event in prof.key_averages():
        us = event.device_time_total if cuda else event.self_cpu_time_total
        if us <= 0 or (cuda and event.key.startswith(("ProfilerStep", "aten::", "cuda"))):
            continue
        by_class[kernel_class(event.key)] += us / 1e6
        kernels.append((us / 1e6, event.count, event.key[:110]))
    kernels.sort(reverse=True)
    return {"by_class": dict(by_class), "top": kernels[:12]}


def first_call_s(fn: Any) -> float:
    """Wall seconds of one call (a new shape: the compile, if any, included)."""
    import torch

    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compiled_variant(model: Any, mode: str, fn: Any, flops: float, peak: float, reps: int) -> dict[str, Any]:
    """Compile the decoder blocks afresh ("compiled-dynamic": every size dynamic; "compiled-static": none;
    "compiled": `pipeline.models.compile_layers`, rows dynamic), then time and profile `fn`."""
    import torch

    from pipeline.models import compile_layers, decoder_layers

    torch._dynamo.reset()
    layers = decoder_layers(model)
    for layer in layers:  # back to eager
        layer._compiled_call_impl = None
        layer.__dict__.pop("forward", None)
    if mode == "compiled":
        compile_layers(model)
    else:
        for layer in layers:
            layer.compile(dynamic=mode == "compiled-dynamic")
    compile_s = first_call_s(fn)
    seconds = timed(fn, reps)
    return {"seconds": seconds, "mfu": flops / seconds / peak, "compile_s": compile_s, **profile(fn)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="pythia-410m", choices=["tiny", "pythia-410m"])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--context", type=int, default=176)
    parser.add_argument("--continuations", type=int, default=4)
    parser.add_argument("--continuation-length", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from benchmarks.evaluation import SHAPES, FlopModel, matmul_rate
    from pipeline.evals.fastscore import attention_bias

    dims: dict[str, Any] = dict(SHAPES[args.shape])
    dims.setdefault("vocab_size", 1024)
    config = GPTNeoXConfig(max_position_embeddings=2048, tie_word_embeddings=False, **dims)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).to(args.device, torch.bfloat16).eval()
    model.config.use_cache = False
    body = model.base_model
    c, k, n = args.context, args.continuations, args.continuation_length
    width = c + k * n
    segments = torch.tensor([0] * c + [s for s in range(1, k + 1) for _ in range(n)], device=args.device)
    positions = torch.tensor(list(range(c)) + [c + j for _ in range(k) for j in range(n)], device=args.device)
    ids = torch.randint(0, config.vocab_size, (args.rows, width), device=args.device)
    segments, positions = segments.expand(args.rows, -1), positions.expand(args.rows, -1)
    bias = attention_bias(segments, torch.bfloat16)
    tokens = args.rows * width
    flops = FlopModel.of(model).body_flops(args.rows, width, 0)
    peak = matmul_rate(args.device)["flops"]

    def inputs_of(rows: int, w: int) -> dict[str, Any]:
        return dict(
            input_ids=ids[:rows, :w],
            attention_mask=bias[:rows, :, :w, :w].contiguous(),
            position_ids=positions[:rows, :w],
            use_cache=False,
        )

    def packed() -> Any:
        return body(input_ids=ids, attention_mask=bias, position_ids=positions, use_cache=False)

    def causal() -> Any:
        return body(input_ids=ids, position_ids=positions, use_cache=False)

    linears = [m for m in body.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {
        m.in_features: torch.randn(tokens, m.in_features, device=args.device, dtype=torch.bfloat16)
        for m in linears
    }

    def gemm() -> None:
        for m in linears:
            torch.mm(inputs[m.in_features], m.weight.t())

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "rows": args.rows,
        "width": width,
        "tokens": tokens,
        "body_flops": flops,
        "matmul_flops": peak,
        "variants": {},
    }
    with torch.inference_mode():
        variants = [("packed", packed), ("causal", causal), ("gemm", gemm)]
        for name, fn in variants:
            seconds = timed(fn, args.reps)
            results["variants"][name] = {"seconds": seconds, "mfu": flops / seconds / peak, **profile(fn)}
        for name in ("compiled-dynamic", "compiled-static", "compiled"):
            results["variants"][name] = compiled_variant(model, name, packed, flops, peak, args.reps)
            results["variants"][name]["other_shapes_s"] = {
                f"{rows}x{w}": first_call_s(lambda r=rows, w=w: body(**inputs_of(r, w)))
                for rows, w in (
                    (args.rows * 3 // 4, width),
                    (args.rows, width * 3 // 4),
                    (args.rows - 8, width * 3 // 4),
                )
            }
    print(f"{results['device']}; {args.rows} rows x {width} tokens; matmul {peak / 1e12:.0f} TFLOP/s")
    print(
        "| variant | ms | MFU | "
        + " | ".join(["gemm", "attention", "norm", "copy/index", "triton (fused)", "elementwise/other"])
        + " |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, v in results["variants"].items():
        cells = [
            f"{v['by_class'].get(cls, 0.0) * 1e3:.2f}"
            for cls in ["gemm", "attention", "norm", "copy/index", "triton (fused)", "elementwise/other"]
        ]
        print(f"| {name} | {v['seconds'] * 1e3:.2f} | {v['mfu']:.3f} | " + " | ".join(cells) + " |")
    print("\n| variant | first call s (compile) | first call at other shapes s |\n|---|---|---|")
    for name, v in results["variants"].items():
        if "compile_s" in v:
            shapes = ", ".join(f"{k}: {t:.2f}" for k, t in v["other_shapes_s"].items())
            print(f"| {name} | {v['compile_s']:.2f} | {shapes} |")
    for name, v in results["variants"].items():
        print(f"\n{name} top kernels (s, calls, name):")
        for row in v["top"]:
            print(f"  {row[0] * 1e3:8.2f} ms {row[1]:5d}  {row[2]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
