"""The allocators' own settings, light enough for `Recipe` to import (no torch): `quant.sensitivity`
and `quant.search` (docs/ARCHITECTURE.md, "Mixed precision")."""

from __future__ import annotations

from dataclasses import dataclass

SENSITIVITIES = ("hessian", "measured", "first_order")  # pipeline.methods.sensitivity
HESSIAN = "hessian"


@dataclass(frozen=True)
class SearchSpec:
    """`quant.search`: the differentiable search's settings (`pipeline.methods.search`).

    Attributes:
        steps: Adam steps on the per-layer logits (1..100000).
        lr: Adam's learning rate (0 < lr <= 10).
        lam: the weight of the budget penalty max(0, expected bits per parameter − target) (>= 0);
            `quant.search.lam` (lambda is a Python keyword).
        batch_size: calibration windows per step (>= 1).
        temperature: the Gumbel-softmax temperature (> 0).
        seed: the Gumbel noise's seed.
    """

    steps: int = 100
    lr: float = 0.1
    lam: float = 10.0
    batch_size: int = 4
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "steps": (isinstance(self.steps, int) and 1 <= self.steps <= 100_000, "an integer 1..100000"),
            "lr": (0 < self.lr <= 10, "0 < lr <= 10"),
            "lam": (0 <= self.lam < float("inf"), "a finite value >= 0"),
            "batch_size": (isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
            "temperature": (0 < self.temperature < float("inf"), "a finite value > 0"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"quant.search.{name}={getattr(self, name)!r} is not allowed; use {allowed}")


def check_sensitivity(sensitivity: str) -> None:
    """Raise KeyError (with close matches) on an unknown `quant.sensitivity`."""
    if sensitivity not in SENSITIVITIES:
        from kernels.registry import unknown_name

        raise unknown_name("quant.sensitivity", sensitivity, SENSITIVITIES)
