"""Quantization methods: the `METHODS` registry and the built-in methods.

    rtn   round-to-nearest (the paper's zero-shot quantization): `pipeline/methods/rtn.py`
    gptq  GPTQ one-shot quantization with calibration data: `pipeline/methods/gptq.py`
    bcq   binary-coding quantization (ShiftAddLLM's codes), no data: `pipeline/methods/bcq.py`
    shiftadd  the same codes in GPTQ's column loop (ShiftAddLLM): `pipeline/methods/bcq.py`

A new method is one module that calls `register_method(Method(...))` at import: built-in ones are
imported below; any other module is named in `plugins=[my_pkg.my_method]` and imported by the
driver and every worker. See docs/ARCHITECTURE.md, "Where things go".
"""

from pipeline.methods import bcq, gptq, rtn
from pipeline.methods.registry import METHODS, Method, QuantizationError, QuantizeRequest, register_method

__all__ = [
    "METHODS",
    "Method",
    "QuantizationError",
    "QuantizeRequest",
    "bcq",
    "gptq",
    "register_method",
    "rtn",
]
