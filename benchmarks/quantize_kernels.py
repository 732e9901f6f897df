"""Benchmark `kernels.fake_quantize`: fused Triton kernel vs torch reference vs torch.compile'd reference.

For each weight shape x bits x data type x block size it times (CUDA events, after warm-up; the kernel
columns replay `reps` calls captured in one CUDA graph, so they measure the GPU's work and not Python's
launch cost, which at ~0.1 ms a call is of the same size; the copy floor is timed the same way):

  fused_ms    the Triton kernel alone (codebook levels prepared, no NaN check), graph replay
  eager ms    the same calls launched eagerly back to back (fused_eager_ms: launch cost included)
  api_ms      the public call `fake_quantize(w, spec)` as a sweep makes it (codebook lookup or quantile
              estimation, kernel, NaN/Inf check with its one host sync)
  torch_ms    the torch reference (levels prepared, no NaN check), graph replay where it can be captured
  compile_ms  the torch.compile'd reference (only for some configs in --quick: compilation is slow)

and the bandwidth each achieves, bytes read + written (2 x numel x element size) / time, as a fraction of
the device's copy bandwidth measured in the same run (a large device-to-device copy). It also checks that
the fused output equals the reference bit for bit. On a CPU machine the GPU-only columns are left empty.

`--choices` also times the kernel under other fixed launch choices
(`CHOICES`: e.g. `chain4`, the compare-select chain for k <= 4), one JSON field and summary column each.

    python benchmarks/quantize_kernels.py --quick --out kernels.json       # < 90 s on one H100
    python benchmarks/quantize_kernels.py --quick --choices w8,vpt8 --out kernels.json
    python benchmarks/quantize_kernels.py --out kernels.json                # the full grid, compile for all
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

# Run as a script, this file's folder heads sys.path: import the `kernels` package from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from kernels import QuantSpec, fake_quantize  # noqa: E402
from kernels.blockwise import levels_for, reference_fake_quantize  # noqa: E402

GPU_SHAPES = [(8192, 8192), (14336, 4096)]
ROUNDS = 3  # turns of the kernel timings (`interleaved_ms`)
CPU_SHAPES = [(1024, 1024), (1792, 512)]  # the GPU shapes / 64 in numel, same aspect
BITS = [3, 4, 8]
DTYPES = ["int", "fp", "nf", "quantile", "dynamic"]
BLOCKS: list[int | None] = [64, 1024, None]
QUICK_COMPILE = [("nf", 4, 64)]  # configs (dtype, bits, block) given a torch.compile column in --quick
# Other fixed launch choices of the kernel a run may time besides the default (FusedChoice fields).
CHOICES: dict[str, dict[str, Any]] = {  # FusedChoice fields and their values (int or bool)
    "chain4": {"max_chain_log2": 4},  # compare-select chain over register-held midpoints for k <= 4
    "global": {"max_shared_log2": 0},  # binary search read through L1 (the old search, new launch shape)
    "bucket6": {"bucket_from_log2": 6},  # k >= 6: a bucket table from xn's bits, then 1..4 compares
    "bucket4": {"bucket_from_log2": 4},  # the same from k = 4 (fewer SASS than the binary search at k = 4)
    "vpt32": {"values_per_thread": 32},  # twice the values (bytes in flight) per thread
    "vpt8": {"values_per_thread": 8},
    "w4": {"num_warps": 4},  # the default since the ninth session
    "w8": {"num_warps": 8},  # the default before
    # Bucketed search (k >= 4 by default), window of one: two gathers indexed by the bucket, none waiting
    # for another (12 bytes a bucket per program; tables of <= 1024 buckets, else the chained lookup).
    "ind": {"independent": True},
    "first": {"tables_first": True},  # the search's tables loaded before the weights (latency overlapped)
    "ind+first": {"independent": True, "tables_first": True},
    # Persistent programs (unmasked launch): tables loaded once, the next tile's weights loaded while the
    # current one is quantized; this many a multiprocessor, fewer where its registers do not fit them.
    "persist": {"programs_per_sm": 8},
    "persist4": {"programs_per_sm": 4},
    "ind+persist": {"independent": True, "programs_per_sm": 8},
    "persist+vpt8": {"programs_per_sm": 16, "values_per_thread": 8},
    # The bucketed search's tables read by loads through L1, no per-program copy in shared memory
    "l1": {"l1_tables": True},
    "ind+l1": {"independent": True, "l1_tables": True},
    "l1+vpt32": {"l1_tables": True, "values_per_thread": 32},
    # The int grid's code by arithmetic and one compare (other codebooks: the default search)
    "uniform": {"uniform_from_log2": 1},  # from 3 bits (the default since the twelfth session; was 6)
    "uniform+vpt32": {"uniform_from_log2": 1, "values_per_thread": 32},
    "before": {"uniform_from_log2": 0, "wide_from_log2": 0},  # the defaults of the tenth session
    "narrow": {"wide_from_log2": 0},
    # one word a bucket holds the start and an integer threshold: two table reads a value, not three
    "packed": {"packed_from_buckets": 128},  # from 6 bits (the default: tables of >= 512 entries)
    "nopacked": {"packed_from_buckets": 0},  # the bucketed search's three reads everywhere
    # the int grid without tables (two IEEE divisions a value instead of two gathers)
    "arith": {"arithmetic_from_log2": 1},  # from 3 bits (slower everywhere: `FusedChoice` has the figures)
    "noarith": {"arithmetic_from_log2": 0},  # the uniform search's two gathers everywhere (the default)
    # one 64-bit read a value: the bucket's value pair, the midpoint between them computed
    "pairs": {"pairs_from_log2": 4},  # tables of <= 1024 buckets (8 KB a program)
    "pairs+big": {"pairs_from_log2": 4, "pairs_max_buckets": 4096},  # 8-bit quantile and dynamic too
    "pairs+w8": {"pairs_from_log2": 4, "pairs_max_buckets": 4096, "num_warps": 8},  # half the copies a value
    # the fourteenth session's defaults against the thirteenth's, in the same run
    "old": {"pairs_from_log2": 0, "computed_value_from_log2": 0, "wide_from_log2": 6},
    "wide6": {"wide_from_log2": 6},
    "new+split": {"split_from_block": 512},
    "w8+big": {"num_warps": 8, "pairs_max_buckets": 4096},  # 8-bit dynamic's 32 KB pair table, 8192 values
    "w8+vpt16": {"num_warps": 8, "wide_from_log2": 0},
    # fifteenth session: the Triton kernel alone, not the resident CUDA pair kernel (kernels.cuda_pairs)
    "triton": {
        "resident_from_buckets": 0,
        "resident_wide_from_buckets": 0,
        "resident_grid_wide_from_buckets": 0,
    },
    "streaming": {"resident_streaming": True},  # the resident kernel's loads and stores evict-first
    "constgeo": {"resident_constant_geometry": True},  # the resident kernel compiled per bucket geometry
    "exact": {"resident_fast": False},  # sixteenth session: the resident kernel's exact path only
    # sixteenth session: the resident kernel's program shapes (the default: 256 threads, four programs a
    # multiprocessor, each warp's next turn loaded before this one is quantized)
    "t1024": {"resident_threads": 1024, "resident_per_sm": 1, "resident_pipeline": False},  # the 15th's
    "pipe1024": {"resident_threads": 1024, "resident_per_sm": 1},
    "pipe512": {"resident_threads": 512, "resident_per_sm": 1},
    "t512x2": {"resident_threads": 512, "resident_per_sm": 2, "resident_pipeline": False},
    "pipe512x2": {"resident_threads": 512, "resident_per_sm": 2},
    "pipe256x2": {"resident_threads": 256, "resident_per_sm": 2},  # half the warps, 128 registers
    "pipe256x4": {"resident_threads": 256, "resident_per_sm": 4},
    "pipe128x8": {"resident_threads": 128, "resident_per_sm": 8},
    "grid1024": {"resident_grid_max_block": 1024},  # the int grid resident at blocks of 1,024 too
    # blocks of 512 and 1024 held a warp each (no barrier for the absmax; 32 values a thread at 1024)
    "split": {"split_from_block": 512},
    # candidates: pairs from 4 bits, the int grid's computed value at 8, split blocks, wide from 7 or 8
    "cand": {
        "pairs_from_log2": 4,
        "computed_value_from_log2": 8,
        "split_from_block": 512,
        "wide_from_log2": 8,
    },
    "cand7": {
        "pairs_from_log2": 4,
        "computed_value_from_log2": 8,
        "split_from_block": 512,
        "wide_from_log2": 7,
    },
    "cand-nosplit": {"pairs_from_log2": 4, "computed_value_from_log2": 8, "wide_from_log2": 8},
    "cand+big": {
        "pairs_from_log2": 4,
        "computed_value_from_log2": 8,
        "split_from_block": 512,
        "wide_from_log2": 8,
        "pairs_max_buckets": 2048,
    },
    "gridvalue": {"computed_value_from_log2": 1},  # the int grid: its midpoint read, its value computed
    "pairs+vpt32": {"pairs_from_log2": 4, "pairs_max_buckets": 4096, "values_per_thread": 32},
}


@dataclass(frozen=True)
class Row:
    shape: tuple[int, int]
    dtype: str
    bits: int
    block_size: int | None
    fused_ms: float | None
    api_ms: float | None
    torch_ms: float
    compile_ms: float | None
    fused_frac_copy_bw: float | None
    torch_frac_copy_bw: float
    compile_frac_copy_bw: float | None
    bit_exact: bool | None
    compile_bit_exact: bool | None = None  # informational: inductor may round differently
    fused_eager_ms: float | None = None  # the fused kernel as eager calls (launch cost included)
    choice_ms: dict[str, float] | None = None  # --choices: the kernel under other launch choices
    choice_bit_exact: bool | None = None  # all of them equal the reference


def time_ms(
    fn: Callable[[], object], reps: int, warmup: int, device: torch.device, graph: bool = True
) -> float:
    """Mean milliseconds per call. On CUDA with `graph`, `reps` calls captured in one CUDA graph and
    replayed between two events: the kernels' own time, with no Python or launch cost between them
    (the copy floor is timed the same way); a call that cannot be captured (a host sync) falls back to
    eager timing. Without `graph`, `reps` back-to-back eager calls between two events (a sweep's cost)."""
    if device.type == "cuda" and graph:
        captured = _graph_ms(fn, reps, warmup)
        if captured is not None:
            return captured
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def _graph_ms(fn: Callable[[], object], reps: int, warmup: int) -> float | None:
    """`time_ms` by CUDA-graph replay (the second replay is timed); None if `fn` cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
    except RuntimeError:  # e.g. a host sync inside fn
        torch.cuda.synchronize()
        return None
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def copy_bandwidth_gbps(device: torch.device, reps: int) -> float:
    """Bytes read + written per second of a large device-to-device copy (1 GiB; 256 MiB on CPU): the
    faster of graph replay and eager launches, so the floor is the best the device showed in this run."""
    n_bytes = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = min(time_ms(lambda: dst.copy_(src), reps, 2, device, graph=graph) for graph in (True, False))
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def _frac(ms: float | None, n_bytes: int, copy_gbps: float) -> float | None:
    return None if ms is None else n_bytes / (ms * 1e-3) / 1e9 / copy_gbps


def _weight(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16)


def _n_bytes(w: torch.Tensor) -> int:
    return 2 * w.numel() * w.element_size()


def bench_config(w: torch.Tensor, spec: QuantSpec, reps: int, copy_gbps: float, choices: tuple = ()) -> Row:
    """Time one (weight, spec) without torch.compile and check the fused kernel(s) against the reference."""
    device = w.device
    levels = levels_for(w, spec)
    ref_fn = functools.partial(reference_fake_quantize, w, spec, levels, False)
    torch_ms = time_ms(ref_fn, reps, 1, device)
    row = Row(
        shape=(w.shape[0], w.shape[1]), dtype=spec.dtype, bits=spec.bits, block_size=spec.block_size,
        fused_ms=None, api_ms=None, torch_ms=torch_ms, compile_ms=None, fused_frac_copy_bw=None,
        torch_frac_copy_bw=_frac(torch_ms, _n_bytes(w), copy_gbps) or 0.0, compile_frac_copy_bw=None,
        bit_exact=None,
    )  # fmt: skip
    if (
        device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    ):  # interpreter: CPU end-to-end test
        return row
    from kernels import triton_fused

    reference = ref_fn()
    fused_fn = functools.partial(triton_fused.fused_fake_quantize, w, spec, levels, False)
    fns: dict[str, Callable[[], object]] = {"": fused_fn}  # the default, then each choice, in turns
    fns |= {c: functools.partial(fused_fn, choice=triton_fused.FusedChoice(**CHOICES[c])) for c in choices}
    kernel_ms = interleaved_ms(fns, reps, device)
    fused_ms = kernel_ms.pop("")
    row = replace(
        row, fused_ms=fused_ms, api_ms=time_ms(lambda: fake_quantize(w, spec), reps, 1, device, graph=False),
        fused_eager_ms=time_ms(fused_fn, reps, 2, device, graph=False),
        fused_frac_copy_bw=_frac(fused_ms, _n_bytes(w), copy_gbps),
        bit_exact=bool(torch.equal(fused_fn(), reference)),
    )  # fmt: skip
    if choices:
        same = all(torch.equal(cast(torch.Tensor, fns[c]()), reference) for c in choices)
        row = replace(row, choice_ms=kernel_ms, choice_bit_exact=same)
    return row


def interleaved_ms(fns: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """`time_ms` of each function, the least of ROUNDS turns taken in rotation (default, choices, default,
    ...), so that none is measured only right after the slow torch reference or only in a cooler GPU: one
    after another, the same kernel measured 0.86 then 0.93 of copy (twelfth session, H200)."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(ROUNDS if device.type == "cuda" else 1):
        for name, fn in fns.items():
            best[name] = min(best[name], time_ms(fn, reps, 2, device))
    return best


def add_compile(row: Row, w: torch.Tensor, reps: int, copy_gbps: float) -> Row:
    """The row with the torch.compile'd reference timed (compilation happens in the warm-up)."""
    spec = QuantSpec(row.dtype, row.bits, row.block_size)
    levels = levels_for(w, spec)
    compiled = torch.compile(reference_fake_quantize, dynamic=False)
    ms = time_ms(lambda: compiled(w, spec, levels, False), reps, 2, w.device)
    reference = reference_fake_quantize(w, spec, levels, False)
    same = bool(torch.equal(compiled(w, spec, levels, False), reference))
    return replace(
        row, compile_ms=ms, compile_frac_copy_bw=_frac(ms, _n_bytes(w), copy_gbps), compile_bit_exact=same
    )


def _fmt(v: object, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def exact(r: Row) -> bool | None:
    """Every kernel timed in the row equals the reference bit for bit (None: none was timed)."""
    checks = [c for c in (r.bit_exact, r.choice_bit_exact) if c is not None]
    return all(checks) if checks else None


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    head = "| shape | dtype | bits | block | fused ms | eager ms | api ms | torch ms | compile ms | " \
           "fused/copy | torch/copy | compile/copy | bit-exact |"  # fmt: skip
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        cells = [f"{r.shape[0]}x{r.shape[1]}", r.dtype, str(r.bits), str(r.block_size or "tensor"),
                 _fmt(r.fused_ms), _fmt(r.fused_eager_ms), _fmt(r.api_ms), _fmt(r.torch_ms),
                 _fmt(r.compile_ms),
                 _fmt(r.fused_frac_copy_bw, ".2f"), _fmt(r.torch_frac_copy_bw, ".2f"),
                 _fmt(r.compile_frac_copy_bw, ".2f"), _fmt(exact(r))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="fewer reps; torch.compile only for a few configs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None, help="timed calls per measurement")
    p.add_argument("--shapes", default=None, help="e.g. 8192x8192,14336x4096 (default: per device)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--bits", default=",".join(map(str, BITS)))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--blocks", default="64,1024,tensor", help="block sizes ('tensor': one absmax a tensor)")
    p.add_argument("--choices", default="", help=f"also time the kernel with: {','.join(CHOICES)}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    choices = tuple(c for c in args.choices.split(",") if c)
    if unknown := sorted(set(choices) - set(CHOICES)):
        raise SystemExit(f"unknown --choices {unknown}; allowed: {', '.join(CHOICES)}")
    device = torch.device(args.device)
    reps = args.reps or (10 if args.quick else 50)
    shapes: Sequence[tuple[int, ...]]
    if args.shapes:
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    t_start = time.perf_counter()
    copy_gbps = copy_bandwidth_gbps(device, reps=max(reps, 5))
    meta = {"device": device_name(device), "torch": torch.__version__, "triton": _triton_version(),
            "copy_gbps": copy_gbps, "reps": reps, "quick": args.quick,
            "bytes_rule": "2 x numel x element size (bf16 read + written)",
            "choices": {c: CHOICES[c] for c in choices}}  # fmt: skip
    print(f"device: {meta['device']}; copy bandwidth {copy_gbps:.1f} GB/s (read + write)", flush=True)
    rows: list[Row] = []
    blocks = [None if b == "tensor" else int(b) for b in args.blocks.split(",")]
    grid = list(itertools.product(shapes, args.dtypes.split(","), map(int, args.bits.split(",")), blocks))
    for shape, dtype, bits, block in grid:
        spec = QuantSpec(dtype, bits, block)
        rows.append(bench_config(_weight(shape, device), spec, reps, copy_gbps, choices))
        print(".", end="", flush=True, file=sys.stderr)
        _write(args.out, meta, rows, time.perf_counter() - t_start)  # partial results survive a timeout
    for i, (shape, dtype, bits, block) in enumerate(grid):  # compile last: slow, and optional in --quick
        quick_pick = (dtype, bits, block) in QUICK_COMPILE and shape == shapes[0]
        if not args.no_compile and (quick_pick if args.quick else device.type == "cuda"):
            rows[i] = add_compile(rows[i], _weight(shape, device), reps, copy_gbps)
            print("c", end="", flush=True, file=sys.stderr)
            _write(args.out, meta, rows, time.perf_counter() - t_start)
    wall_s = time.perf_counter() - t_start
    _write(args.out, meta, rows, wall_s)
    ok = all(exact(r) is not False for r in rows)
    table = format_table(rows) + "\n\n" + summarize(rows)
    print("\n" + table)
    print(f"wall {wall_s:.1f} s; every fused output bit-exact with the reference in every row: {ok}")
    if args.out is not None:
        args.out.with_suffix(".md").write_text(f"{meta['device']}, copy {copy_gbps:.0f} GB/s\n\n{table}\n")
    return 0 if ok else 1


def summarize(rows: list[Row]) -> str:
    """Median (min) fraction of copy bandwidth per block size (all shapes, dtypes and bits), per kernel."""
    names = [f"choice {c}" for c in (rows[0].choice_ms or {})] if rows else []
    head = ["block", "fused/copy median (min)", "torch/copy median", "compile/copy median"]
    head += [f"{n}/copy median (min)" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for block in sorted({r.block_size for r in rows}, key=lambda b: b or 1 << 62):
        sel = [r for r in rows if r.block_size == block]
        if not sel:
            continue
        cells = [
            _median_min([r.fused_frac_copy_bw for r in sel]),
            f"{statistics.median(r.torch_frac_copy_bw for r in sel):.2f}",
            _median_min([r.compile_frac_copy_bw for r in sel], with_min=False),
        ]
        for name in names:
            c = name.removeprefix("choice ")
            cells.append(_median_min([r.fused_frac_copy_bw * r.fused_ms / r.choice_ms[c] for r in sel
                                      if r.choice_ms and r.fused_ms and r.fused_frac_copy_bw]))  # fmt: skip
        lines.append(f"| {block or 'tensor'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _median_min(fracs: Sequence[float | None], with_min: bool = True) -> str:
    vals = [f for f in fracs if f is not None]
    if not vals:
        return "-"
    return f"{statistics.median(vals):.2f}" + (f" ({min(vals):.2f})" if with_min else "")


def _write(out: Path | None, meta: dict, rows: list[Row], wall_s: float) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**meta, "wall_s": wall_s, "rows": [asdict(r) for r in rows]}, indent=1))


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
