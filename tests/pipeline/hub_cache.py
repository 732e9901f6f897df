"""A model placed in a Hugging Face hub cache folder the way huggingface_hub lays one out."""

from __future__ import annotations

import shutil
from pathlib import Path


def cache_model(cache: Path, repo_id: str, source: Path, commit: str, ref: str = "main") -> Path:
    """Copy `source`'s files into `<cache>/models--org--name/snapshots/<commit>/` and point `ref` at it.

    (huggingface_hub stores blobs by hash and links them from the snapshot; plain copies read the same.)
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot
