"""The pair lookup with its table resident for a whole launch: CUDA C++ compiled at run time (NVRTC).

The Triton kernel (`triton_fused`) copies its table into shared memory in every program (`tl.gather`
stores its source at each call), which at 7-8 bits costs as much as the weights a program quantizes.
Here a few persistent programs a multiprocessor (by default four of 256 threads, `Variant`) each copy
the pair table (`buckets.mean_pairs`, up to 4,096 buckets, 32 KB) once and loop over the weight: each
warp quantizes 1,024 values a turn, its 32 lanes reading four 16-byte bf16 words each, and issues its
next turn's loads before quantizing this one. The arithmetic is the Triton kernel's step for step
(`triton_fused._quantize_rows`, `triton_search._pair_lookup`), or, where a turn's blocks allow it, a
shorter path proven to give the same bits (`quantize8`, `fast_exact`), so the output equals the torch
reference bit for bit; NaN and Inf blocks store a NaN absmax, as there.

Fake quantization of bf16 weights only (the codes path and other dtypes stay on Triton), blocks of
16-1,024 values (powers of two), whole turns of 1,024 values (`plan`, then `ResidentPlan.run`):
`fused_fake_quantize` hands the tail to the Triton kernel. `torch.cuda._compile_kernel` (NVRTC, in
torch's CUDA wheels) compiles it once per block size and device; where it is missing or the GPU is
older than sm_80 the Triton kernel runs.
Probe and figures: `benchmarks/pairs_copies_probe.py`, docs/benchmarks.md (fifteenth and sixteenth
sessions).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from kernels import scaling
from kernels.buckets import MeanPairs, pair_floats

TURN = 1024  # values a warp quantizes a turn: 32 lanes x 4 loads x 8 bf16
MAX_TABLE_BYTES = 48 * 1024  # static launch limit without opting in to more shared memory
MIN_BLOCK, MAX_BLOCK = 16, TURN
# The fast path (`fast_exact`): blocks of absmax in [TINY_ABSMAX, FAST_MAX_ABSMAX], pair sums 0 or at least
# FAST_MIN_SUM in magnitude (then sum * 0.5 is exact and above every subnormal xn).
FAST_MAX_ABSMAX, FAST_MIN_SUM = 2.0**15, 2.0**-124

SOURCE = r"""
// BLOCK, TINY_ABSMAX and TINY_SCALE are defined before this text. Load u of lane l holds values
// [u * 256 + l * 8, +8) of the warp's turn. BLOCK <= 256: a block is BLOCK / 8 lanes of one load;
// BLOCK > 256: BLOCK / 256 consecutive loads of the whole warp.
#define UNROLL 4
#define LANES (BLOCK < 256 ? BLOCK / 8 : 32)
#define GROUP (BLOCK > 256 ? BLOCK / 256 : 1)

__device__ __forceinline__ float max_nan(float a, float b) {  // PTX max.NaN: NaN if either is NaN
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ uint4 load16(const unsigned short* p) {
#if STREAMING  // ld.global.cs: evict first, each byte is read once
  uint4 r;
  asm("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
#else
  return *reinterpret_cast<const uint4*>(p);
#endif
}

__device__ __forceinline__ void store16(unsigned short* p, uint4 v) {
#if STREAMING
  asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
#else
  *reinterpret_cast<uint4*>(p) = v;
#endif
}

__device__ __forceinline__ float low_half(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float high_half(unsigned w) { return __uint_as_float(w & 0xFFFF0000u); }

__device__ __forceinline__ unsigned abs_max2(unsigned m, unsigned w) {  // max.NaN of |two bf16| pairs
  unsigned r;
  asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(m), "r"(w & 0x7FFF7FFFu));
  return r;
}

// One load's 8 values quantized against its block's absmax. EXACT: the reference's arithmetic step for
// step (`_pair_lookup`), any absmax. FAST (absmax in [TINY_ABSMAX, FAST_MAX_ABSMAX], checked for the whole
// warp): the same bits from about three fewer instructions a value. x2 = fma(v, 2 / absmax, +0) is exactly
// 2 xn wherever xn is a normal float, and +0 for v = -0 (as xn >= 0 holds there), so the sign bit
// picks the side; its bits sit 1 << 23 above xn's (first2 = first + (1 << (23 - shift))); and
// mid < xn is sum < x2, sum = lo + hi (the host checks every sum is 0 or at least FAST_MIN_SUM and
// bucket 0's lowest float is normal: `fast_exact`). A subnormal xn (|v| / absmax < 2^-126) clamps to
// bucket 0 either way and compares as its sign does; absmax <= 2^15 keeps every nonzero v's xn nonzero.
template <bool FAST>
__device__ __forceinline__ uint4 quantize8(uint4 raw, float absmax, const uint2* table, int shift, int first,
                                           int flip) {
  const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
  float y[8];
  if (FAST) {
    const int first2 = first + (1 << (23 - shift));
    const float low2 = __int_as_float(first2 << shift);
    const float inv2 = __fmul_rn(2.0f, __frcp_rn(absmax));  // exact: a power of two times 1 / absmax
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float v = (i & 1) ? high_half(w[i >> 1]) : low_half(w[i >> 1]);
      const float x2 = __fmaf_rn(v, inv2, 0.0f);
      const int bits = __float_as_int(fmaxf(fminf(fabsf(x2), 2.0f), low2));
      const int bucket = ((bits >> shift) - first2) ^ ((__float_as_int(x2) >> 31) & flip);
      const uint2 pair = table[bucket];
      const float lo = __uint_as_float(pair.x), hi = __uint_as_float(pair.y);
      y[i] = __fmul_rn(__fadd_rn(lo, hi) < x2 ? hi : lo, absmax);
    }
  } else {
    const float low = __int_as_float(first << shift);  // bucket 0's lowest float
    const float scale = absmax < TINY_ABSMAX ? TINY_SCALE : 1.0f;
    const float inv = __frcp_rn(__fmul_rn(absmax > 0.0f ? absmax : 1.0f, scale));  // IEEE 1 / (.)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float v = (i & 1) ? high_half(w[i >> 1]) : low_half(w[i >> 1]);
      const float xn = __fmul_rn(__fmul_rn(v, scale), inv);
      const int bits = __float_as_int(fmaxf(fminf(fabsf(xn), 1.0f), low));  // NaN -> 1.0 (fminf)
      const int local = (bits >> shift) - first;
      const int bucket = xn >= 0.0f ? local : (local ^ flip);  // NaN: the negative top bucket
      const uint2 pair = table[bucket];
      const float lo = __uint_as_float(pair.x), hi = __uint_as_float(pair.y);
      const float value = __fmul_rn(__fadd_rn(lo, hi), 0.5f) < xn ? hi : lo;
      y[i] = __fmul_rn(value, absmax);
    }
  }
  unsigned packed[4];
#pragma unroll
  for (int k = 0; k < 4; ++k)  // round to nearest even, as the Triton kernel's cvt
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed[k]) : "f"(y[2 * k + 1]), "f"(y[2 * k]));
  return make_uint4(packed[0], packed[1], packed[2], packed[3]);
}

// A turn's stores and absmax.
template <bool FAST>
__device__ __forceinline__ void finish_turn(const uint4 (&raw)[UNROLL], const float (&top)[UNROLL],
                                            unsigned short* __restrict__ out, float* __restrict__ absmax_out,
                                            long long base, int lane, const uint2* table, int shift,
                                            int first, int flip) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    store16(out + base + u * 256, quantize8<FAST>(raw[u], top[u], table, shift, first, flip));
    const bool first_lane = BLOCK < 256 ? (lane & (LANES - 1)) == 0 : (lane == 0 && u % GROUP == 0);
    if (first_lane)  // NaN for any non-finite block
      absmax_out[(base + u * 256) / BLOCK] =
          top[u] < __int_as_float(0x7F800000) ? top[u] : __int_as_float(0x7FC00000);
  }
}

__device__ __forceinline__ void load_turn(uint4 (&raw)[UNROLL], const unsigned short* __restrict__ x, int t,
                                          int n_turns, int lane) {
  if (t < n_turns) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) raw[u] = load16(x + (long long)t * (256 * UNROLL) + lane * 8 + u * 256);
  }
}

#ifndef PATHS  // 1: the exact path only, 2: the fast one only (`kernel_anatomy` counts each), 3: both
#define PATHS 3
#endif

// THREADS threads a program, PROGRAMS programs a multiprocessor (the launch's grid). PIPELINE: each warp
// loads its next turn before quantizing this one (twice the bytes in flight, twice the registers).
extern "C" __global__ void __launch_bounds__(THREADS, PROGRAMS) pairs_fake_quantize(
    const unsigned short* __restrict__ x, unsigned short* __restrict__ out, float* __restrict__ absmax_out,
    const unsigned long long* __restrict__ pairs, int n_pairs, int n_turns, int shift_arg, int first_arg,
    int flip_arg, int fast_arg) {
#ifdef CONST_SHIFT  // the bucket geometry compiled in: the shift and subtract fuse into one LEA.HI
  const int shift = CONST_SHIFT, first = CONST_FIRST, flip = CONST_FLIP;
#else
  const int shift = shift_arg, first = first_arg, flip = flip_arg;
#endif
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (THREADS / 32);
  int t = blockIdx.x * (THREADS / 32) + (threadIdx.x >> 5);
  uint4 raw[UNROLL];
  load_turn(raw, x, t, n_turns, lane);  // the first turn's loads in flight while the table is copied
  extern __shared__ uint2 table[];
  for (int i = threadIdx.x; i < n_pairs; i += THREADS) {
    const unsigned long long p = pairs[i];
    table[i] = make_uint2((unsigned)p, (unsigned)(p >> 32));
  }
  __syncthreads();
  for (; t < n_turns; t += warps) {
    const long long base = (long long)t * (256 * UNROLL) + lane * 8;
    uint4 cur[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) cur[u] = raw[u];
    if (PIPELINE) load_turn(raw, x, t + warps, n_turns, lane);
    float top[UNROLL];  // each block's NaN-propagating max of |v|
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const uint4 r = cur[u];
      const unsigned m2 = abs_max2(abs_max2(r.x & 0x7FFF7FFFu, r.y), abs_max2(r.z & 0x7FFF7FFFu, r.w));
      float m = max_nan(low_half(m2), high_half(m2));
#pragma unroll
      for (int d = 1; d < LANES; d <<= 1) m = max_nan(m, __shfl_xor_sync(0xFFFFFFFFu, m, d));
      top[u] = m;
    }
#pragma unroll
    for (int u = 0; u < UNROLL; u += GROUP) {
#pragma unroll
      for (int g = 1; g < GROUP; ++g) top[u] = max_nan(top[u], top[u + g]);
#pragma unroll
      for (int g = 1; g < GROUP; ++g) top[u + g] = top[u];
    }
    bool in_range = true;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) in_range &= top[u] >= TINY_ABSMAX && top[u] <= FAST_MAX_ABSMAX;
    if ((PATHS & 2) && fast_arg && __all_sync(0xFFFFFFFFu, in_range))  // NaN, Inf, tiny, huge: EXACT
      finish_turn<true>(cur, top, out, absmax_out, base, lane, table, shift, first, flip);
    else if (PATHS & 1)
      finish_turn<false>(cur, top, out, absmax_out, base, lane, table, shift, first, flip);
    if (!PIPELINE) load_turn(raw, x, t + warps, n_turns, lane);
  }
}
"""


Geometry = tuple[int, int, int]  # a pair table's bucket shift, first and flip mask


def geometry_of(pairs: MeanPairs) -> Geometry:
    b = pairs.buckets
    return b.shift, b.first, (2 << b.log2_buckets) - 1


@dataclass(frozen=True)
class Variant:
    """How the kernel is compiled and launched (`FusedChoice.resident_*`; every variant, the same bits).

    streaming: loads and stores marked evict-first (.cs). constant: the bucket geometry compiled in (one
    kernel a geometry) instead of read from the arguments. threads: a program's; per_sm: programs a
    multiprocessor (each copies the table). pipeline: each warp's next turn loaded before this one is
    quantized (twice the bytes in flight and the registers). fast: the fast path where `fast_exact` holds
    for the table and a turn's blocks allow it (`quantize8`)."""

    streaming: bool = False
    constant: bool = False
    threads: int = 256
    per_sm: int = 4
    pipeline: bool = True
    fast: bool = True

    def __post_init__(self) -> None:
        if not (32 <= self.threads <= 1024 and self.threads % 32 == 0):
            raise ValueError(f"Variant.threads={self.threads}: a multiple of 32 from 32 to 1,024")
        if not (self.per_sm >= 1 and self.threads * self.per_sm <= 2048):
            raise ValueError(
                f"Variant.per_sm={self.per_sm}: at least 1, and threads x per_sm at most 2,048 "
                f"(a multiprocessor's threads); threads={self.threads}"
            )


def source_for(block: int, variant: Variant = Variant(), geometry: Geometry | None = None) -> str:
    """The kernel's source for one block size and variant (the constants the Triton kernel uses, as hex
    floats); `geometry`: compiled in where given (`Variant.constant`)."""
    consts = ""
    if geometry is not None:
        names = ("SHIFT", "FIRST", "FLIP")
        consts = "".join(f"#define CONST_{k} {v}\n" for k, v in zip(names, geometry, strict=True))
    return (
        consts + f"#define BLOCK {block}\n"
        f"#define THREADS {variant.threads}\n"
        f"#define PROGRAMS {variant.per_sm}\n"
        f"#define PIPELINE {int(variant.pipeline)}\n"
        f"#define STREAMING {int(variant.streaming)}\n"
        f"#define TINY_ABSMAX {float(scaling.TINY_ABSMAX).hex()}f\n"
        f"#define TINY_SCALE {float(scaling.TINY_SCALE).hex()}f\n"
        f"#define FAST_MAX_ABSMAX {FAST_MAX_ABSMAX.hex()}f\n" + SOURCE
    )


@functools.lru_cache(maxsize=64)
def fast_exact(pairs: MeanPairs) -> bool:
    """Whether the kernel's fast path computes this table's bits exactly (see `quantize8`): bucket 0's
    lowest float is normal, and every pair's float32 sum is 0, +-inf or at least FAST_MIN_SUM in magnitude.
    Cached per table (one device-to-host copy)."""
    shift, first, _ = geometry_of(pairs)
    if shift > 23 or first << shift < 1 << 23:
        return False
    low, high = pair_floats(pairs.values.cpu())
    sums = (low + high).abs()
    return bool(((sums == 0) | (sums >= FAST_MIN_SUM)).all())  # NaN: False


def runtime_available(device: torch.device) -> bool:
    """NVRTC through torch (`torch.cuda._compile_kernel`) and a GPU of sm_80 or newer (cvt.rn.bf16x2)."""
    if device.type != "cuda" or not hasattr(torch.cuda, "_compile_kernel"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def prefix_values(
    numel: int, dtype: torch.dtype, block: int | None, table_entries: int | None, address: int
) -> int:
    """Values of a flat weight the resident kernel can quantize (a prefix of whole turns), 0 where it
    cannot: bf16 at a 16-byte aligned address, a power-of-two block of 16-1,024 values, a pair table of
    at most MAX_TABLE_BYTES (None: the codebook has none), at least one turn."""
    if table_entries is None or block is None or dtype != torch.bfloat16 or address % 16:
        return 0
    if not (MIN_BLOCK <= block <= MAX_BLOCK and block & (block - 1) == 0):
        return 0
    if table_entries * 8 > MAX_TABLE_BYTES:
        return 0
    return numel // TURN * TURN


@dataclass(frozen=True)
class ResidentPlan:
    """A launch `plan` settled: the compiled kernel, its table, the n_main values it quantizes, and how."""

    kernel: Any
    pairs: MeanPairs
    n_main: int
    variant: Variant = Variant()

    def run(self, x: Tensor, out: Tensor, absmax: Tensor) -> None:
        """Quantize the first n_main values of flat bf16 `x` into `out` and their blocks' absmax into
        `absmax` (NaN for a non-finite block), on x's device's current stream."""
        table = self.pairs.values.to(x.device)
        n_turns = self.n_main // TURN
        device_index = _device_index(x.device)
        threads, fast = self.variant.threads, self.variant.fast
        sms, smem, most_threads = _multiprocessor(device_index)
        per_sm = programs_per_sm(self.variant.per_sm, threads, table.numel() * 8, smem, most_threads)
        programs = min(sms * per_sm, -(-n_turns // (threads // 32)))
        args = [x, out, absmax, table, table.numel(), n_turns, *geometry_of(self.pairs), int(fast)]
        with torch.cuda.device(device_index):  # x's device and its current stream, whatever is current
            self.kernel(grid=(programs, 1, 1), block=(threads, 1, 1), args=args, shared_mem=table.numel() * 8)


def plan(
    x: Tensor, block: int | None, pairs: MeanPairs | None, variant: Variant = Variant()
) -> ResidentPlan | None:
    """The resident launch for flat `x` (`prefix_values` of it) where its device runs the kernel
    (`runtime_available`, and it compiles: a failure warns once and leaves every value to the Triton
    kernel), else None. The fast path only where `fast_exact` holds for the table."""
    entries = pairs.values.numel() if pairs is not None else None
    n_main = prefix_values(x.numel(), x.dtype, block, entries, x.data_ptr())
    if not n_main or not runtime_available(x.device):
        return None
    assert block is not None and pairs is not None
    geometry = geometry_of(pairs) if variant.constant else None
    compiled = replace(variant, fast=True)  # the fast path is a launch argument: one kernel for both
    kernel = _kernel(block, compiled, geometry, _device_index(x.device))
    if kernel is None:
        return None
    return ResidentPlan(kernel, pairs, n_main, replace(variant, fast=variant.fast and fast_exact(pairs)))


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _kernel(block: int, variant: Variant, geometry: Geometry | None, device_index: int) -> Any:
    """The compiled kernel, or None (warned once) where NVRTC fails: the Triton kernel runs instead."""
    try:
        with torch.cuda.device(device_index):
            return torch.cuda._compile_kernel(source_for(block, variant, geometry), "pairs_fake_quantize")
    except Exception as e:  # a missing libnvrtc, a torch whose private API changed: not the user's error
        warnings.warn(
            f"kernels.cuda_pairs: the resident pair kernel did not compile for block {block} ({e!r}); "
            "the Triton kernel quantizes these weights instead (same bits, slower at 7-8 bits)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def programs_per_sm(
    per_sm: int, threads: int, table_bytes: int, smem: int | None, most_threads: int | None
) -> int:
    """Programs a multiprocessor runs at once: `per_sm`, fewer where its shared memory (`smem` bytes,
    each program's table plus the 1 KB the runtime reserves a program) or its threads do not hold that
    many (a program that waits for another to finish would run its turns after the others), at least 1."""
    fit = per_sm
    if smem:
        fit = min(fit, smem // (table_bytes + 1024))
    if most_threads:
        fit = min(fit, most_threads // threads)
    return max(fit, 1)


@functools.cache
def _multiprocessor(device_index: int) -> tuple[int, int | None, int | None]:
    """(multiprocessors, shared memory bytes and threads a multiprocessor; None where torch lacks them)."""
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_multiprocessor", None)
    return props.multi_processor_count, smem, getattr(props, "max_threads_per_multi_processor", None)
