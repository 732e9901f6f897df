"""What an `Evaluator` builds from the tokenizer and the task definitions alone, kept on disk.

Most of an Evaluator's build does not depend on the model's weights: reading the task documents,
rendering lm-eval's prompts into requests, planning the metrics (`fastmetrics.SuitePlan`), tokenizing
every request and every perplexity text. On a 2-core CPU that is ~13 s of the ~16 s build of the
paper_ladder suite, paid again by every worker for every model. This module keeps those products
under `$KBIT_CACHE/evals/`, one pickle per key, so a second worker, a second model with the same
tokenizer, or a rerun loads them in well under a second.

A key is the sha256 of everything the cached value is computed from, so a changed input never
reuses a stale value: the tokenizer's full definition (`tokenizer_fingerprint`), the settings that
shape tokenization (max length, prefix token), each task's definition (its YAMLs and local data files,
`taskdefs.task_definition_sha256`), the Python files of the task folders (document loaders and
prompt helpers), the source of the modules that compute the cached value, the lm-eval version, and
the cache's own `CACHE_VERSION`. Anything not covered (a task from lm-eval's own hub-backed
definitions, a tokenizer without a serialisable backend) is not cached: `suite_key` returns None.
Writes are atomic (a temporary file renamed into place), so concurrent workers never read half a
file; an unreadable entry is treated as a miss and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the layout of a cached value changes
CACHE_DIR = "evals"
# Modules whose code decides the cached values (prompts -> requests -> plans -> token ids).
SOURCE_MODULES = ("evalcache.py", "fastmetrics.py", "fastscore.py", "lmeval.py", "perplexity.py", "units.py")


def cache_dir() -> Path:
    """`$KBIT_CACHE/evals` (see `pipeline.fingerprint.cache_base`)."""
    from pipeline.fingerprint import cache_base

    return cache_base() / CACHE_DIR


def digest(parts: dict[str, Any]) -> str:
    """sha256 hex of `parts` as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """sha256 hex of a tokenizer's whole definition (vocabulary, merges, normalizer, pre- and
    post-processing, special tokens), read from the loaded object, not from file names; None for a
    tokenizer without a serialisable fast backend (then nothing it produces is cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    special = {name: str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "pad_token")}
    parts = {
        "class": type(tokenizer).__name__,
        "backend": hashlib.sha256(backend.to_str().encode()).hexdigest(),
        "special": special,
        "add_bos_token": str(getattr(tokenizer, "add_bos_token", None)),
        "add_eos_token": str(getattr(tokenizer, "add_eos_token", None)),
        "padding_side": str(getattr(tokenizer, "padding_side", None)),
        "truncation_side": str(getattr(tokenizer, "truncation_side", None)),
    }
    return digest(parts)


def sources_sha256(files: Sequence[Path]) -> str:
    """sha256 hex over the names and contents of `files` (in the given order)."""
    from pipeline.fingerprint import file_sha256

    return digest({str(path.name): file_sha256(path) for path in files})


def code_sha256() -> str:
    """sha256 hex of the modules that compute the cached values."""
    here = Path(__file__).resolve().parent
    return sources_sha256([here / name for name in SOURCE_MODULES])


def suite_key(
    names: Sequence[str],
    limit: int | None,
    include_path: Sequence[str],
    data_root: Path,
    tokenization: dict[str, Any],
) -> str | None:
    """The key of a prepared lm-eval suite, or None when a task is not defined in the pipeline's or
    the user's task folders (lm-eval's hub-backed tasks are never cached) or the tokenizer cannot be
    fingerprinted. `tokenization` holds the tokenizer's fingerprint and the scorer's settings that
    shape token ids (max length, prefix token)."""
    import lm_eval

    from pipeline.evals.taskdefs import task_definition_sha256, task_folders, task_index

    if tokenization.get("tokenizer") is None:
        return None
    index = task_index(tuple(include_path))
    definitions = {name: task_definition_sha256(name, index, data_root) for name in names}
    if any(value is None for value in definitions.values()):
        return None
    helpers = sorted(p for folder in task_folders(tuple(include_path)) for p in folder.rglob("*.py"))
    parts = {
        "kind": "suite",
        "version": CACHE_VERSION,
        "lm_eval": getattr(lm_eval, "__version__", "unknown"),
        "code": code_sha256(),
        "tasks": list(names),
        "limit": limit,
        "definitions": definitions,
        "helpers": sources_sha256(helpers),
        "data_root": str(data_root.resolve()),
        "tokenization": tokenization,
    }
    return digest(parts)


def text_key(text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int | None) -> str | None:
    """The key of a tokenized perplexity text (by its content), or None for an unfingerprintable
    tokenizer."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        return None
    parts = {
        "kind": "text",
        "version": CACHE_VERSION,
        "code": code_sha256(),
        "text": hashlib.sha256(text.encode()).hexdigest(),
        "tokenizer": fingerprint,
        "bos": tokenizer.bos_token_id,
        "max_tokens": max_tokens,
    }
    return digest(parts)


def load(key: str | None) -> Any | None:
    """The value stored under `key`, or None (no key, no entry, or an entry that cannot be read)."""
    if key is None:
        return None
    path = cache_dir() / f"{key}.pkl"
    try:
        with path.open("rb") as f:
            return pickle.load(f)  # our own cache folder: written by `store` only
    except FileNotFoundError:
        return None
    except Exception as err:  # a truncated or foreign file is a miss, rebuilt and overwritten
        log.warning("evaluation cache entry %s unreadable (%s); rebuilding it", path.name, err)
        return None


def store(key: str | None, value: Any) -> None:
    """Write `value` under `key` atomically (nothing when key is None; a failed write is only logged)."""
    if key is None:
        return
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key[:16]}.", suffix=".tmp")
    except OSError as err:
        log.warning("evaluation cache: cannot write under %s (%s)", folder, err)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, folder / f"{key}.pkl")
    except (OSError, pickle.PicklingError, TypeError, AttributeError) as err:
        log.warning("evaluation cache: could not store %s (%s)", key[:16], err)
        Path(tmp).unlink(missing_ok=True)
