"""The training corpus and text sets under the data root, read the same way everywhere.

The corpus (`<data_root>/corpus`, xz-compressed text files) is read in sorted path order, so every
ladder sees the same data in the same order. The held-out split is the last `heldout_fraction` of
every document (cut at a line boundary), which keeps every source represented in validation.
"""

from __future__ import annotations

import functools
import lzma
from pathlib import Path

HELDOUT = "corpus:heldout"
HELDOUT_FRACTION = 0.01


def read_text(path: Path) -> str:
    """Read a UTF-8 text file, decompressing `.xz` transparently."""
    if path.suffix == ".xz":
        with lzma.open(path, "rt", encoding="utf-8") as handle:
            return handle.read()
    return path.read_text(encoding="utf-8")


def corpus_files(data_root: str | Path) -> list[Path]:
    """Every corpus file, in a fixed (sorted) order."""
    root = Path(data_root) / "corpus"
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder {str(root)!r} not found; set the data root (data_root=...)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith((".txt", ".txt.xz")))
    if not files:
        raise FileNotFoundError(f"no .txt or .txt.xz files under {str(root)!r}")
    return files


@functools.lru_cache(maxsize=2)
def corpus_documents(data_root: str | Path) -> tuple[tuple[str, str], ...]:
    """(relative name, text) of every corpus file, in a fixed order."""
    root = Path(data_root) / "corpus"
    return tuple((str(p.relative_to(root)), read_text(p)) for p in corpus_files(data_root))


def split_document(text: str, heldout_fraction: float) -> tuple[str, str]:
    """(train, heldout): the held-out part is the tail of `text`, starting at a line boundary."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    cut = int(len(text) * (1.0 - heldout_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def split_corpus(data_root: str | Path, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """(train_text, heldout_text) of the whole corpus, documents joined by blank lines."""
    parts = [split_document(text, heldout_fraction) for _, text in corpus_documents(data_root)]
    return "\n\n".join(train for train, _ in parts), "\n\n".join(held for _, held in parts)


def resolve_text(path: str, data_root: str | Path) -> str:
    """The text a perplexity set names: `corpus:heldout`, or a file (absolute or under the data root)."""
    if path == HELDOUT:
        return split_corpus(data_root)[1]
    file = Path(path) if Path(path).is_absolute() else Path(data_root) / path
    if not file.is_file():
        raise FileNotFoundError(
            f"text set {path!r} not found (looked for {str(file)!r}); "
            f"give a file under the data root, an absolute path, or {HELDOUT!r}"
        )
    return read_text(file)
