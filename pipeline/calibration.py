"""Calibration text for methods that fit to activations (GPTQ): which text, and which token windows.

A `CalibrationSpec` names a source of text and how many windows of how many tokens to draw from it.
The sources:

- `corpus:train`: the corpus' training split, the text the ladders were trained on;
- a text file (`.txt`, `.raw`, `.xz`, `.gz`), absolute or under the data root;
- `file.jsonl:field` (also `.jsonl.xz`): one document per line, the named field;
- `file.parquet:column`: one document per row, the named column;
- `folder:column`: a dataset saved with `save_to_disk`, one document per row.

The forms are parsed and read by `pipeline.textsources`, which perplexity texts share.

Documents are joined by blank lines. A long source is not tokenized whole: `spread_slices` takes
`n_samples` line-aligned slices spread evenly over the whole text, about twice as many characters as
the windows need at 8 characters per token, and grows them when they come out short. Evenly spread
rather than leading, because the corpus is read in path order (the Bible, then the Python docs, then
Shakespeare): a leading slice would calibrate on the Bible alone. Window starts are then drawn
uniformly over the sampled token stream from `torch.Generator().manual_seed(seed)`, like GPTQ's random
windows of C4. Everything is deterministic in (source text, tokenizer, spec); `tokens_hash` records
which windows a result used. torch is imported only where tokens are made, so a config check stays
light.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import textsources
from pipeline.ladders.corpus import HELDOUT
from pipeline.textsources import TRAIN, resolve_file

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 2048  # tokens per window when the spec leaves it to the model (GPTQ's choice)
CHARS_PER_TOKEN = 8  # a generous bound on characters per token, to size the slice tokenized first
ALLOWED_FORMS = textsources.allowed_forms("calibration")
NEEDS_SOURCE = f"this method needs calibration text: set quant.calibration.source ({ALLOWED_FORMS})"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CalibrationSpec:
    """Which text to calibrate on and which windows of it to draw.

    Attributes:
        source: `corpus:train`, a text file, `file.jsonl:field` or `file.parquet:column`; None: no
            calibration (methods that need none).
        n_samples: windows to draw.
        seq_len: tokens per window; None: min(2048, the model's positions).
        seed: seeds the window starts.
    """

    source: str | None = None
    n_samples: int = 128
    seq_len: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source is not None and (not isinstance(self.source, str) or not self.source):
            raise ValueError(
                f"calibration source must be None or one of: {ALLOWED_FORMS}; got {self.source!r}"
            )
        if not _is_int(self.n_samples) or self.n_samples < 1:
            raise ValueError(f"calibration n_samples must be an int >= 1, got {self.n_samples!r}")
        if self.seq_len is not None and (not _is_int(self.seq_len) or self.seq_len < 2):
            raise ValueError(f"calibration seq_len must be None or an int >= 2, got {self.seq_len!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"calibration seed must be an int >= 0, got {self.seed!r}")


def resolve_seq_len(spec: CalibrationSpec, max_positions: int | None) -> int:
    """Tokens per window: the spec's, or min(2048, the model's positions); never past the model's."""
    if max_positions is not None and (not _is_int(max_positions) or max_positions < 2):
        raise ValueError(f"max_positions must be None or an int >= 2, got {max_positions!r}")
    if spec.seq_len is None:
        return min(DEFAULT_SEQ_LEN, max_positions or DEFAULT_SEQ_LEN)
    if max_positions is not None and spec.seq_len > max_positions:
        raise ValueError(
            f"calibration seq_len={spec.seq_len} is longer than the model's {max_positions} positions; "
            f"set seq_len <= {max_positions} or leave it unset"
        )
    return spec.seq_len


def source_texts(source: str, data_root: Path) -> list[str]:
    """The documents of a calibration source, in order (`pipeline.textsources.source_texts`)."""
    return textsources.source_texts(source, data_root, "calibration")


def source_fingerprint(source: str, data_root: Path) -> str:
    """sha256 hex of what a calibration source's text depends on (`textsources.source_fingerprint`)."""
    return textsources.source_fingerprint(source, data_root, "calibration")


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _eval_overlap(source: str, file: Path | None, data_root: Path, eval_paths: Sequence[str]) -> list[str]:
    """Problems where the calibration text is (or contains) an evaluation text."""
    corpus = (Path(data_root) / "corpus").resolve()
    problems = []
    for path in eval_paths:
        if path == source or (
            path != HELDOUT and file is not None and _same_file(resolve_file(path, data_root), file)
        ):
            problems.append(
                f"calibrating on the evaluation text {path!r} (quant.calibration.source={source!r}) fits the "
                f"quantization to the test set; calibrate on other text, such as {TRAIN!r}"
            )
        elif path == HELDOUT and file is not None and file.resolve().is_relative_to(corpus):
            problems.append(
                f"calibrating on corpus file {source!r} includes the held-out tail that {HELDOUT!r} "
                f"evaluates; calibrate on {TRAIN!r}"
            )
    return problems


def check_calibration(
    spec: CalibrationSpec, data_root: Path, eval_paths: Sequence[str], needed: bool
) -> list[str]:
    """Pre-flight problems of a calibration spec, cheaply: no tokenizer, only a source's first rows read.

    Args:
        spec: the calibration spec.
        data_root: the offline data root.
        eval_paths: the perplexity sets' `path` values (`corpus:heldout` or files).
        needed: whether the quantization method calibrates.

    Returns:
        One message per problem: a missing source when needed, an unknown form, a missing file, a field
        or column it lacks, text that is not UTF-8 (`textsources.check_source`), or a source that is (or
        contains) an evaluation text. Empty when all is well.
    """
    if spec.source is None:
        return [NEEDS_SOURCE] if needed else []
    try:
        parsed = textsources.parse_source(spec.source, data_root, "calibration")
    except ValueError as err:
        return [str(err)]
    file = None if parsed.kind == "train" else resolve_file(parsed.path, data_root)
    problems = textsources.check_source(spec.source, data_root, "calibration")
    if file is None and problems:
        problems = [f"calibration source {TRAIN!r}: {p.split(': ', 1)[-1]}" for p in problems]
    return problems + _eval_overlap(spec.source, file, data_root, eval_paths)


def _line_start(text: str, pos: int) -> int:
    """The first line start at or after `pos` (or the end of `text`)."""
    if pos <= 0:
        return 0
    if pos >= len(text) or text[pos - 1] == "\n":
        return min(pos, len(text))
    newline = text.find("\n", pos)
    return len(text) if newline < 0 else newline + 1


def spread_slices(text: str, n_chars: int, n_slices: int) -> list[str]:
    """About `n_chars` characters of `text` as `n_slices` line-aligned slices spread evenly over it.

    Slice i starts at the first line start at or after i/n_slices of the text. When `n_chars` covers
    the text, the slices tile it: `"".join(spread_slices(text, len(text), n)) == text`.
    """
    if n_chars < 1 or n_slices < 1:
        raise ValueError(f"n_chars and n_slices must be >= 1, got {n_chars} and {n_slices}")
    length, n_chars = len(text), min(n_chars, len(text))
    bounds = [
        (_line_start(text, i * length // n_slices), _line_start(text, (i * length + n_chars) // n_slices))
        for i in range(n_slices)
    ]
    return [text[start:end] for start, end in bounds if end > start]


def _token_sample(text: str, tokenizer: PreTrainedTokenizerBase, n_tokens: int, n_slices: int) -> list[int]:
    """Token ids of evenly spread slices of `text`: at least `n_tokens` of them, or all of `text`'s.

    Slices are tokenized as a batch (the fast tokenizer runs them in parallel); when they do not cover
    the text, each ends in a blank line, the seam that separates documents.
    """
    n_chars = 2 * CHARS_PER_TOKEN * n_tokens
    while True:
        slices = spread_slices(text, n_chars, n_slices)
        if n_chars < len(text):  # gaps between the slices: mark each seam as a document boundary
            slices = [piece + "\n" for piece in slices]
        encoded = tokenizer(slices, add_special_tokens=False, verbose=False)["input_ids"]
        ids = [token for piece in encoded for token in piece]
        if len(ids) >= n_tokens or n_chars >= len(text):
            return ids
        n_chars *= 4


def calibration_tokens(
    spec: CalibrationSpec, tokenizer: PreTrainedTokenizerBase, data_root: Path, max_positions: int | None
) -> torch.Tensor:
    """The calibration windows: int64 token ids of shape [n_samples, seq_len].

    Args:
        spec: the calibration spec (its source must be set).
        tokenizer: the model's tokenizer; no special tokens are added.
        data_root: the offline data root.
        max_positions: the model's positions (bounds and defaults seq_len); None if unknown.

    Raises:
        ValueError: no source, a bad source, or fewer than seq_len + 1 tokens in it (naming both).
    """
    import torch

    seq_len = resolve_seq_len(spec, max_positions)
    if spec.source is None:
        raise ValueError(f"calibration source is None; {NEEDS_SOURCE}")
    text = "\n\n".join(source_texts(spec.source, data_root))
    wanted = spec.n_samples * seq_len  # enough for disjoint windows; fewer tokens make them overlap
    ids = _token_sample(text, tokenizer, wanted, spec.n_samples)
    if len(ids) < seq_len + 1:
        raise ValueError(
            f"calibration source {spec.source!r} has {len(ids)} tokens; windows of seq_len={seq_len} "
            f"need at least {seq_len + 1} (n_samples={spec.n_samples} disjoint windows need {wanted})"
        )
    if len(ids) < wanted:
        log.warning(
            "calibration source %r has %d tokens < %d: windows overlap", spec.source, len(ids), wanted
        )
    stream = torch.tensor(ids, dtype=torch.int64)
    generator = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (spec.n_samples,), generator=generator)
    return stream[starts[:, None] + torch.arange(seq_len)]


def tokens_hash(tokens: torch.Tensor) -> str:
    """sha256 hex of token ids as int64 bytes, shape included: which windows a result used."""
    import torch

    array = tokens.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(f"int64{list(array.shape)}\n".encode())
    digest.update(array.numpy().tobytes())
    return digest.hexdigest()
