"""The quantization numerics are pinned: a codebook or blockwise change must bump NUMERICS_VERSION."""

from __future__ import annotations

import sys

from kernels.numerics import NUMERICS_VERSION, numerics_digest

# One digest per numerics version; add a line (never edit an old one) when the numerics change.
PINNED = {
    1: "6606417e345348b0c51acc9e63d0aa79861a48908d62df91a089da58021e73f3",
}


def test_numerics_match_the_pinned_digest_of_their_version():
    digest = numerics_digest()
    assert NUMERICS_VERSION in PINNED, (
        f"NUMERICS_VERSION={NUMERICS_VERSION} has no pinned digest; "
        f"add {NUMERICS_VERSION}: {digest!r} to PINNED"
    )
    assert digest == PINNED[NUMERICS_VERSION], (
        "the int/fp/nf/dynamic codebooks or the blockwise quantize/dequantize numerics changed: "
        f"bump NUMERICS_VERSION in kernels/numerics.py and pin {digest!r} for the new version in "
        "tests/kernels/test_numerics.py (every job key changes, so studies rerun their jobs on resume)"
    )


def test_the_version_is_readable_without_torch():
    import subprocess

    code = "import sys, kernels.numerics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
