"""Where the fused quantizer's time can go, per data type and bit width, without a GPU (CPU only).

For the search each codebook gets by default (`triton_fused._flags`) it reports:

  wavefronts  shared-memory wavefronts per warp instruction of each table read the search makes
              (bucket starts, midpoints, values; packed words; value pairs), simulated: a warp's 32
              lanes hold values 16 apart (each thread holds consecutive values), Gaussian weights
              normalized per block of 64, 4-byte banks, one wavefront per distinct word in the fullest
              bank (64-bit pairs: a pass per half-warp, per distinct pair in its fullest bank pair).
              Random reads of a table larger than 32 words conflict: a lookup costs 2-3 wavefronts
              instead of 1 (a 64-bit one ~6 instead of 2).
  sass        if Triton's ptxas is installed: the default kernel compiled for sm_90a (block 64), its
              SASS instructions per value, shared loads per value and registers per thread.
  resident    if nvcc is installed: the same for the resident CUDA kernel (`kernels/cuda_pairs.py`, its
              default variant, its exact and its fast path each compiled alone) at blocks 64 and 1024,
              its bucket geometry read from the arguments or compiled in.

A program's table reads share the SM's shared-memory/L1 data path (one wavefront a clock) with its
weight loads and stores; its instructions share four issue slots a clock. docs/benchmarks.md relates
both to the H200's measured fractions of copy bandwidth.

    python benchmarks/kernel_anatomy.py --out benchmarks/results/kernel-anatomy-cpu.json   # ~1 min
    python benchmarks/kernel_anatomy.py --choice packed     # another FusedChoice (quantize_kernels' CHOICES)
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks.quantize_kernels import CHOICES  # noqa: E402
from kernels import QuantSpec  # noqa: E402
from kernels.blockwise import levels_for  # noqa: E402
from kernels.buckets import (  # noqa: E402
    bucket_index,
    bucket_table,
    grid_index,
    packed_index,
    packed_table,
    uniform_codes,
    uniform_m,
)
from kernels.codebooks import Levels  # noqa: E402

DTYPES = ["int", "fp", "nf", "quantile", "dynamic"]
SEARCH_NAMES = dict(  # `triton_search.SEARCH_*` by value
    enumerate("chain shared global bucket bucket-l1 uniform packed arithmetic pairs grid-value".split())  # noqa: SIM905
)
WARPS = 4000  # warp instructions simulated per table


def wavefronts(words: torch.Tensor) -> float:
    """Mean wavefronts of warp instructions whose lanes read these word addresses ([warps, 32])."""
    total = 0
    for row in words.tolist():
        per_bank = collections.Counter(word % 32 for word in set(row))
        total += max(per_bank.values())
    return total / len(words)


def wavefronts64(entries: torch.Tensor) -> float:
    """Mean wavefronts of 64-bit warp reads of these entries ([warps, 32]): each half-warp is one pass,
    an entry two adjacent banks, one wavefront per distinct entry in the fullest bank pair."""
    total = 0
    for row in entries.tolist():
        for half in (row[:16], row[16:]):
            total += max(collections.Counter(entry % 16 for entry in set(half)).values())
    return total / len(entries)


def warp_values(block: int = 64, seed: int = 0) -> torch.Tensor:
    """[WARPS, 32] normalized weights as a warp instruction's lanes hold them (lane l: value 16 l + i)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(WARPS * 32 * 16 // block, block, generator=g)
    xn = (w / w.abs().amax(1, keepdim=True)).reshape(-1, 32, 16)
    return xn.transpose(1, 2).reshape(-1, 32)


def table_reads(levels: Levels, flags: dict, xn: torch.Tensor) -> dict[str, float]:
    """Wavefronts per warp instruction of each shared-memory table read the search makes."""
    from kernels import triton_fused as tf

    code = torch.searchsorted(levels.mids, xn.contiguous())  # #(mids < xn)
    search = flags["SEARCH"]
    if search == tf.SEARCH_ARITHMETIC.value:
        return {}  # no table
    if search == tf.SEARCH_GRID_VALUE.value:  # the midpoint read, the value computed
        m = uniform_m(levels)
        assert m is not None
        return {"mids": wavefronts(grid_index(xn, m))}
    if search == tf.SEARCH_UNIFORM.value:
        m = uniform_m(levels)
        assert m is not None
        return {
            "mids": wavefronts(grid_index(xn, m)),
            "values": wavefronts(uniform_codes(xn, m, levels.mids)),
        }
    if search == tf.SEARCH_PAIRS.value:  # one 64-bit pair a bucket (the starts only where codes are stored)
        table = bucket_table(levels)
        assert table is not None
        return {"pairs": wavefronts64(bucket_index(xn, table.buckets))}
    if search == tf.SEARCH_PACKED.value:
        packed = packed_table(levels)
        assert packed is not None
        return {"words": wavefronts(packed_index(xn, packed.buckets)[0]), "values": wavefronts(code)}
    if search == tf.SEARCH_BUCKET.value:
        table = bucket_table(levels)
        assert table is not None
        bucket = bucket_index(xn, table.buckets)
        start = table.starts[bucket].long()
        reads = {"starts": wavefronts(bucket // 4)}  # one byte each, four to a word
        for j in range(table.window):
            reads[f"mids+{j}"] = wavefronts(start + j)
        return reads | {"values": wavefronts(code)}
    # the shared-memory binary search: two scalar levels, then a probe a level, then the value
    return {"probes": max(0, flags["LOG2_LEVELS"] - 2) * 1.0, "values": wavefronts(code)}


def ptxas_path() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the PTX version Triton emits
        if (bin_dir / name).exists():
            return bin_dir / name
    return None


def sass_stats(flags: dict, values_per_thread: int, ptxas: Path, workdir: Path) -> dict[str, float]:
    """The default kernel at block 64 for sm_90a: SASS instructions and shared loads per value, registers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import triton_fused as tf

    num_warps, block = 4, 64
    values = values_per_thread * 32 * num_warps
    pointers = {"x_ptr": "*bf16", "out_ptr": "*bf16", "codes_ptr": "*u8", "absmax_ptr": "*fp32",
                "values_ptr": "*fp32", "mids_ptr": "*fp32", "starts_ptr": "*u8"}  # fmt: skip
    if flags["SEARCH"] == tf.SEARCH_PACKED.value:
        pointers["mids_ptr"] = "*i32"  # the packed words
    if flags["SEARCH"] == tf.SEARCH_PAIRS.value:
        pointers["values_ptr"] = pointers["mids_ptr"] = "*i64"  # the value pairs
    signature = {**pointers, "n": "i64", "first_row": "i32", "tiles": "i32"}
    consts = {"BLOCK": block, "ROWS": values // block, "BLOCK_P2": block, "MASKED": False,
              "PERSISTENT": False, "SPLIT": 1, **flags, "BF16_BY_HAND": False}  # fmt: skip
    signature.update(dict.fromkeys(consts, "constexpr"))
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers) + 1)}
    src = ASTSource(fn=tf._fused_blocks_kernel, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": num_warps, **tf.COMPILE_OPTIONS}
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    (workdir / "k.ptx").write_text(ptx)
    cubin = workdir / "k.cubin"
    run = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(workdir / "k.ptx"), "-o", str(cubin)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", run.stderr).group(1))  # type: ignore[union-attr]
    dump = subprocess.run([str(ptxas.parent / "cuobjdump"), "-sass", str(cubin)],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    ops = [line for line in dump.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    lds = sum(" LDS" in line for line in ops)
    per_thread = values / (32 * num_warps)
    n = len(ops)
    return {"sass_per_value": n / per_thread, "lds_per_value": lds / per_thread, "registers": registers}


def resident_sass(block: int, geometry: tuple[int, int, int] | None, path: str, workdir: Path) -> dict | None:
    """The resident CUDA kernel (`kernels.cuda_pairs`, its default variant) compiled by nvcc for sm_90a
    with one of its paths ("exact" or "fast"): SASS instructions over the 32 values a lane quantizes a
    turn (the whole kernel: an upper bound on its loop) and registers; None without nvcc and cuobjdump."""
    import shutil

    from kernels import cuda_pairs

    ptxas = ptxas_path()
    nvcc = shutil.which("nvcc")
    cuobjdump = shutil.which("cuobjdump") or (str(ptxas.parent / "cuobjdump") if ptxas else None)
    if nvcc is None or cuobjdump is None:
        return None
    source = workdir / f"pairs{block}.cu"
    paths = {"exact": 1, "fast": 2}[path]
    source.write_text(f"#define PATHS {paths}\n" + cuda_pairs.source_for(block, geometry=geometry))
    cubin = source.with_suffix(".cubin")
    command = [nvcc, "-arch=sm_90a", "-cubin", "-O3", "-Xptxas", "-v", str(source), "-o", str(cubin)]
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", run.stderr).group(1))  # type: ignore[union-attr]
    dump = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    ops = [line for line in dump.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    per_turn = cuda_pairs.TURN // 32
    return {"block": block, "geometry": "constant" if geometry else "arguments", "path": path,
            "sass_per_value": len(ops) / per_turn, "registers": registers}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="3,4,5,6,7,8")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--choice", default="", help="a FusedChoice of benchmarks/quantize_kernels.py's CHOICES")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from kernels import triton_fused as tf

    choice = replace(tf.DEFAULT_CHOICE, **CHOICES[args.choice]) if args.choice else tf.DEFAULT_CHOICE
    xn = warp_values()
    ptxas = ptxas_path()
    workdir = Path(tempfile.mkdtemp(prefix="kernel-anatomy-"))
    rows = []
    print("| dtype | bits | search | wavefronts a table read | total | SASS/value | LDS/value | registers |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        for bits in map(int, args.bits.split(",")):
            spec = QuantSpec(dtype, bits, 64)
            levels = levels_for(torch.randn(256, 64, generator=torch.Generator().manual_seed(1)), spec)
            x = torch.empty(1, dtype=torch.bfloat16)
            flags = tf._flags(x, levels, True, False, choice)
            per_thread = tf.values_per_thread(64, flags, choice)  # block 64: never split
            wide = per_thread > choice.values_per_thread
            reads = table_reads(levels, flags, xn)
            sass = sass_stats(flags, per_thread, ptxas, workdir) if ptxas else {}
            name = SEARCH_NAMES[flags["SEARCH"]]
            row = {"dtype": dtype, "bits": bits, "search": name, "wide": wide, "wavefronts": reads,
                   "wavefronts_total": sum(reads.values()), **sass}  # fmt: skip
            rows.append(row)
            cells = ", ".join(f"{k} {v:.2f}" for k, v in reads.items())
            extra = (f"{sass['sass_per_value']:.1f} | {sass['lds_per_value']:.1f} | {sass['registers']}"
                     if sass else "- | - | -")  # fmt: skip
            print(f"| {dtype} | {bits} | {name}{' (wide)' if wide else ''} | {cells} | "
                  f"{row['wavefronts_total']:.2f} | {extra} |")  # fmt: skip
    from kernels import cuda_pairs
    from kernels.buckets import mean_pairs

    nf8 = mean_pairs(levels_for(torch.randn(256, 64), QuantSpec("nf", 8, 64)), 4096)
    assert nf8 is not None
    geometries = (None, cuda_pairs.geometry_of(nf8))
    resident = [resident_sass(block, geometry, path, workdir) for block in (64, 1024)
                for geometry in geometries for path in ("exact", "fast")]  # fmt: skip
    if all(r is not None for r in resident):
        print(
            "\nThe resident CUDA kernel (kernels/cuda_pairs.py, nvcc, sm_90a; nf 8's geometry compiled in):"
        )
        print("| block | bucket geometry | path | SASS/value | registers |\n|---|---|---|---|---|")
        for r in resident:
            assert r is not None
            cells = f"{r['path']} | {r['sass_per_value']:.1f} | {r['registers']}"
            print(f"| {r['block']} | {r['geometry']} | {cells} |")
    if args.out:
        args.out.write_text(json.dumps({"ptxas": str(ptxas) if ptxas else None, "rows": rows,
                                        "resident": resident}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
