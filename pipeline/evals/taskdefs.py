"""User task folders (`eval.include_path`): what a task name resolves to, whether it runs offline, and
a content hash of its definition for the job key.

lm-eval indexes task YAMLs from folders (`TaskManager(include_path=...)`, later folders overriding
earlier ones); the pipeline's own folder (`pipeline/evals/tasks`) comes first, then the user's, so a
user's YAML may redefine any task. Indexing these folders alone is cheap (lm-eval's ~14k YAMLs are
indexed only for names they do not define). A task's documents are local when it reads
`dataset_path` as a local folder, a file builder (`json`, `csv`, `parquet`, `text`, `arrow`) with
`dataset_kwargs.data_files` on disk, or a `custom_dataset` function (as the pipeline's own tasks do);
anything else comes from the hub, which pre-flight refuses while the hub is unreachable.

Relative `data_files` are read by `datasets` from the working directory; relative `data_file` (the
pipeline's `load_split`) from the data root. `task_definition_sha256` hashes the YAML and every YAML
it includes, by content, and every local data file it reads, so two definitions of one task name
never share a job key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.evals.tasks import TASKS_DIR

FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
HUB_FIX = (
    "write a task YAML with `dataset_path: json` and `dataset_kwargs: {data_files: {test: /abs/file.jsonl}}` "
    "in a folder and pass it as eval.include_path=[<folder>]"
)


def task_folders(include_path: Sequence[str]) -> list[Path]:
    """The folders lm-eval indexes: the pipeline's own tasks first, then the user's (which override)."""
    return [TASKS_DIR, *(Path(p).expanduser().resolve() for p in include_path)]


def include_path_problems(include_path: Sequence[str]) -> list[str]:
    """Folders that do not exist or hold no YAML, and YAMLs that do not parse (lm-eval skips them)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    problems = []
    for folder in include_path:
        path = Path(folder).expanduser()
        if not path.is_dir():
            problems.append(f"eval.include_path {folder!r} is not a folder")
            continue
        yamls = sorted(path.glob("**/*.yaml"))
        if not yamls:
            problems.append(f"eval.include_path {folder!r} holds no task YAML (*.yaml)")
        for file in yamls:
            try:
                load_yaml(file, resolve_func=False)
            except Exception as err:  # yaml, include and type errors alike
                problems.append(f"task YAML {str(file)!r} cannot be read: {str(err).splitlines()[0]}")
    return problems


def task_index(include_path: Sequence[str], include_defaults: bool = False) -> dict[str, Any]:
    """lm-eval's index (name -> Entry) over `task_folders`, and lm-eval's own tasks if asked."""
    from lm_eval.tasks._index import TaskIndex

    from pipeline.evals.lmeval import quiet_lm_eval

    quiet_lm_eval()  # the pipeline's folder overrides lm-eval's piqa etc. on purpose: no warning per name
    folders = task_folders(include_path)
    if include_defaults:
        import lm_eval.tasks

        folders.insert(0, Path(lm_eval.tasks.__file__).parent)
    return dict(TaskIndex.build(folders))


def member_tasks(name: str, index: dict[str, Any]) -> list[str]:
    """The task names a task, group or tag stands for (itself for a task; members found in `index`)."""
    entry = index.get(name)
    if entry is None:
        return []
    kind = entry.kind.name
    if kind == "GROUP":
        items = (entry.cfg or {}).get("task", [])
        names = [item for item in items if isinstance(item, str)]
        return [t for n in names for t in member_tasks(n, index)]
    if kind == "TAG":
        return sorted(n for n, e in index.items() if name in e.tags and e.kind.name != "TAG")
    return [name]


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _as_list(item)]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _as_list(item)]
    return []


def data_files(cfg: dict[str, Any], data_root: Path) -> list[Path]:
    """The local files a task config reads: `data_files` (from the working directory, as `datasets`
    reads them), `data_file` (from the data root), or every file of a local `dataset_path` folder."""
    kwargs = cfg.get("dataset_kwargs") or {}
    files = [Path(p).expanduser().resolve() for p in _as_list(kwargs.get("data_files"))]
    files += [(data_root / p).resolve() for p in _as_list(kwargs.get("data_file"))]
    folder = Path(str(cfg.get("dataset_path", ""))).expanduser()
    if cfg.get("dataset_path") and folder.is_dir():
        files += sorted(p.resolve() for p in folder.rglob("*") if p.is_file())
    return files


def hub_dataset(cfg: dict[str, Any]) -> str | None:
    """The hub dataset a task config downloads, or None when its documents are local."""
    path = cfg.get("dataset_path")
    if cfg.get("custom_dataset") is not None or not path:
        return None
    if path in FILE_BUILDERS or Path(str(path)).expanduser().is_dir():
        return None
    return str(path)


def offline_problems(names: Iterable[str], index: dict[str, Any], data_root: Path, reason: str) -> list[str]:
    """A message per task that needs the hub (unreachable: `reason`) or a local data file that is missing."""
    problems = []
    for name in names:
        for task in member_tasks(name, index) or [name]:
            entry = index.get(task)
            cfg = (entry.cfg if entry is not None else None) or {}
            dataset = hub_dataset(cfg)
            if dataset is not None and reason:
                where = f" (defined in {str(entry.yaml_path)!r})" if entry is not None else ""
                problems.append(
                    f"lm-eval task {task!r}{where} downloads dataset {dataset!r} from the hub, which is "
                    f"unreachable ({reason}); to run it offline, {HUB_FIX}"
                )
            missing = [str(p) for p in data_files(cfg, data_root) if not p.is_file()]
            if missing:
                problems.append(f"lm-eval task {task!r} reads {missing[0]!r}, which does not exist")
    return problems


class _IncludeLoader(yaml.SafeLoader):
    """A safe loader that reads tags such as `!function` as None: only `include` is wanted."""


_IncludeLoader.add_multi_constructor("!", lambda _loader, _suffix, _node: None)


def _yaml_chain(path: Path, seen: set[Path] | None = None) -> list[Path]:
    """A YAML and every YAML it includes (recursively), in include order."""
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_IncludeLoader)  # a SafeLoader
    includes = _as_list(cfg.get("include")) if isinstance(cfg, dict) else []
    chain = [path]
    for inc in includes:
        chain += _yaml_chain(Path(inc) if Path(inc).is_absolute() else path.parent / inc, seen)
    return chain


def task_definition_sha256(name: str, index: dict[str, Any], data_root: Path) -> str | None:
    """sha256 hex of a task's definition: the text of its YAML and the YAMLs it includes, and the content
    of every local data file it reads; for a group or tag, of its members. None: not in `index`."""
    from pipeline.fingerprint import file_sha256

    names = [name, *(t for t in member_tasks(name, index) if t != name)]
    rows = []
    for task in names:
        entry = index.get(task)
        if entry is None or entry.yaml_path is None:
            continue
        for yaml_path in _yaml_chain(Path(entry.yaml_path)):
            rows.append(f"yaml\t{task}\t{yaml_path.name}\t{file_sha256(yaml_path)}")
        for file in data_files(entry.cfg or {}, data_root):
            digest = file_sha256(file) if file.is_file() else "missing"
            rows.append(f"data\t{task}\t{file.name}\t{digest}")
    return hashlib.sha256("\n".join(rows).encode()).hexdigest() if rows else None


def user_defined(name: str, index: dict[str, Any]) -> bool:
    """Whether a task (or a member of a group or tag) is defined outside the pipeline's own folder."""
    for task in [name, *member_tasks(name, index)]:
        entry = index.get(task)
        if entry is not None and entry.yaml_path is not None and not _own(Path(entry.yaml_path)):
            return True
    return False


def _own(path: Path) -> bool:
    return path.resolve().is_relative_to(TASKS_DIR)
