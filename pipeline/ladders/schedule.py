"""Learning-rate schedules of ladder training: cosine decay, and warmup-stable-decay (WSD) branches.

A cosine ladder decays to its minimum at its last step, so a checkpoint taken earlier is mid-decay:
its token count and its learning rate change together. A WSD ladder holds the peak rate after the
warm-up; each kept member is a *branch* of that stable run that cools down linearly over its last
`cooldown_frac` of steps to the same minimum, so members differ in tokens, not in how far they decayed.
Pure functions of plain numbers (no torch): `configs` validates with them and `train` steps with them.
"""

from __future__ import annotations

import math


def warmup_lr(step: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up: `peak * (step + 1) / warmup_steps` (step 0-based, step < warmup_steps)."""
    return peak * (step + 1) / warmup_steps


def cosine_lr(step: int, warmup_steps: int, steps: int, peak: float, min_lr_ratio: float) -> float:
    """Linear warm-up, then cosine decay from `peak` to `peak * min_lr_ratio` at `steps`."""
    if step < warmup_steps:
        return warmup_lr(step, warmup_steps, peak)
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    floor = peak * min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def cooldown_start(keep_steps: int, cooldown_frac: float) -> int:
    """The step at which the branch kept at `keep_steps` leaves the stable run: keep_steps·(1 − frac),
    rounded half up, and at least one step before the end (every branch cools down)."""
    return min(keep_steps - 1, math.floor(keep_steps * (1 - cooldown_frac) + 0.5))


def wsd_lr(
    step: int,
    warmup_steps: int,
    peak: float,
    min_lr_ratio: float,
    keep_steps: int | None = None,
    cooldown_frac: float = 0.2,
) -> float:
    """The WSD rate at 0-based `step`: warm-up, then `peak`; on the branch kept at `keep_steps` (None:
    the stable run), a linear decay from `cooldown_start` that reaches `peak * min_lr_ratio` at its
    last step (`keep_steps - 1`)."""
    if step < warmup_steps:
        return warmup_lr(step, warmup_steps, peak)
    if keep_steps is None:
        return peak
    start = cooldown_start(keep_steps, cooldown_frac)
    if step < start:
        return peak
    floor = peak * min_lr_ratio
    return peak + (floor - peak) * (step - start + 1) / (keep_steps - start)
