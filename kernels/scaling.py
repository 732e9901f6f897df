"""Block scaling facts shared by the torch reference (`blockwise`) and the Triton kernel (`triton_fused`).

Both import from here, so neither imports the other at module level (the reference loads the kernel
lazily, only when a CUDA tensor asks for it).
"""

from __future__ import annotations

import torch
from torch import Tensor

TINY_ABSMAX, TINY_SCALE = 2.0**-64, 2.0**64  # exact powers of two: tiny blocks are scaled up first


def effective_block_size(block_size: int | None, numel: int) -> int:
    """Values per block for a tensor of `numel` values (a block never exceeds the tensor)."""
    return numel if block_size is None else min(block_size, numel)


def check_finite_absmax(absmax: Tensor) -> None:
    """Raise ValueError if any block absmax is NaN/Inf (NaN and Inf propagate into it). Syncs the host."""
    bad = int((~torch.isfinite(absmax)).sum())
    if bad:
        raise ValueError(
            f"w contains NaN or Inf (in {bad} of {absmax.numel()} blocks); "
            "only finite weights can be quantized"
        )
