"""Parse CUDA C++ kernel text as C++ on a CPU machine (g++ -fsyntax-only) under stand-ins for CUDA's
built-ins: NVRTC compiles it on the GPU, CI has no GPU, so this catches what a typo would break there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

STAND_INS = """
    #include <cmath>
    #include <algorithm>
    using std::max;
    #define __global__
    #define __device__
    #define __forceinline__
    #define __restrict__
    #define __launch_bounds__(a, b)
    struct uint2 { unsigned x, y; };
    struct uint4 { unsigned x, y, z, w; };
    uint2 make_uint2(unsigned a, unsigned b);
    uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d);
    struct dim { int x, y, z; };
    extern dim threadIdx, blockIdx, blockDim, gridDim;
    void __syncthreads();
    int __shfl_xor_sync(unsigned mask, int v, int lane);
    float __shfl_xor_sync(unsigned mask, float v, int lane);
    float __int_as_float(int); int __float_as_int(float); float __uint_as_float(unsigned);
    unsigned __float_as_uint(float); float __fdiv_rn(float, float); float __fmul_rn(float, float);
    float __fadd_rn(float, float); float __frcp_rn(float); float __fmaf_rn(float, float, float);
    int __all_sync(unsigned mask, int predicate);
    unsigned long __cvta_generic_to_shared(const void*);
"""


def gxx_available() -> bool:
    return shutil.which("g++") is not None


def check_parses(text: str, workdir: Path, defines: dict[str, object] | None = None) -> None:
    """Assert that `text` (with `defines` as #defines first) parses as C++17 under STAND_INS."""
    head = "".join(f"#define {k} {v}\n" for k, v in (defines or {}).items())
    source = workdir / "kernel.cpp"
    source.write_text(STAND_INS + head + text.replace("extern __shared__ uint2", "extern uint2"))
    check = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", str(source)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr[-3000:]
