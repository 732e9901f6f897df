"""Multirun overrides and named sweeps -> a list of typed `Config` cells, fast enough for 35,000 cells.

`pipeline.run` is the driver, not a Hydra launcher: it parses the command's overrides with Hydra's
own `OverridesParser` (so `a,b`, `range(3,9)`, `null`, quoting and lists mean what they mean in
Hydra), composes conf/ once per distinct combination of swept *group* choices (`model=...`,
`eval=...`), checks every distinct swept *value* once against the schema, and then builds each cell
by setting the typed values on the composed dataclass. No Hydra job context, directory or chdir
per cell.

A named sweep (`+sweep=paper`) is `sweeps/<name>.yaml`:
    overrides: [eval=paper, study=paper]        # fixed overrides, before the command line's
    grids:                                      # the union of these cartesian products
      - {quant.dtype: "int,fp", quant.bits: "range(3,9)"}
      - {quant.bits: "16"}
Overrides on the command line win: a key set there replaces that key in every grid, and the
command line's own sweeps multiply every grid.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import (
    GROUPS,
    SWEEPS_DIR,
    Config,
    compose,
    group_options,
    hydra_context,
    list_index_problem,
    replace_path,
    to_config,
)

SWEEP_KEY = "sweep"


class ConfigError(ValueError):
    """Bad overrides or config values; the message lists every bad value and what is allowed."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(dict.fromkeys(problems))  # a value checked in two grids is reported once
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


@dataclass(frozen=True)
class Axis:
    """One swept key and its values (parsed Hydra elements; group choices stay strings)."""

    key: str
    values: tuple[Any, ...]

    @property
    def is_group(self) -> bool:
        return self.key in GROUPS


@dataclass(frozen=True)
class SweepPlan:
    """What to expand: fixed overrides for composition, and the grids whose union is the study."""

    fixed: tuple[str, ...]
    grids: tuple[tuple[Axis, ...], ...]

    @property
    def n_cells(self) -> int:
        """Cells before dedupe (ladders and the 16-bit collapse change the job count later)."""
        total = 0
        for grid in self.grids:
            size = 1
            for axis in grid:
                size *= len(axis.values)
            total += size
        return total


def sweep_names() -> list[str]:
    """The named sweeps in sweeps/."""
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def plan_sweep(overrides: Sequence[str], multirun: bool) -> SweepPlan:
    """Parse the command's overrides (and a `+sweep=<name>` file) into a `SweepPlan`.

    Raises:
        ConfigError: unparsable overrides, an unknown sweep name, or a sweep without `-m`.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(list(overrides))
    except HydraException as err:
        raise ConfigError([_one_line(err)]) from err
    sweep_name = _pop_sweep_name(parsed)
    cli_sweeps = [o for o in parsed if o.is_sweep_override()]
    if cli_sweeps and not multirun:
        bad = ", ".join(o.input_line or o.key_or_group for o in cli_sweeps)
        raise ConfigError([f"{bad}: a sweep needs multirun; add -m (python -m pipeline.run -m ...)"])
    file_fixed, file_grids = _read_sweep_file(sweep_name) if sweep_name else ([], [{}])
    cli_keys = {o.key_or_group for o in parsed}
    ordered = [o for o in parser.parse_overrides(file_fixed) if o.key_or_group not in cli_keys] + parsed
    fixed = tuple(o.input_line or "" for o in ordered if _composes(o))
    common = {o.key_or_group: _axis(o) for o in ordered if not _composes(o)}  # the last one wins
    grids = []
    for grid in file_grids:
        axes = [_axis(o) for o in parser.parse_overrides([f"{k}={v}" for k, v in grid.items()])]
        grids.append(tuple(a for a in axes if a.key not in common) + tuple(common.values()))
    return SweepPlan(fixed=fixed, grids=tuple(_dedupe_grids(grids)))


def _composes(override: Any) -> bool:
    """Whether Hydra must apply `override` (a group choice, an add/delete, a hydra.* key)."""
    if override.is_delete() or override.is_add() or override.is_force_add() or override.is_hydra_override():
        return True
    return override.key_or_group in GROUPS and not override.is_sweep_override()


def expand(plan: SweepPlan) -> list[Config]:
    """Every cell of `plan` as a typed `Config` (duplicates included; `jobs` dedupes).

    Raises:
        ConfigError: every override that does not compose or does not fit the schema.
    """
    problems = _check_group_choices(plan)
    if problems:
        raise ConfigError(problems)
    with hydra_context():
        composed, problems = _compose_combos(plan)
        base = next(iter(composed.values()))[0] if composed else _try_compose([])
        checked, value_problems = _check_values(plan, base) if base is not None else ({}, [])
    if problems or value_problems:
        raise ConfigError(problems + value_problems)
    cells: list[Config] = []
    for grid in plan.grids:
        groups = [a for a in grid if a.is_group]
        for choice in itertools.product(*(a.values for a in groups)):
            base = composed[_combo_key(groups, choice)][1]
            cells += _grid_cells(base, [a for a in grid if not a.is_group], checked)
    return cells


def _grid_cells(base: Config, axes: Sequence[Axis], checked: dict[tuple[str, Any], Any]) -> list[Config]:
    """The product of `axes` applied to `base`; each distinct sub-config (e.g. `quant`) is built once."""
    typed = [[checked[(a.key, _hashable(v))] for v in a.values] for a in axes]
    heads: dict[str, list[int]] = {}
    for i, axis in enumerate(axes):
        heads.setdefault(axis.key.partition(".")[0], []).append(i)
    parts: dict[tuple[str, tuple[int, ...]], Any] = {}
    cells = []
    for combo in itertools.product(*(range(len(values)) for values in typed)):
        changes = {}
        for head, members in heads.items():
            key = (head, tuple(combo[i] for i in members))
            if key not in parts:
                updates = {axes[i].key: typed[i][combo[i]] for i in members}
                parts[key] = getattr(replace_path(base, updates), head)
            changes[head] = parts[key]
        cells.append(dataclasses.replace(base, **changes) if changes else base)
    return cells


def _pop_sweep_name(parsed: list[Any]) -> str | None:
    """Remove `sweep=<name>` / `+sweep=<name>` from `parsed`; check the name exists."""
    found = [o for o in parsed if o.key_or_group == SWEEP_KEY]
    for o in found:
        parsed.remove(o)
    if not found:
        return None
    if len(found) > 1 or found[0].is_sweep_override():
        raise ConfigError([f"name one sweep (+sweep=<name>); got {[o.input_line for o in found]}"])
    name = str(found[0].value())
    if name not in sweep_names():
        raise ConfigError([f"+sweep={name}: no such sweep; allowed: {sweep_names()}"])
    return name


def _read_sweep_file(name: str) -> tuple[list[str], list[dict[str, str]]]:
    from omegaconf import OmegaConf

    path: Path = SWEEPS_DIR / f"{name}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(raw, dict), path
    unknown = set(raw) - {"overrides", "grids"}
    if unknown:
        raise ConfigError([f"{path}: unknown sections {sorted(unknown)}; allowed: ['overrides', 'grids']"])
    fixed = [str(o) for o in raw.get("overrides") or []]
    grids = [{str(k): _as_override_value(v) for k, v in g.items()} for g in raw.get("grids") or [{}]]
    return fixed, grids


def _as_override_value(value: Any) -> str:
    """A YAML scalar from a sweep file as the text after `key=` (null -> "null", True -> "true")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _axis(override: Any) -> Axis:
    """A parsed override as an axis: its sweep values, or its one value."""
    from hydra.core.override_parser.types import Override

    if override.is_interval_sweep():
        raise ConfigError([f"{override.input_line}: interval sweeps need an optimizer; use a,b or range()"])
    if override.is_delete() or override.is_add() or override.is_force_add():
        raise ConfigError([f"{override.input_line}: only plain key=value overrides can be swept"])
    if override.key_or_group in GROUPS:
        values = (
            list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        )
    elif override.is_sweep_override():
        values = [Override._convert_value(v) for v in override.sweep_iterator()]
    else:
        values = [override.value()]
    return Axis(key=override.key_or_group, values=tuple(values))


def _dedupe_grids(grids: list[tuple[Axis, ...]]) -> list[tuple[Axis, ...]]:
    seen: list[tuple[Axis, ...]] = []
    for grid in grids:
        if grid not in seen:
            seen.append(grid)
    return seen


def _combo_key(groups: Sequence[Axis], choice: Sequence[Any]) -> tuple[str, ...]:
    return tuple(f"{a.key}={c}" for a, c in zip(groups, choice, strict=True))


def _check_group_choices(plan: SweepPlan) -> list[str]:
    """Every group choice names a YAML in conf/<group>/ (Hydra's own message lists no nested options)."""
    choices = [tuple(o.split("=", 1)) for o in plan.fixed if o.split("=", 1)[0] in GROUPS]
    choices += [(a.key, v) for grid in plan.grids for a in grid if a.is_group for v in a.values]
    problems = []
    for group, option in dict.fromkeys(choices):
        if option not in group_options(group):
            problems.append(f"{group}={option}: no such {group} config; allowed: {group_options(group)}")
    return problems


def _try_compose(overrides: list[str]) -> Any:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(overrides)
    except (HydraException, OmegaConfBaseException):
        return None


def _compose_combos(plan: SweepPlan) -> tuple[dict[tuple[str, ...], tuple[Any, Config]], list[str]]:
    """Compose once per distinct combination of group choices: key -> (DictConfig, Config)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    composed: dict[tuple[str, ...], tuple[Any, Config]] = {}
    problems: list[str] = []
    for grid in plan.grids:
        groups = [a for a in grid if a.is_group]
        for choice in itertools.product(*(a.values for a in groups)):
            key = _combo_key(groups, choice)
            if key in composed:
                continue
            try:
                cfg = compose([*plan.fixed, *key])
                composed[key] = (cfg, to_config(cfg))
            except (HydraException, OmegaConfBaseException) as err:
                problems.append(f"{' '.join([*plan.fixed, *key]) or '(defaults)'}: {_one_line(err)}")
    return composed, sorted(set(problems))


def _check_values(plan: SweepPlan, cfg: Any) -> tuple[dict[tuple[str, Any], Any], list[str]]:
    """Each distinct swept (key, value) checked against the schema once -> its typed value."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    checked: dict[tuple[str, Any], Any] = {}
    problems: list[str] = []
    trials: dict[str, Any] = {}  # one working copy per key: a deepcopy costs ~10 ms
    for grid in plan.grids:
        for axis in (a for a in grid if not a.is_group):
            for value in axis.values:
                if (axis.key, _hashable(value)) in checked:
                    continue
                if axis.key not in trials or isinstance(value, dict):  # dicts merge: start clean
                    trials[axis.key] = copy.deepcopy(cfg)
                try:
                    OmegaConf.update(trials[axis.key], axis.key, value, merge=True)
                    node = OmegaConf.select(trials[axis.key], axis.key)
                    typed = OmegaConf.to_object(node) if OmegaConf.is_config(node) else node
                    checked[(axis.key, _hashable(value))] = typed
                except (OmegaConfBaseException, ValueError) as err:
                    reason = list_index_problem(cfg, axis.key) or _one_line(err)
                    problems.append(f"{axis.key}={value}: {reason}")
                    trials.pop(axis.key)  # a failed update may leave the node half set
    return checked, problems


def _hashable(value: Any) -> Any:
    return repr(value) if isinstance(value, list | dict) else value


def _one_line(err: BaseException) -> str:
    """An OmegaConf/Hydra error's first meaningful line (their messages carry full-key footers)."""
    text = str(err) if err.__cause__ is None else f"{err}: {err.__cause__}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("full_key:", "object_type=", "reference_type="))]
    return " ".join(kept) or type(err).__name__
