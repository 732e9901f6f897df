"""What is known about the Hugging Face hub without downloading: offline state and the local cache.

`hub_offline` says whether a hub id can be fetched now (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`, or
the endpoint not reachable within `PROBE_TIMEOUT_S`); `cached_snapshot` finds a hub id's snapshot
folder in the hub cache (the commit a branch or tag name resolves to here), so pre-flight can check
its config and `pipeline.fingerprint` can pin the commit in the job key. No torch, no transformers.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 2.0  # one TCP connect to the hub endpoint, once per process
COMMIT = re.compile(r"^[0-9a-f]{40}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name"
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else huggingface_hub's default (read at call time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline_reason() -> str | None:
    """Why the hub cannot be reached now (an env setting, or the endpoint not answering); None: online."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").upper() in _TRUE:
            return f"{name}={os.environ[name]}"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return _unreachable(endpoint)


def hub_offline() -> bool:
    """Whether no hub id can be downloaded now."""
    return offline_reason() is not None


@functools.lru_cache(maxsize=4)
def _unreachable(endpoint: str) -> str | None:
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"{host}:{port} not reachable ({err.__class__.__name__})"


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """The snapshot folder of `repo_id` at `revision` (branch, tag or commit; None: main) in the hub
    cache, if its `config.json` is there; None otherwise."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        repo_id, "config.json", cache_dir=cache_dir or hub_cache_dir(), revision=revision
    )
    return Path(found).parent if isinstance(found, str) else None


def pinned_revision(repo_id: str, revision: str | None = None, cache_dir: Path | None = None) -> str | None:
    """The commit `revision` resolves to in the hub cache (a commit stays itself); None if not cached."""
    if revision is not None and COMMIT.match(revision):
        return revision
    snapshot = cached_snapshot(repo_id, revision, cache_dir)
    return snapshot.name if snapshot is not None and COMMIT.match(snapshot.name) else None
