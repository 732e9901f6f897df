"""A toy quantization method, registered exactly as `rtn` is: proof that a method is one module.

`toy` shrinks every weight toward zero by `scale`, then rounds it to the nearest code with RTN's
kernel; storage is RTN's. Tests name this module in `plugins=[tests.pipeline.toy_method]`, so the
driver and every Ray worker import it and find `toy` in `METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.methods import Method, QuantizeRequest, register_method


@dataclass(frozen=True)
class ToyParams:
    scale: float = 0.9  # multiplies every weight before rounding

    def __post_init__(self) -> None:
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"toy scale={self.scale} is not allowed; use 0 < scale <= 1")


@torch.no_grad()
def quantize_(request: QuantizeRequest) -> None:
    from kernels import fake_quantize

    scale = dict(request.recipe.params)["scale"]
    for name, view in request.weights.items():
        view.copy_(fake_quantize(view * scale, request.recipe.spec, keep_columns=request.keep.get(name)))


TOY = register_method(
    Method(
        name="toy",
        quantize_=quantize_,
        description="shrink by `scale`, then round to nearest (a test's method)",
        params=ToyParams,
        dtypes=("int", "nf"),
        bits=(3, 4),
    )
)
