"""Content fingerprints of what a job reads, for its key: model folders, hub commits, data files.

A job key must change when its inputs change, not only when its config does. So:
- a local model folder is keyed by `folder_sha256`: the sha256 of every file that can change its
  numbers (config, weights, tokenizer; not READMEs, licenses or hidden files), by name, size and
  content hash;
- a hub id is pinned to the commit its revision resolves to in the local hub cache (`pin_model`);
- a perplexity text, the corpus behind `corpus:heldout`, and an offline lm-eval task's data file are
  keyed by their content hash (`eval_data_sha256`); a task a user's folder defines (`eval.include_path`)
  by its YAMLs and data files (`pipeline.evals.taskdefs`).
Content hashes are computed once per file version: `file_sha256` caches them on disk under
`$KBIT_CACHE/digests/`, keyed by (absolute path, size, mtime in ns, inode), so a rerun of a 14 GB
model hashes nothing, and a file rewritten in place (new mtime or size) is hashed again. An edit
that keeps size and mtime (both restored on purpose) goes unseen: the cost of not reading every
weight on every plan. Ladder members are keyed by their label instead (see `pipeline.jobs`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from pathlib import Path

from pipeline.cachedir import cache_base
from pipeline.hub import HUB_ID, pinned_revision
from pipeline.ladders.corpus import HELDOUT, HELDOUT_FRACTION, corpus_files
from pipeline.specs import EvalSpec, ModelRef

log = logging.getLogger(__name__)

DIGESTS = "digests"
# Files of a model folder that never change its numbers (compared lower-case)
IGNORED_SUFFIXES = (".md", ".rst", ".png", ".jpg")
IGNORED_PREFIXES = ("license", "notice", "readme")
WEIGHT_SUFFIXES = (".gguf",)  # a folder may hold several; only the one `gguf_file` names is read


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes, cached on disk and in memory by (path, size, mtime, inode)."""
    stat = path.stat()
    return _cached_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=4096)
def _cached_sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    version = f"{path}\0{size}\0{mtime_ns}\0{inode}"
    entry = cache_base() / DIGESTS / hashlib.sha256(version.encode()).hexdigest()
    try:
        cached = entry.read_text().strip()
        if len(cached) == 64:
            return cached
    except OSError:
        pass  # not cached yet
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    store_text(entry, digest)
    return digest


def config_fact_entry(config_json: Path, kind: str, *parts: str) -> Path | None:
    """The cache file `$KBIT_CACHE/<kind>/<sha256>.json` of a fact derived from a model's config.json
    alone (its shape, whether it is a causal LM): keyed by the file's bytes, `parts` (the settings and
    code version the fact depends on) and transformers' version (its classes define the model); None if
    the config cannot be read. Lets a rerun's pre-flight skip importing transformers' modeling code."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = config_json.read_bytes()
        library = version("transformers")
    except (OSError, PackageNotFoundError):
        return None
    key = hashlib.sha256(b"\0".join([text, library.encode(), *(p.encode() for p in parts)])).hexdigest()
    return cache_base() / kind / f"{key}.json"


def store_text(entry: Path, text: str) -> None:
    """Write `text` to the cache entry `entry` atomically; a cache entry that cannot be written only
    costs the work again next time."""
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, entry)
    except OSError as err:
        log.debug("cache entry %s not written: %s", entry, err)


def model_files(folder: Path, gguf_file: str | None = None) -> list[Path]:
    """The files of a model folder that can change its numbers, sorted by name (top level only)."""
    files = []
    for path in sorted(folder.iterdir()):
        name = path.name.lower()
        if name.startswith(".") or not path.is_file():
            continue
        if name.endswith(IGNORED_SUFFIXES) or name.startswith(IGNORED_PREFIXES):
            continue
        if name.endswith(WEIGHT_SUFFIXES) and path.name != gguf_file:
            continue
        files.append(path)
    return files


def folder_sha256(folder: Path, gguf_file: str | None = None) -> str:
    """sha256 hex over (name, size, content sha256) of `model_files(folder, gguf_file)`."""
    lines = [f"{p.name}\t{p.stat().st_size}\t{file_sha256(p)}" for p in model_files(folder, gguf_file)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def pin_model(ref: ModelRef) -> tuple[ModelRef, str | None]:
    """(the reference to load, the folder's content hash).

    A local folder: itself and `folder_sha256`. A hub id whose revision the hub cache resolves: the
    reference with `revision` set to that commit (loaded as such), and None. Anything else unchanged.
    """
    path = Path(ref.name_or_path).expanduser()
    if path.is_dir():
        return ref, folder_sha256(path, ref.gguf_file)
    if HUB_ID.match(ref.name_or_path):
        commit = pinned_revision(ref.name_or_path, ref.revision)
        if commit is not None and commit != ref.revision:
            return dataclasses.replace(ref, revision=commit), None
    return ref, None


def text_sha256(path: str, data_root: Path) -> str | None:
    """The content hash of a perplexity text: a file (absolute or under `data_root`) or another form of
    `pipeline.textsources` (its `source_fingerprint`), or for `corpus:heldout` the held-out fraction
    and every corpus file's hash; None if it is missing."""
    if path == HELDOUT:
        try:
            files = corpus_files(data_root)
        except FileNotFoundError:
            return None
        root = Path(data_root) / "corpus"
        rows = [f"{p.relative_to(root).as_posix()}\t{file_sha256(p)}" for p in files]
        return hashlib.sha256("\n".join([f"{HELDOUT} {HELDOUT_FRACTION}", *rows]).encode()).hexdigest()
    from pipeline.textsources import source_fingerprint

    try:  # a text file: its bytes' hash, as before other forms were read
        return source_fingerprint(path, Path(data_root), "perplexity")
    except (ValueError, FileNotFoundError):
        return None


def eval_data_sha256(spec: EvalSpec) -> tuple[tuple[str, str | None], ...]:
    """(`text:<path>`, `task:<name>` or `taskdef:<name>`, content hash) of everything the eval reads, sorted.

    Offline lm-eval tasks (`pipeline/evals/tasks`) by their data file; a task defined in a folder of
    `include_path` (or anywhere outside the pipeline's own folder) by its definition
    (`taskdefs.task_definition_sha256`: YAMLs and data files); lm-eval's own tasks are read by lm-eval
    itself and have no entry.
    """
    from pipeline.evals.tasks import OFFLINE_TASKS

    root = Path(spec.data_root).expanduser()
    digests = {f"text:{p.path}": text_sha256(p.path, root) for p in spec.perplexity}
    for task in spec.tasks:
        if task in OFFLINE_TASKS:
            file = root / OFFLINE_TASKS[task][0]
            digests[f"task:{task}"] = file_sha256(file) if file.is_file() else None
    if spec.include_path or any(task not in OFFLINE_TASKS for task in spec.tasks):
        from pipeline.evals.taskdefs import task_definition_sha256, task_index, user_defined

        index = task_index(spec.include_path)
        for task in spec.tasks:
            if user_defined(task, index):
                digests.pop(f"task:{task}", None)
                digests[f"taskdef:{task}"] = task_definition_sha256(task, index, root)
    return tuple(sorted(digests.items()))
