"""`python -m pipeline.run --help`: config groups, keys with defaults, named sweeps, flags, exit codes.

Built from the files themselves (conf/, sweeps/, the dataclasses' source in pipeline/config.py) by
reading text, without importing pandas, torch, Ray or Hydra, so it answers in well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_SOURCE = Path(__file__).with_name("config.py")

# The config dataclasses in the order a user meets them, and the prefix of their keys.
SECTIONS = (
    ("Config", ""),
    ("ModelConfig", "model."),
    ("QuantConfig", "quant."),
    ("CalibrationConfig", "quant.calibration."),
    ("EvalConfig", "eval."),
    ("PerplexityConfig", "eval.perplexity[i]."),
    ("RayConfig", "ray."),
)
SKIP = {"model", "quant", "eval", "ray", "calibration"}  # nested sections, listed on their own

EXIT_CODES = (
    (0, "every job ok (or nothing left to run)"),
    (1, "some job failed or did not run"),
    (2, "bad config or command line: nothing ran"),
    (3, "the study is in use by another driver"),
    (130, "interrupted (Ctrl-C)"),
    (143, "terminated (SIGTERM)"),
)

USAGE = """\
usage: python -m pipeline.run [-m] [--cfg] [key=value ...]
       python -m pipeline.run                 # no arguments: the demo study (sweeps/demo.yaml)

  -m, --multirun   expand comma lists, range(...) and named grids into a sweep (a,b runs both)
  --cfg            print the composed config of the first cell and exit
  +sweep=<name>    a named grid from sweeps/ (below); more overrides on the command line narrow it
  dry_run=true     plan only: cells, jobs, what is done already; nothing runs
  -h, --help       this text

examples:
  python -m pipeline.run -m quant.dtype=int,fp,nf quant.bits='range(3,9)' quant.block_size=64,null \\
      model.name_or_path=<dir-or-hub-id> study=my_study
  python -m pipeline.run -m +sweep=paper model.name_or_path=<dir-or-hub-id> dry_run=true
"""


def config_keys(source: str) -> list[tuple[str, str, str]]:
    """(key, default, comment) of every field of the config dataclasses, read from their source."""
    tree = ast.parse(source)
    lines = source.splitlines()
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    keys = []
    for name, prefix in SECTIONS:
        for stmt in classes[name].body if name in classes else ():
            if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
                continue
            key = stmt.target.id
            if key in SKIP:
                continue
            keys.append((prefix + key, _default(stmt.value), _comment(lines[stmt.lineno - 1])))
    return keys


def _default(value: ast.expr | None) -> str:
    """A field's default as a user types it on the command line."""
    if value is None:
        return "(required)"
    if isinstance(value, ast.Constant):
        v = value.value
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    if isinstance(value, ast.Call):
        factory = next((k.value for k in value.keywords if k.arg == "default_factory"), None)
        if factory is not None:
            return {"list": "[]", "dict": "{}"}.get(ast.unparse(factory), "(a list: see conf/eval/)")
    return ast.unparse(value)


def _comment(line: str) -> str:
    return line.split("  # ", 1)[1].strip() if "  # " in line else ""


def groups(conf: Path) -> list[tuple[str, list[str]]]:
    """Config groups (conf/<group>/<option>.yaml, nested folders as group/sub) and their options."""
    found: dict[str, list[str]] = {}
    for path in sorted(conf.rglob("*.yaml")):
        rel = path.relative_to(conf)
        if len(rel.parts) > 1:
            found.setdefault(rel.parts[0], []).append("/".join(rel.with_suffix("").parts[1:]))
    return sorted(found.items())


def sweeps(folder: Path) -> list[tuple[str, str]]:
    """Named sweeps and the first line of their header comment."""
    out = []
    for path in sorted(folder.glob("*.yaml")):
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "#")
        text = first.lstrip("# ").strip()
        out.append((path.stem, text if len(text) <= 72 else text[:71].rsplit(" ", 1)[0] + " ..."))
    return out


def help_text(root: Path = ROOT) -> str:
    width = 34
    parts = [USAGE, "config groups (group=option):"]
    parts += [f"  {name:<{width - 2}}{', '.join(options)}" for name, options in groups(root / "conf")]
    parts += ["", "named sweeps (+sweep=<name>):"]
    parts += [f"  {name:<{width - 2}}{first}" for name, first in sweeps(root / "sweeps")]
    parts += ["", "keys (key=value; default, then what it means):"]
    for key, default, comment in config_keys(CONFIG_SOURCE.read_text()):
        entry = f"  {key}={default}"
        parts.append(((f"{entry:<{width}}" if len(entry) < width else f"{entry}  ") + comment).rstrip())
    parts += ["", "exit codes:"]
    parts += [f"  {code:<5}{meaning}" for code, meaning in EXIT_CODES]
    parts += ["", "docs: README.md, docs/ARCHITECTURE.md; the composed config of a command: add --cfg"]
    return "\n".join(parts)
