from pathlib import Path

import pytest

from pipeline.ladders.corpus import HELDOUT, corpus_files, resolve_text, split_corpus, split_document
from pipeline.ladders.tokenizer import train_tokenizer


def test_corpus_is_read_in_a_fixed_order(data_root: Path) -> None:
    files = corpus_files(data_root)
    assert files == sorted(files)
    assert len(files) == 89  # python docs, KJV bible, 87 Shakespeare/Milton files


def test_split_is_disjoint_line_aligned_and_about_one_percent(data_root: Path) -> None:
    train, heldout = split_corpus(data_root)
    assert 0.008 < len(heldout) / (len(train) + len(heldout)) < 0.012
    assert heldout[:2000] not in train
    assert resolve_text(HELDOUT, data_root) == heldout


def test_split_document_cuts_at_a_line() -> None:
    train, held = split_document("a\nbb\nccc\ndddd\n", 0.3)
    assert train + held == "a\nbb\nccc\ndddd\n"
    assert train.endswith("\n") and held == "dddd\n"
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_document("x", 1.5)


def test_resolve_text_reads_files_and_names_missing_ones(data_root: Path) -> None:
    text = resolve_text("eval/wikitext-2-raw/wiki.test.raw", data_root)
    assert " = Robert Boulter = " in text[:100]
    with pytest.raises(FileNotFoundError, match=r"no_such\.txt"):
        resolve_text("no_such.txt", data_root)


def test_tokenizer_is_deterministic_and_round_trips(data_root: Path) -> None:
    train, _ = split_corpus(data_root)
    first, second = train_tokenizer([train[:100_000]], 400), train_tokenizer([train[:100_000]], 400)
    assert first.get_vocab() == second.get_vocab()
    text = "In the beginning was the byte-level BPE; ünïcode too."
    ids = first(text)["input_ids"]
    assert ids == second(text)["input_ids"]
    assert first.decode(ids) == text
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], 10)
