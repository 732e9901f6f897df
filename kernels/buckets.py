"""The host side of the fused quantizer's bucketed search (`triton_fused.SEARCH_BUCKET`): how float32 xn
splits into buckets by its bits, and per codebook the table of each bucket's first code and the window of
compares that finishes it. Pure torch (no Triton), so it is tested and reasoned about on its own; the
kernel's `_bucket` mirrors `bucket_index` step for step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.codebooks import Levels

BUCKET_MAX_LEVELS_LOG2 = 8  # the bucketed search takes codebooks of up to 2^8 entries (uint8 starts)
MAX_BUCKETS_LOG2 = 11  # buckets per sign: tables of <= 4096 entries (bytes), copied by every program
MAX_WINDOW = 4  # a bucketed search comparing more midpoints than this falls back to the binary search


@dataclass(frozen=True)
class Buckets:
    """How the bucketed search splits float32 xn by its bits (`bucket_index`; in the kernel `_bucket`).

    Per sign, 2^log2_buckets buckets of |xn|: one for every 2^-mantissa_bits of each power-of-two interval
    below 1.0 (the top M mantissa bits and the exponent), one for [1, +inf], and bucket 0 for everything
    below the lowest interval the others reach. The table lists the positive buckets by rising |xn|, then
    the negative ones by rising xn (a rotation of their order by xn).
    """

    mantissa_bits: int
    log2_buckets: int

    @property
    def shift(self) -> int:
        """Bits of |xn| below the mantissa bits kept."""
        return 23 - self.mantissa_bits

    @property
    def first(self) -> int:
        """|xn|'s bits >> shift in bucket 0's lowest interval; bucket 2^log2_buckets - 2 then ends at 1.0."""
        return (127 << self.mantissa_bits) - (1 << self.log2_buckets) + 1


@dataclass(frozen=True, eq=False)
class BucketTable:
    """The bucketed search's first guess for one codebook (see `_nearest_code_bucket`).

    Attributes:
        buckets: the bucket geometry.
        starts: uint8 [2 x 2^log2_buckets] on the codebook's device, in `Buckets` order: per bucket,
            #(mids < its smallest float), at most 2^k - window (mids[2^k - 1] is +inf: codes stay < 2^k).
        window: J, the most midpoints between a bucket's start and any xn in it (0 <= code - start <= J).
    """

    buckets: Buckets
    starts: Tensor
    window: int


def bucket_index(xn: Tensor, buckets: Buckets) -> Tensor:
    """The kernel's bucket (`_bucket`) of each float32 xn, with the same steps: fmin/fmax keep the number
    of a quiet NaN as PTX's min/max do (xn is a product, so its NaNs are quiet; torch's CPU fmin returns a
    signalling NaN)."""
    low = torch.tensor(buckets.first << buckets.shift, dtype=torch.int32).view(torch.float32)
    magnitude = torch.fmax(torch.fmin(xn.abs(), torch.ones(())), low)
    local = (magnitude.view(torch.int32) >> buckets.shift) - buckets.first
    return torch.where(xn >= 0, local, local ^ ((2 << buckets.log2_buckets) - 1))


def bucket_bounds(buckets: Buckets) -> tuple[Tensor, Tensor]:
    """The smallest and the largest float32 (not NaN) of each bucket, in `Buckets` order: float32
    [2 x 2^log2_buckets] each."""
    step = 1 << buckets.shift
    low = (buckets.first + torch.arange(1 << buckets.log2_buckets, dtype=torch.int64)) * step  # |xn| bits
    high = torch.cat([low[1:] - 1, torch.tensor([0x7F800000])])  # the top bucket up to +inf
    low[0] = 0  # bucket 0 from +0; -0.0 is in it (`xn >= 0`), so its negative twin ends at -2^-149

    def floats(bits: Tensor) -> Tensor:
        return bits.to(torch.int32).view(torch.float32)

    smallest = torch.cat([floats(low), -floats(high.flip(0))])
    return smallest, torch.cat([floats(high), -floats(low.clamp(min=1).flip(0))])


def _starts_and_window(mids: Tensor, buckets: Buckets) -> tuple[Tensor, int]:
    """(#(mids < each bucket's smallest float), the most mids any bucket holds below its largest float)."""
    smallest, largest = bucket_bounds(buckets)
    first, last = torch.searchsorted(mids, smallest), torch.searchsorted(mids, largest)  # #(mids < v)
    return first, int((last - first).max())


@functools.lru_cache(maxsize=64)
def bucket_table(levels: Levels) -> BucketTable | None:
    """The bucket table with the smallest window, then the fewest entries, for these levels.

    None if every table of at most 2 x 2^MAX_BUCKETS_LOG2 entries needs a window over MAX_WINDOW (e.g.
    a quantile codebook with many equal values). Cached per Levels object, as `eytzinger_mids` is; the
    choice reads the mids on the host: one device-to-host copy per new codebook on a GPU (~10 ms).
    """
    mids = levels.mids.cpu()
    # Geometries whose buckets cover at least [1/2, 1] (2^M of them); fewer leave most mids in bucket 0.
    geometries = [Buckets(m, p) for p in range(1, MAX_BUCKETS_LOG2 + 1) for m in range(p)]
    geometries = [g for g in geometries if g.first >= 0]  # bucket 0 starts at |xn| = 0
    windows = {g: _starts_and_window(mids, g)[1] for g in geometries}
    buckets = min(geometries, key=lambda g: (windows[g], g.log2_buckets, g.mantissa_bits))
    window = windows[buckets]
    if window > MAX_WINDOW:
        return None
    starts = _starts_and_window(mids, buckets)[0].clamp(max=mids.numel() - window)
    return BucketTable(buckets, starts.to(torch.uint8).to(levels.mids.device), window)
