"""Calibration text and windows, on the real offline data and the real tiny tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.calibration import (
    NEEDS_SOURCE,
    TRAIN,
    CalibrationSpec,
    calibration_tokens,
    check_calibration,
    resolve_seq_len,
    source_fingerprint,
    source_texts,
    spread_slices,
    tokens_hash,
)
from pipeline.ladders.corpus import HELDOUT, split_corpus

WIKITEXT = "eval/wikitext-2-raw/wiki.test.raw"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_samples": 0}, "n_samples must be an int >= 1, got 0"),
        ({"n_samples": 1.5}, "n_samples"),
        ({"seq_len": 1}, "seq_len must be None or an int >= 2, got 1"),
        ({"seed": -1}, "seed must be an int >= 0, got -1"),
        ({"seed": "0"}, "seed"),
        ({"source": ""}, "corpus:train, a text file"),
    ],
)
def test_spec_rejects_bad_values_naming_them(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CalibrationSpec(**kwargs)


def test_seq_len_defaults_to_the_model_and_never_exceeds_it() -> None:
    assert resolve_seq_len(CalibrationSpec(TRAIN), None) == 2048
    assert resolve_seq_len(CalibrationSpec(TRAIN), 512) == 512
    assert resolve_seq_len(CalibrationSpec(TRAIN), 4096) == 2048
    assert resolve_seq_len(CalibrationSpec(TRAIN, seq_len=256), 512) == 256
    with pytest.raises(ValueError, match=r"seq_len=1024 .* 512 positions"):
        resolve_seq_len(CalibrationSpec(TRAIN, seq_len=1024), 512)


def test_spread_slices_tile_a_covered_text_and_spread_over_a_long_one() -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    assert "".join(spread_slices(text, len(text) * 2, 7)) == text
    slices = spread_slices(text, 700, 10)
    assert len(slices) == 10 and all(s.startswith("line ") and s.endswith("\n") for s in slices)
    assert slices[0].startswith("line 0\n") and slices[-1].startswith("line 9")
    assert sum(map(len, slices)) < 700 + 10 * 9  # at most one line of slack per slice


def test_train_windows_come_from_the_training_split(data_root: Path, tiny_tokenizer) -> None:
    spec = CalibrationSpec(TRAIN, n_samples=8, seq_len=256, seed=3)
    tokens = calibration_tokens(spec, tiny_tokenizer, data_root, max_positions=512)
    assert tokens.shape == (8, 256) and str(tokens.dtype) == "torch.int64"
    train, heldout = split_corpus(data_root)
    # a window may cross a seam (blank line) between sampled slices: check its longest unbroken stretch
    stretches = [max(tiny_tokenizer.decode(row.tolist()).split("\n\n"), key=len)[2:-2] for row in tokens]
    assert len(stretches[0]) > 100
    assert stretches[0] in train and stretches[0] not in heldout
    # drawn from all over the split, not only its leading file (the Bible)
    assert max(train.find(stretch) for stretch in stretches if len(stretch) > 100) > len(train) // 2


def test_windows_are_fixed_by_the_seed(data_root: Path, tiny_tokenizer) -> None:
    def windows(seed: int):
        spec = CalibrationSpec(WIKITEXT, n_samples=4, seq_len=64, seed=seed)
        return calibration_tokens(spec, tiny_tokenizer, data_root, max_positions=None)

    first, again, other = windows(0), windows(0), windows(1)
    assert first.equal(again) and tokens_hash(first) == tokens_hash(again)
    assert not first.equal(other) and tokens_hash(first) != tokens_hash(other)
    assert tokens_hash(first[:2]) != tokens_hash(first.reshape(2, 128))  # the shape is hashed too


def test_jsonl_source_reads_the_field_and_names_the_keys(
    tmp_path: Path, data_root: Path, tiny_tokenizer
) -> None:
    rows = [{"id": i, "text": f"Document {i} says something about verse {i}."} for i in range(40)]
    file = tmp_path / "docs.jsonl"
    file.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    assert source_texts(f"{file}:text", data_root) == [row["text"] for row in rows]
    tokens = calibration_tokens(
        CalibrationSpec(f"{file}:text", n_samples=3, seq_len=32), tiny_tokenizer, data_root, 64
    )
    assert tokens.shape == (3, 32)
    with pytest.raises(ValueError, match=r"field 'body' not in .* keys seen: \['id', 'text'\]"):
        source_texts(f"{file}:body", data_root)


def test_parquet_source_reads_the_column_and_names_the_columns(tmp_path: Path, data_root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"id": [1, 2], "content": ["first doc", "second doc"]}), file)
    assert source_texts(f"{file}:content", data_root) == ["first doc", "second doc"]
    with pytest.raises(ValueError, match=r"column 'text' not in .* columns: \['id', 'content'\]"):
        source_texts(f"{file}:text", data_root)


def test_unknown_forms_list_the_allowed_ones(data_root: Path) -> None:
    with pytest.raises(ValueError, match=r"not one of the allowed forms: corpus:train, a text file"):
        source_texts("notes.docx", data_root)
    with pytest.raises(ValueError, match=r"kept for evaluation"):
        source_texts(HELDOUT, data_root)
    with pytest.raises(ValueError, match=r"name the field to read, as 'x\.jsonl:<field>'"):
        source_texts("x.jsonl", data_root)


def test_too_short_a_source_names_needed_and_available_tokens(
    tmp_path: Path, data_root: Path, tiny_tokenizer
) -> None:
    file = tmp_path / "short.txt"
    file.write_text("In the beginning.\n")
    available = len(tiny_tokenizer(file.read_text(), add_special_tokens=False)["input_ids"])
    spec = CalibrationSpec(str(file), n_samples=2, seq_len=64)
    with pytest.raises(ValueError, match=rf"has {available} tokens; .* need at least 65"):
        calibration_tokens(spec, tiny_tokenizer, data_root, max_positions=None)


def test_check_refuses_evaluation_text_given_either_way(data_root: Path) -> None:
    evals = [WIKITEXT, HELDOUT]
    for source in (WIKITEXT, str((data_root / WIKITEXT).resolve())):
        problems = check_calibration(CalibrationSpec(source), data_root, evals, needed=True)
        assert len(problems) == 1 and "calibrating on the evaluation text" in problems[0]
    absolute_evals = [str((data_root / WIKITEXT).resolve())]
    assert check_calibration(CalibrationSpec(WIKITEXT), data_root, absolute_evals, needed=True)
    assert check_calibration(CalibrationSpec(TRAIN), data_root, evals, needed=True) == []
    corpus_file = check_calibration(CalibrationSpec("corpus/kjv_bible.txt.xz"), data_root, evals, needed=True)
    assert len(corpus_file) == 1 and "held-out tail" in corpus_file[0]


def test_check_names_missing_sources_and_fields(data_root: Path) -> None:
    assert check_calibration(CalibrationSpec(None), data_root, [], needed=True) == [NEEDS_SOURCE]
    assert check_calibration(CalibrationSpec(None), data_root, [], needed=False) == []
    (missing,) = check_calibration(CalibrationSpec("nope/absent.txt"), data_root, [], needed=True)
    assert "'nope/absent.txt' not found" in missing
    (no_field,) = check_calibration(CalibrationSpec("eval/piqa/validation.jsonl"), data_root, [], needed=True)
    assert "name the field" in no_field
    assert check_calibration(CalibrationSpec("eval/piqa/validation.jsonl:goal"), data_root, [], True) == []


def test_fingerprint_follows_the_bytes(tmp_path: Path, data_root: Path) -> None:
    file = tmp_path / "calib.txt"
    file.write_text("first version\n")
    before = source_fingerprint(str(file), data_root)
    assert source_fingerprint(str(file), data_root) == before
    file.write_text("second, longer version\n")
    os.utime(file, ns=(1, 1))  # a fresh mtime even on a coarse clock
    assert source_fingerprint(str(file), data_root) != before
    train = source_fingerprint(TRAIN, data_root)
    assert len(train) == 64 and train == source_fingerprint(TRAIN, data_root)
    jsonl = "eval/piqa/validation.jsonl"
    assert source_fingerprint(f"{jsonl}:goal", data_root) != source_fingerprint(f"{jsonl}:sol1", data_root)
