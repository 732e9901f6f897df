"""`Registry`: the one name -> record map behind every extension point, and the one error for a miss.

Data types (`kernels.CODEBOOKS`), quantization methods (`pipeline.methods.METHODS`) and the other
lookup tables answer an unknown name through `unknown_name`, so every message has one shape:
"unknown <kind> 'x'; did you mean 'y'? (allowed: a, b, c)". No torch here: `pipeline` and
`analysis` import this module without paying for the kernels (see `kernels/__init__.py`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def unknown_name_message(kind: str, name: object, allowed: Iterable[str]) -> str:
    """ "unknown <kind> 'x'; did you mean 'y'? (allowed: a, b)": the one wording of a lookup miss."""
    allowed = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(name), allowed, n=3, cutoff=0.4)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (allowed: {', '.join(allowed)})"


def unknown_name(kind: str, name: object, allowed: Iterable[str]) -> KeyError:
    """The KeyError for a name that is not one of `allowed`, with close matches when there are any."""
    return KeyError(unknown_name_message(kind, name, allowed))


class Registry(Generic[T]):
    """A name -> item map that rejects duplicates and answers an unknown name with close matches."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add `item` under `name`; a second registration of a name is an error."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            raise unknown_name(self.kind, name, self._items)
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
