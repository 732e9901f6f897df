"""`NUMERICS_VERSION`: the version of the quantization numerics, part of every job key.

A change to a codebook or to the blockwise kernels (absmax, nearest-code search, centering, the
quantile estimate, the decode) changes the numbers a job reports without changing its config, so
the job key carries this version: bumping it makes every study rerun its quantized jobs on resume.
`numerics_digest` hashes what these numerics produce for fixed inputs; `tests/kernels/test_numerics.py`
pins the digest of each version and fails with "bump NUMERICS_VERSION" when the output changes.
GPTQ's solve (`kernels.gptq`) is not in the digest (BLAS-dependent rounding would make it flaky):
bump the version by hand when it changes what it computes.

Importing this module costs no torch (`pipeline.jobs` reads the version in the driver).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

NUMERICS_VERSION = 1

DIGEST_DTYPES = ("int", "fp", "nf", "dynamic")  # the data-independent codebooks, every bits 3..8
DIGEST_BITS = tuple(range(3, 9))
# (dtype, bits, block_size, centering) quantized blockwise (torch reference) on `digest_tensor()`
DIGEST_SPECS: tuple[tuple[str, int, int | None, bool], ...] = (
    ("int", 4, 64, False),
    ("int", 8, None, False),
    ("fp", 4, 64, False),
    ("fp", 3, 32, True),
    ("nf", 4, 64, False),
    ("nf", 3, 128, True),
    ("dynamic", 5, 64, False),
    ("quantile", 4, 64, False),
)


def numerics_digest() -> str:
    """sha256 hex of every digest codebook and of blockwise quantize/dequantize of a fixed tensor."""
    import torch

    from kernels.blockwise import dequantize, quantize
    from kernels.codebooks import codebook, max_exponent_bits
    from kernels.spec import QuantSpec

    digest = hashlib.sha256()
    for dtype in DIGEST_DTYPES:
        for bits in DIGEST_BITS:
            widths = range(1, max_exponent_bits(bits) + 1) if dtype == "fp" else (None,)
            for exponent_bits in widths:
                digest.update(f"{dtype}{bits}e{exponent_bits}".encode())
                digest.update(codebook(dtype, bits, exponent_bits).numpy().tobytes())
    w = digest_tensor()
    for dtype, bits, block_size, centering in DIGEST_SPECS:
        spec = QuantSpec(dtype, bits, block_size, centering=centering)
        q = quantize(w, spec, impl="torch")
        mean = q.mean if q.mean is not None else torch.zeros(0)
        digest.update(spec.name.encode())
        for part in (q.codes, q.absmax, q.codebook, dequantize(q), mean):
            digest.update(part.contiguous().numpy().tobytes())
    return digest.hexdigest()


def digest_tensor() -> Tensor:
    """A fixed float32 [48, 160] weight without an RNG: smooth rows, a few outliers, a zero block."""
    import torch

    i = torch.arange(48 * 160, dtype=torch.float64)
    w = torch.sin(i * 0.731) * torch.cos(i * 0.0173) * (1.0 + (i % 37) / 11.0)
    w[::97] *= 9.0  # outliers set each block's absmax
    w[:64] = 0.0  # an all-zero block (the tiny-absmax path)
    return w.to(torch.float32).reshape(48, 160)
