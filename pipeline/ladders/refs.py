"""Ladder references: `ladder:<name>[/<size>][@<tokens>][+seeds<N>]` -> a ladder and its members.

`ladder:<name>` names every size, `/<size>` (a name or an index) one; a wsd ladder keeps several
members per size (`LadderConfig.keep_tokens`), which those expand to, and `@<tokens>` (an integer or
with a k/M/B suffix, within 1% of a kept count) names one. `+seeds<N>` asks for N trainings of each
member that differ only in their seed (seed, seed+1, ...). Pure parsing: nothing is trained here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.ladders.configs import LADDER_PREFIX, LadderConfig, ModelSize, get_ladder


@dataclass(frozen=True)
class MemberKey:
    """Which member of a ladder: a size, and for a wsd ladder the kept token count."""

    size: ModelSize
    train_tokens: int | None = None  # None: the one member of a cosine ladder's size

    @property
    def folder(self) -> str:
        """The member's folder name in its ladder's folder."""
        return self.size.name if self.train_tokens is None else f"{self.size.name}@{self.train_tokens}"


def is_ladder_ref(name_or_path: str) -> bool:
    """Whether a model name is a ladder reference (`ladder:<name>` or `ladder:<name>/<size>`)."""
    return name_or_path.startswith(LADDER_PREFIX)


SEEDS_SUFFIX = "+seeds"


def split_seeds(ref: str) -> tuple[str, int]:
    """(`ladder:<name>[/<size>]`, N) of a reference with an optional `+seeds<N>` suffix (N = 1 without).

    Raises:
        ValueError: a suffix that is not `+seeds` and an integer >= 1.
    """
    base, sep, count = ref.partition(SEEDS_SUFFIX)
    if not sep:
        return ref, 1
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"{ref!r}: the seeds suffix must be '{SEEDS_SUFFIX}<N>' with N >= 1, e.g. "
                         f"'{base}{SEEDS_SUFFIX}3'")  # fmt: skip
    return base, int(count)


def seed_configs(config: LadderConfig, n_seeds: int) -> list[LadderConfig]:
    """The ladder and its N − 1 reseeded twins (seed + 1, seed + 2, ...); the first is `config` itself,
    so `+seeds1` and no suffix name the same members."""
    return [config] + [dataclasses.replace(config, seed=config.seed + k) for k in range(1, n_seeds)]


def parse_tokens(text: str) -> int:
    """A token count written as an integer or with a k/M/B suffix ("40960", "2.5M", "41k")."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    try:
        value = float(digits) * scale if scale > 1 else int(digits)
    except ValueError:
        raise ValueError(f"token count {text!r} is not an integer or a number with a k/M/B suffix") from None
    if value < 1:
        raise ValueError(f"token count {text!r} must be >= 1")
    return round(value)


def kept_count(config: LadderConfig, text: str) -> int:
    """The kept token count of `config` that `@<text>` names: exactly, or the nearest within 1% (so
    `@2.5M` names 2,490,368 = 76 steps of 32,768); ValueError listing the kept counts otherwise."""
    kept = ", ".join(f"{t} ({format_tokens(t)})" for t in config.keep_tokens)
    if not config.keep_tokens:
        raise ValueError(f"'@{text}': ladder {config.name!r} keeps one member per size (schedule "
                         f"{config.schedule!r}); drop '@{text}'")  # fmt: skip
    value = parse_tokens(text)
    nearest = min(config.keep_tokens, key=lambda t: abs(t - value))
    if abs(nearest - value) > 0.01 * nearest:
        raise ValueError(f"'@{text}' ({value} tokens) is not a kept count of ladder {config.name!r}; "
                         f"allowed: {kept}")  # fmt: skip
    return nearest


def format_tokens(tokens: int) -> str:
    """A short spelling of a token count: 2490368 -> "2.49M", 40960 -> "41k"."""
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{suffix}"
    return str(tokens)


def parse_member_ref(ref: str) -> tuple[LadderConfig, tuple[MemberKey, ...]]:
    """(ladder, the members named) of `ladder:<name>[/<size>][@<tokens>]` (a `+seeds<N>` suffix is
    checked and set aside). A wsd ladder's size names every kept count unless `@<tokens>` picks one.

    Raises:
        KeyError: unknown ladder or size (the message lists the known ones).
        ValueError: not a ladder reference, or a token count the ladder does not keep.
    """
    if not is_ladder_ref(ref):
        raise ValueError(f"{ref!r} is not a ladder reference; expected "
                         f"'{LADDER_PREFIX}<name>[/<size>][@<tokens>][{SEEDS_SUFFIX}<N>]'")  # fmt: skip
    ref, _ = split_seeds(ref)
    body, at, tokens = ref.removeprefix(LADDER_PREFIX).partition("@")
    name, slash, size = body.partition("/")
    config = get_ladder(name)
    sizes = (config.size(size),) if slash else config.sizes
    counts: tuple[int | None, ...] = (kept_count(config, tokens),) if at else (config.keep_tokens or (None,))
    return config, tuple(MemberKey(s, t) for s in sizes for t in counts)


def parse_ladder_ref(ref: str) -> tuple[LadderConfig, tuple[ModelSize, ...]]:
    """(ladder, the sizes named) of `ladder:<name>[/<size>][@<tokens>]` (a `+seeds<N>` suffix is checked
    and set aside: `parse_seeded_ref` gives every seed); KeyError lists known ladders or sizes."""
    config, keys = parse_member_ref(ref)
    return config, tuple(dict.fromkeys(key.size for key in keys))


def parse_seeded_ref(ref: str) -> list[tuple[LadderConfig, tuple[ModelSize, ...]]]:
    """(ladder of each seed, the sizes named) of `ladder:<name>[/<size>][@<tokens>][+seeds<N>]`."""
    config, sizes = parse_ladder_ref(ref)
    return [(seeded, sizes) for seeded in seed_configs(config, split_seeds(ref)[1])]


def parse_seeded_members(ref: str) -> list[tuple[LadderConfig, tuple[MemberKey, ...]]]:
    """(ladder of each seed, the members named) of `ladder:<name>[/<size>][@<tokens>][+seeds<N>]`."""
    config, keys = parse_member_ref(ref)
    return [(seeded, keys) for seeded in seed_configs(config, split_seeds(ref)[1])]
