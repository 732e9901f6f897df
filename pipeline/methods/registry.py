"""The `METHODS` registry: a quantization method is one module that registers one `Method` record.

A record says what the method is called, its own parameters (a frozen dataclass with defaults that
validates itself), whether it needs calibration data, which data types and bit widths it takes, and
the one function that quantizes a resident model's selected weights in place. `Recipe` validates
against the record in pre-flight; `pipeline.models.quantize_model_` calls it on the worker and
counts the bits (`weight_bits`: storage per matrix, RTN's unless the method stores something else).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kernels.registry import Registry, unknown_name

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pipeline.recipe import ParamPairs, Recipe


class QuantizationError(RuntimeError):
    """Quantization produced a non-finite weight (NaN or Inf)."""


@dataclass
class QuantizeRequest:
    """What a method's `quantize_` gets: the resident model and the views it writes in place.

    Attributes:
        model: the resident model (its selected weights are already views in `weights`).
        weights: parameter name -> `[out, in]` view of every weight in the recipe's scope.
        keep: parameter name -> input columns proxy quantization keeps in 16 bits.
        recipe: the recipe (`recipe.spec` the codes, `recipe.params` the method's parameters).
        cache: per-model state the worker keeps across jobs of one model (e.g. Hessians); empty after a
            model load. A method must key what it stores by everything the stored value depends on.
        calibration: int64 [n_samples, seq_len] calibration token windows (methods that need them).
    """

    model: nn.Module
    weights: dict[str, Tensor]
    keep: dict[str, Tensor]
    recipe: Recipe
    cache: dict[Any, Any] = field(default_factory=dict)
    calibration: Tensor | None = None


WeightBits = Callable[["Recipe", tuple[int, ...], int], int]
CODEBOOK_BITS = tuple(range(2, 16))  # a method's default widths; each data type narrows them (fp: 3..)


@dataclass(frozen=True)
class Method:
    """One registered quantization method.

    Attributes:
        name: the `quant.method` value.
        quantize_: writes quantized values into `request.weights` in place; raises
            `QuantizationError` on a non-finite result and `ValueError` on a weight it cannot take.
        description: one line for docs and `--help`.
        params: a frozen dataclass of the method's own parameters (defaults for all; `__post_init__`
            raises ValueError naming a bad value); None: the method has none.
        needs_calibration: whether the method reads calibration text (`quant.calibration`).
        dtypes: the data types it takes; None: every codebook data type (`kernels.CODEBOOKS`; bcq,
            which has no codebook, only where named).
        bits: the bit widths it takes (the baseline, 16, is not a method's business); a recipe's bits
            must also be its data type's (`kernels.codebooks.DataType.bits`).
        weight_bits: (recipe, [out, in] shape, kept columns) -> stored bits of one matrix; None: RTN's
            (`kernels.weight_bits` of `recipe.spec`): the method changes values, not storage.
        extra_check: raises ValueError for a recipe the method cannot run (beyond dtypes and bits).
    """

    name: str
    quantize_: Callable[[QuantizeRequest], None]
    description: str
    params: type | None = None
    needs_calibration: bool = False
    dtypes: tuple[str, ...] | None = None
    bits: tuple[int, ...] = CODEBOOK_BITS
    weight_bits: WeightBits | None = None
    extra_check: Callable[[Recipe], None] | None = None

    def resolve_params(self, given: Mapping[str, Any]) -> ParamPairs:
        """`given` checked against `params`, defaults filled in, as sorted (name, value) pairs."""
        if self.params is None:
            if given:
                raise ValueError(f"quant.method={self.name!r} takes no parameters; got {sorted(given)}")
            return ()
        allowed = [f.name for f in dataclasses.fields(self.params)]
        for name in given:
            if name not in allowed:
                raise unknown_name(f"parameter of method {self.name!r}", name, allowed)
        values = dataclasses.asdict(self.params(**given))
        return tuple(sorted(values.items()))

    def defaults(self) -> dict[str, Any]:
        """The method's parameters at their defaults."""
        return {} if self.params is None else dataclasses.asdict(self.params())

    def check(self, recipe: Recipe) -> None:
        """Raise ValueError unless the method takes the recipe's data type, and its bits with that type."""
        from kernels.codebooks import CODEBOOKS, DATA_TYPES, bit_ranges

        kind = DATA_TYPES[recipe.dtype]  # an unknown name: KeyError with close matches
        dtypes = list(CODEBOOKS) if self.dtypes is None else list(self.dtypes)
        if recipe.dtype not in dtypes:
            raise ValueError(
                f"quant.method={self.name!r} does not take dtype={recipe.dtype!r}; allowed: {dtypes}"
            )
        allowed = tuple(b for b in self.bits if b in kind.bits)
        if recipe.bits not in allowed:
            raise ValueError(
                f"quant.method={self.name!r} does not take bits={recipe.bits} with dtype={recipe.dtype!r}; "
                f"allowed: {bit_ranges(allowed)} (16: the unquantized baseline)"
            )
        if self.extra_check is not None:
            self.extra_check(recipe)

    def typical_codes(self) -> dict[str, Any]:
        """A data type and bits the method takes (int, 4 where it can): what pre-flight checks each
        other field of a recipe beside, so that one bad value is named once."""
        from kernels.codebooks import CODEBOOKS, DATA_TYPES

        dtypes = list(CODEBOOKS) if self.dtypes is None else list(self.dtypes)
        dtype = "int" if "int" in dtypes else dtypes[0]
        allowed = [b for b in self.bits if b in DATA_TYPES[dtype].bits]
        return {"dtype": dtype, "bits": 4 if 4 in allowed else max(allowed)}


METHODS: Registry[Method] = Registry("quantization method")


def register_method(method: Method) -> Method:
    """Add a method to `METHODS` (a second method of the same name is an error)."""
    return METHODS.register(method.name, method)
