"""k-bit blockwise quantization: data types, exact bit accounting, a fused GPU kernel.

    from kernels import QuantSpec, fake_quantize, bits_per_param
    spec = QuantSpec(dtype="fp", bits=4, block_size=64)
    w_hat = fake_quantize(w, spec)           # same shape and torch dtype as w
    bits_per_param(spec, w.shape)            # 4.25

This package never imports ray, hydra, transformers or lm-eval, nor triton until a CUDA tensor is
quantized with it. The names below load on first use (PEP 562), so `import kernels.registry` costs
no torch: `analysis` and the config checks use the registry helpers without it.

Deliberately no `__version__` here: transformers probes the import name `kernels` for the Hugging Face
hub-kernels package and, when no distribution metadata answers, reads `kernels.__version__`; without it
the probe reports the integration unavailable (see tests/kernels/test_hf_kernels_clash.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kernels.blockwise import QuantizedTensor, dequantize, fake_quantize, quantize
    from kernels.codebooks import CODEBOOKS, codebook, default_exponent_bits
    from kernels.packing import bits_per_param, pack, unpack, weight_bits
    from kernels.spec import QuantSpec

_HOME = {
    "QuantizedTensor": "blockwise",
    "dequantize": "blockwise",
    "fake_quantize": "blockwise",
    "quantize": "blockwise",
    "CODEBOOKS": "codebooks",
    "codebook": "codebooks",
    "default_exponent_bits": "codebooks",
    "bits_per_param": "packing",
    "pack": "packing",
    "unpack": "packing",
    "weight_bits": "packing",
    "QuantSpec": "spec",
}
__all__ = [
    "CODEBOOKS",
    "QuantSpec",
    "QuantizedTensor",
    "bits_per_param",
    "codebook",
    "default_exponent_bits",
    "dequantize",
    "fake_quantize",
    "pack",
    "quantize",
    "unpack",
    "weight_bits",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kernels.{_HOME[name]}"), name)
