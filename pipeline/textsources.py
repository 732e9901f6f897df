"""Text sources, read the same way for perplexity (`eval.perplexity[].path`) and calibration
(`quant.calibration.source`).

The forms (files absolute or under the data root):

- the corpus: `corpus:train` (calibration) or `corpus:heldout` (perplexity);
- a UTF-8 text file (`.txt`, `.raw`, `.xz`, `.gz`; for perplexity any other file is read as text);
- `file.jsonl:field` (also `.jsonl.xz`, `.jsonl.gz`): one document per line, the named field;
- `file.parquet:column`: one document per row, the named column;
- `folder:column`: a dataset saved with `datasets`' `save_to_disk` (one split: for a DatasetDict name
  the split's folder, `folder/test:column`), one document per row.

Documents are joined by `DOC_SEPARATOR`. `check_source` reads only the first rows (pre-flight);
`source_fingerprint` hashes what the text depends on without decoding it (the job key).
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import json
import lzma
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from pipeline.ladders.corpus import HELDOUT, HELDOUT_FRACTION, corpus_files, split_corpus

TRAIN = "corpus:train"
DOC_SEPARATOR = "\n\n"  # between documents of a jsonl, parquet or dataset source
TEXT_SUFFIXES = (".txt", ".raw", ".xz", ".gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
PREVIEW_BYTES = 1 << 16  # what pre-flight decodes of a text file

Purpose = Literal["calibration", "perplexity"]
SourceKind = Literal["train", "heldout", "text", "jsonl", "parquet", "dataset"]
CORPUS: dict[str, tuple[str, SourceKind]] = {
    "calibration": (TRAIN, "train"),
    "perplexity": (HELDOUT, "heldout"),
}
WHAT = {"calibration": "calibration source", "perplexity": "perplexity text"}


def allowed_forms(purpose: Purpose) -> str:
    """The forms a source of this purpose may take, for messages."""
    return (
        f"{CORPUS[purpose][0]}, a text file (.txt, .raw, .xz, .gz), file.jsonl:field, file.parquet:column, "
        "saved_dataset_folder:column"
    )


@dataclass(frozen=True)
class TextSource:
    """A parsed source: its kind, its file or folder as written ("" for the corpus), its field or column."""

    kind: SourceKind
    path: str = ""
    field: str = ""


def resolve_file(path: str, data_root: Path) -> Path:
    """`path` if absolute, else under the data root."""
    return Path(path).expanduser() if Path(path).expanduser().is_absolute() else Path(data_root) / path


def parse_source(source: str, data_root: Path, purpose: Purpose = "calibration") -> TextSource:
    """The kind, file and field a source names; ValueError naming the allowed forms."""
    what = WHAT[purpose]
    corpus, corpus_kind = CORPUS[purpose]
    if source == corpus:
        return TextSource(corpus_kind)
    forms: tuple[tuple[SourceKind, tuple[str, ...], str], ...] = (
        ("jsonl", JSONL_SUFFIXES, "field"),
        ("parquet", PARQUET_SUFFIXES, "column"),
    )
    path, _, field = source.rpartition(":")
    for kind, suffixes, word in forms:
        if path.endswith(suffixes) and field:
            return TextSource(kind, path, field)
        if source.rstrip(":").endswith(suffixes):
            raise ValueError(
                f"{what} {source!r} is a {kind} file: name the {word} to read, "
                f"as '{source.rstrip(':')}:<{word}>'"
                + _columns_hint(kind, resolve_file(source.rstrip(":"), data_root))
            )
    if path and field and is_saved_dataset(resolve_file(path, data_root)):
        return TextSource("dataset", path, field)
    if is_saved_dataset(resolve_file(source, data_root)):
        raise ValueError(
            f"{what} {source!r} is a folder: name the column of a saved dataset to read, as "
            f"'{source}:<column>'" + _columns_hint("dataset", resolve_file(source, data_root))
        )
    if source.endswith(TEXT_SUFFIXES) or purpose == "perplexity":
        return TextSource("text", source)
    hint = f" ({HELDOUT!r} is kept for evaluation; calibrate on {TRAIN!r})" if source == HELDOUT else ""
    raise ValueError(f"{what} {source!r} is not one of the allowed forms: {allowed_forms(purpose)}{hint}")


def is_saved_dataset(folder: Path) -> bool:
    """Whether `folder` holds a dataset written by `datasets`' `save_to_disk` (one split or several)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _columns_hint(kind: str, path: Path) -> str:
    """ "; columns: [...]" of a parquet file or saved dataset that exists, else ""."""
    try:
        if kind == "parquet" and path.is_file():
            import pyarrow.parquet as pq

            return f"; columns: {pq.read_schema(path).names}"
        if kind == "dataset" and path.is_dir():
            return f"; columns: {_load_dataset(path).column_names}"
    except (OSError, ValueError) as err:
        return f" (it cannot be read: {err})"
    return ""


def _existing(source: TextSource, data_root: Path, what: str) -> Path:
    file = resolve_file(source.path, data_root)
    exists = file.is_dir() if source.kind == "dataset" else file.is_file()
    if not exists:
        raise FileNotFoundError(
            f"{what} {source.path!r} not found (looked for {str(file)!r}); "
            "give a file under the data root or an absolute path"
        )
    return file


def _open_text(file: Path) -> IO[bytes] | gzip.GzipFile:
    if file.name.endswith(".xz"):
        return lzma.open(file, "rb")
    if file.name.endswith(".gz"):
        return gzip.open(file, "rb")
    return open(file, "rb")


def _decode(data: bytes, file: Path, final: bool = True) -> str:
    """UTF-8 text; ValueError naming the file and the first bad byte's offset otherwise."""
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{str(file)!r} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "convert it to UTF-8, or for a parquet/jsonl file or saved dataset name its column, "
            "as 'path:column'"
        ) from err


def read_text_file(file: Path, limit: int | None = None) -> str:
    """A UTF-8 text file (`.xz`/`.gz` decompressed), or its first `limit` bytes."""
    with _open_text(file) as handle:
        data = handle.read() if limit is None else handle.read(limit)
    return _decode(data, file, final=limit is None)


def _as_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} is {type(value).__name__}, not text")
    return value


def _jsonl_texts(file: Path, field: str, limit: int | None = None) -> list[str]:
    docs: list[str] = []
    seen: set[str] = set()
    lines = read_text_file(file, None if limit is None else PREVIEW_BYTES).splitlines()
    for number, line in enumerate(lines if limit is None else lines[:-1] or lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(file)!r} line {number} is not JSON: {err}") from err
        if not isinstance(row, dict):
            raise ValueError(f"{str(file)!r} line {number} is {type(row).__name__}, not a JSON object")
        seen.update(row)
        if field not in row:
            raise ValueError(f"field {field!r} not in {str(file)!r} line {number}; keys seen: {sorted(seen)}")
        docs.append(_as_text(row[field], f"field {field!r} of {str(file)!r} line {number}"))
        if limit is not None and len(docs) >= limit:
            break
    return docs


def _parquet_texts(file: Path, column: str, limit: int | None = None) -> list[str]:
    import pyarrow.parquet as pq

    names = pq.read_schema(file).names
    if column not in names:
        raise ValueError(f"column {column!r} not in {str(file)!r}; columns: {names}")
    if limit is None:
        values = pq.read_table(file, columns=[column]).column(column).to_pylist()
    else:
        batch = next(pq.ParquetFile(file).iter_batches(batch_size=limit, columns=[column]), None)
        values = [] if batch is None else batch.column(0).to_pylist()
    where = f"column {column!r} of {str(file)!r}"
    return [_as_text(v, f"{where} row {i}") for i, v in enumerate(values) if v is not None]


def _load_dataset(folder: Path) -> Any:
    from datasets import Dataset, load_from_disk

    data = load_from_disk(str(folder))
    if not isinstance(data, Dataset):
        splits = sorted(data)
        raise ValueError(
            f"{str(folder)!r} holds a dataset with splits {splits}: name one split's folder, "
            f"as '{folder}/{splits[0]}:<column>'"
        )
    return data


def _dataset_texts(folder: Path, column: str, limit: int | None = None) -> list[str]:
    data = _load_dataset(folder)
    if column not in data.column_names:
        raise ValueError(f"column {column!r} not in dataset {str(folder)!r}; columns: {data.column_names}")
    values = data[column] if limit is None else data.select(range(min(limit, len(data))))[column]
    where = f"column {column!r} of dataset {str(folder)!r}"
    return [_as_text(v, f"{where} row {i}") for i, v in enumerate(values) if v is not None]


_READERS: dict[str, Callable[[Path, str, int | None], list[str]]] = {
    "text": lambda file, _, limit: [read_text_file(file, None if limit is None else PREVIEW_BYTES)],
    "jsonl": _jsonl_texts,
    "parquet": _parquet_texts,
    "dataset": _dataset_texts,
}


def source_texts(source: str, data_root: Path, purpose: Purpose = "calibration") -> list[str]:
    """The documents of a source, in order: the corpus split as one text, a text file's text, one text
    per jsonl line, parquet row or dataset row.

    Raises:
        ValueError: an unknown form, text that is not UTF-8, or a field/column the source lacks (naming
            the ones it has). FileNotFoundError: the file is missing.
    """
    parsed = parse_source(source, data_root, purpose)
    if parsed.kind in ("train", "heldout"):
        return [split_corpus(data_root)[parsed.kind == "heldout"]]
    return _READERS[parsed.kind](_existing(parsed, data_root, WHAT[purpose]), parsed.field, None)


def check_source(source: str, data_root: Path, purpose: Purpose = "calibration") -> list[str]:
    """Pre-flight problems of a source, reading its first rows only: its form, its file, its field or
    column (naming those it has), and whether its text is UTF-8. Empty when all is well."""
    what = WHAT[purpose]
    try:
        parsed = parse_source(source, data_root, purpose)
        if parsed.kind in ("train", "heldout"):
            corpus_files(data_root)
            return []
        _READERS[parsed.kind](_existing(parsed, data_root, what), parsed.field, 8)
    except (ValueError, FileNotFoundError) as err:
        message = str(err)
        return [message if message.startswith(what) else f"{what} {source!r}: {message}"]
    return []


@functools.lru_cache(maxsize=512)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    """sha256 of a file's bytes; keyed by (path, mtime, size) so a changed file is hashed again."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_digest(file: Path) -> str:
    """A file's sha256, memoized by (path, mtime, size)."""
    stat = file.stat()
    return _file_sha256(str(file.resolve()), stat.st_mtime_ns, stat.st_size)


def source_fingerprint(source: str, data_root: Path, purpose: Purpose = "calibration") -> str:
    """sha256 hex of what a source's text depends on, without decoding it.

    A text file: its bytes' sha256. A jsonl/parquet source: the field and the file's sha256. A saved
    dataset: the column and every file of its folder (relative path, sha256). The corpus: the held-out
    fraction and the sorted (relative path, sha256) of the corpus files.
    """
    parsed = parse_source(source, data_root, purpose)
    if parsed.kind in ("train", "heldout"):
        root = Path(data_root) / "corpus"
        rows = sorted(f"{p.relative_to(root).as_posix()}\t{file_digest(p)}" for p in corpus_files(data_root))
        text = "\n".join([f"{CORPUS[purpose][0]} heldout_fraction={HELDOUT_FRACTION}", *rows])
        return hashlib.sha256(text.encode()).hexdigest()
    path = _existing(parsed, data_root, WHAT[purpose])
    if parsed.kind == "text":
        return file_digest(path)
    if parsed.kind == "dataset":
        files = sorted(p for p in path.rglob("*") if p.is_file())
        digest = hashlib.sha256(
            "\n".join(f"{p.relative_to(path).as_posix()}\t{file_digest(p)}" for p in files).encode()
        ).hexdigest()
    else:
        digest = file_digest(path)
    return hashlib.sha256(f"{parsed.kind}:{parsed.field}\n{digest}".encode()).hexdigest()
