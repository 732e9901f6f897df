"""`Recipe`: everything that changes a quantized model, in one frozen value.

A recipe names a registered method (`pipeline.methods.METHODS`), the data type, bits, block size,
exponent bits and centering of its codes (`kernels.QuantSpec`), the proxy-quantization outlier
fraction, the scope (embeddings, LM head) and the method's own parameters. It is validated at
construction, so a bad value fails in pre-flight, naming the value and what is allowed.

A mixed-precision recipe (`allocation` "knapsack", "shiftadd" or "search") gives each linear layer
one of its `candidates` (code labels such as "nf3-b64", or "16-bit") within `target_bits` per quantized
parameter; its own code fields are rewritten to its cheapest quantized candidate's, so one allocation is
one job key.

The 16-bit baseline has one spelling: `bits=16`. Whatever else a 16-bit recipe says, it is
rewritten to `BASELINE` (method and dtype "none", nothing else set), so every 16-bit cell of a sweep
is one job and one row, whichever method axis it came from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.allocators import HESSIAN, SearchSpec
from pipeline.calibration import CalibrationSpec

if TYPE_CHECKING:
    from kernels import QuantSpec

BASELINE_BITS = 16
NONE = "none"  # method and dtype of the 16-bit baseline
UNIFORM = "uniform"  # every layer the recipe's codes (pipeline.methods.candidates.UNIFORM)
ParamPairs = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Recipe:
    """One quantization recipe; `bits=16` is the unquantized baseline.

    Attributes:
        method: a key of `METHODS` ("rtn": round-to-nearest, the paper's zero-shot quantization).
        dtype, bits, block_size, exponent_bits, centering: the codes, as `kernels.QuantSpec` takes them.
        outlier_fraction: p of proxy quantization (input columns kept in 16 bits); 0: off.
        quantize_embeddings, quantize_lm_head: the scope beyond the linear layers.
        params: the method's own parameters as sorted (name, value) pairs, defaults filled in.
        calibration: the calibration text of a method (or allocation) that needs one; else always None.
        allocation: "uniform" (every layer these codes), "knapsack", "shiftadd" or "search"
            (`pipeline.methods.allocation`).
        target_bits: bits per quantized parameter, block constants included (knapsack; uniform: None).
        candidates: the code labels a layer may receive, canonical and cheapest first (uniform: empty).
        sensitivity: the knapsack's and shiftadd's layer scores: "hessian", "measured", "first_order"
            (`pipeline.methods.sensitivity`); "hessian" wherever it is unused.
        search: the search allocator's settings (`SearchSpec`); None for every other allocation.

    Raises:
        KeyError: an unknown method or data type (with close matches).
        ValueError: a value the method or the data type does not take.
    """

    method: str = "rtn"
    dtype: str = "int"
    bits: int = 4
    block_size: int | None = 64
    exponent_bits: int | None = None
    centering: bool = False
    outlier_fraction: float = 0.0
    quantize_embeddings: bool = False
    quantize_lm_head: bool = False
    params: ParamPairs = ()
    calibration: CalibrationSpec | None = None
    allocation: str = UNIFORM
    target_bits: float | None = None
    candidates: tuple[str, ...] = ()
    sensitivity: str = HESSIAN
    search: SearchSpec | None = None

    def __post_init__(self) -> None:
        if self.allocation != UNIFORM:
            self._resolve_allocation()
        else:  # like calibration for a method without one: whatever a sweep set for every grid
            from pipeline.methods.candidates import check_allocation

            check_allocation(self.allocation, None, ())
            object.__setattr__(self, "target_bits", None)
            object.__setattr__(self, "candidates", ())
        if self.allocation in (UNIFORM, "search"):  # unused there: one key whatever a sweep set
            object.__setattr__(self, "sensitivity", HESSIAN)
        if self.allocation != "search":
            object.__setattr__(self, "search", None)
        if self.bits == BASELINE_BITS:
            for name, value in _BASELINE_FIELDS.items():
                object.__setattr__(self, name, value)
            return
        from pipeline.methods import METHODS

        method = METHODS[self.method]
        object.__setattr__(self, "outlier_fraction", float(self.outlier_fraction))
        object.__setattr__(self, "params", method.resolve_params(dict(self.params)))
        check_fraction(self.outlier_fraction)
        for name in ("quantize_embeddings", "quantize_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; use true or false")
        if not (method.needs_calibration or self.is_mixed):
            object.__setattr__(self, "calibration", None)
        elif self.calibration is None or self.calibration.source is None:
            who = (
                f"quant.allocation={self.allocation!r}" if self.is_mixed else f"quant.method={self.method!r}"
            )
            raise ValueError(
                f"{who} needs calibration text: set quant.calibration.source "
                "(corpus:train, a text file, file.jsonl:field or file.parquet:column)"
            )
        method.check(self)
        _ = self.spec  # the codes validate
        for label in self.candidates:  # each candidate must suit the method too
            _ = self.candidate(label)

    def _resolve_allocation(self) -> None:
        """Check the allocation fields, make them canonical, and take the cheapest candidate's codes."""
        from pipeline.allocators import check_sensitivity
        from pipeline.methods.candidates import candidate_codes, check_allocation

        labels = check_allocation(self.allocation, self.target_bits, tuple(self.candidates))
        check_sensitivity(self.sensitivity)
        if self.allocation == "search" and self.search is None:
            object.__setattr__(self, "search", SearchSpec())
        object.__setattr__(self, "candidates", labels)
        object.__setattr__(self, "target_bits", float(self.target_bits))  # type: ignore[arg-type]
        codes = next(c for c in map(candidate_codes, labels) if c is not None)
        for name, value in codes.items():
            object.__setattr__(self, name, value)

    @property
    def is_mixed(self) -> bool:
        """Whether layers get different candidates (an allocation other than uniform)."""
        return self.allocation != UNIFORM

    def candidate(self, label: str) -> Recipe:
        """The uniform recipe of one candidate: this recipe with the candidate's codes (16-bit: BASELINE)."""
        from pipeline.methods.candidates import candidate_codes

        codes = candidate_codes(label)
        if codes is None:
            return BASELINE
        return dataclasses.replace(
            self,
            allocation=UNIFORM,
            target_bits=None,
            candidates=(),
            sensitivity=HESSIAN,
            search=None,
            **codes,
        )

    @classmethod
    def of(cls, spec: QuantSpec | None, method: str = "rtn", **fields: Any) -> Recipe:
        """The recipe quantizing to `spec`'s codes (None: the baseline) with the other `fields` set."""
        if spec is None:
            return BASELINE
        codes = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        return cls(method=method, **codes, **fields)

    @property
    def is_baseline(self) -> bool:
        return self.bits == BASELINE_BITS

    @functools.cached_property
    def spec(self) -> QuantSpec | None:
        """The codes as `kernels.QuantSpec`; None for the baseline."""
        if self.is_baseline:
            return None
        from kernels import QuantSpec

        return QuantSpec(self.dtype, self.bits, self.block_size, self.exponent_bits, self.centering)

    @property
    def params_json(self) -> str:
        """The method's parameters that differ from its defaults, as canonical JSON ("{}": none).

        The `method_params` column and the analysis label; the job key hashes every parameter.
        """
        if self.is_baseline:
            return "{}"
        from pipeline.methods import METHODS

        defaults = METHODS[self.method].defaults()
        changed = {k: v for k, v in self.params if k not in defaults or defaults[k] != v}
        if self.is_mixed:  # so analysis labels a mixed point apart from its cheapest candidate's
            changed.update(allocation=self.allocation, target_bits=self.target_bits)
            changed["candidates"] = ",".join(self.candidates)
            changed.update(self._allocator_settings())
        return json.dumps(changed, sort_keys=True, separators=(",", ":"))

    @property
    def name(self) -> str:
        """A short label, e.g. "int4-b64", "gptq-nf3-b64-p2%", "16-bit"."""
        if self.is_baseline:
            return "16-bit"
        assert self.spec is not None
        parts = [] if self.method == "rtn" else [self.method]
        if self.is_mixed:
            scored = "" if self.sensitivity == HESSIAN else f"-{self.sensitivity}"
            parts.append(f"{self.allocation}{scored}{self.target_bits:g}[{'+'.join(self.candidates)}]")
        else:
            parts.append(self.spec.name)
        if self.outlier_fraction:
            parts.append(f"p{self.outlier_fraction * 100:g}%")
        parts += [s for s, on in (("emb", self.quantize_embeddings), ("head", self.quantize_lm_head)) if on]
        return "-".join(parts)

    def plain(self) -> dict[str, Any]:
        """JSON-able fields (params as a dict): what the job key hashes. A uniform recipe leaves the
        allocation fields out, so its key is the one it had before they existed; a mixed one leaves out
        the default sensitivity and an absent search, so a knapsack key is the one it had before them."""
        plain = {**dataclasses.asdict(self), "params": dict(self.params)}
        for name in ("sensitivity", "search"):
            del plain[name]
        if not self.is_mixed:
            for name in _ALLOCATION_FIELDS:
                del plain[name]
        else:
            plain["candidates"] = list(self.candidates)
            plain.update(self._allocator_settings())
        return plain

    def _allocator_settings(self) -> dict[str, Any]:
        """The sensitivity unless the default, and the search settings of a search allocation."""
        settings: dict[str, Any] = {}
        if self.sensitivity != HESSIAN:
            settings["sensitivity"] = self.sensitivity
        if self.search is not None:
            settings["search"] = dataclasses.asdict(self.search)
        return settings


_BASELINE_FIELDS: dict[str, Any] = {
    "method": NONE,
    "dtype": NONE,
    "block_size": None,
    "exponent_bits": None,
    "centering": False,
    "outlier_fraction": 0.0,
    "quantize_embeddings": False,
    "quantize_lm_head": False,
    "params": (),
    "calibration": None,
    "allocation": UNIFORM,
    "target_bits": None,
    "candidates": (),
    "sensitivity": HESSIAN,
    "search": None,
}
_ALLOCATION_FIELDS = ("allocation", "target_bits", "candidates")
BASELINE = Recipe(bits=BASELINE_BITS)


def check_fraction(fraction: float) -> None:
    """Proxy quantization's p must be in [0, 1)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"outlier_fraction={fraction} is not allowed; use 0 <= p < 1")
