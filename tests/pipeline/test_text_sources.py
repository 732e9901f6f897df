"""Text sources shared by perplexity and calibration: every form read, checked in pre-flight, keyed."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from pipeline.calibration import CalibrationSpec, check_calibration, source_texts
from pipeline.evals.evaluate import Evaluator, check_eval_spec
from pipeline.evals.perplexity import perplexity_text
from pipeline.fingerprint import file_sha256, text_sha256
from pipeline.models import load_model
from pipeline.specs import EvalSpec, ModelRef, PerplexitySpec

DOCS = [f"Document {i} tells of the river and the mill, and of verse {i}." for i in range(30)]


def write_sources(folder: Path) -> dict[str, str]:
    """One source of each form holding `DOCS`; form name -> source string."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(DOCS)
    (folder / "docs.txt").write_text(text, encoding="utf-8")
    with gzip.open(folder / "docs.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write(text)
    (folder / "docs.jsonl").write_text(
        "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(DOCS))
    )
    pq.write_table(pa.table({"id": list(range(len(DOCS))), "content": DOCS}), folder / "docs.parquet")
    Dataset.from_dict({"id": list(range(len(DOCS))), "text": DOCS}).save_to_disk(str(folder / "saved"))
    return {
        "txt": str(folder / "docs.txt"),
        "gz": str(folder / "docs.txt.gz"),
        "jsonl": f"{folder / 'docs.jsonl'}:body",
        "parquet": f"{folder / 'docs.parquet'}:content",
        "dataset": f"{folder / 'saved'}:text",
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_sources(tmp_path_factory.mktemp("sources"))


def ppl(path: str, data_root: Path) -> EvalSpec:
    spec = PerplexitySpec(name="mine", path=path, context_length=32, stride=32)
    return EvalSpec(perplexity=(spec,), data_root=str(data_root))


@pytest.mark.parametrize("form", ["txt", "gz", "jsonl", "parquet", "dataset"])
def test_every_form_reads_the_same_documents(sources, data_root, form):
    source = sources[form]
    assert perplexity_text(source, data_root) == "\n\n".join(DOCS)
    assert "\n\n".join(source_texts(source, data_root)) == "\n\n".join(DOCS)  # calibration reads it too
    check_eval_spec(ppl(source, data_root))
    assert check_calibration(CalibrationSpec(source), data_root, [], needed=True) == []
    assert text_sha256(source, data_root) is not None


def test_keys_tell_forms_and_columns_apart_and_plain_files_keep_their_hash(sources, data_root, tmp_path):
    digests = {form: text_sha256(source, data_root) for form, source in sources.items()}
    assert len(set(digests.values())) == len(digests)
    assert digests["txt"] == file_sha256(Path(sources["txt"]))  # keys of existing studies unchanged
    assert text_sha256(sources["jsonl"].replace(":body", ":id"), data_root) != digests["jsonl"]


def test_scores_a_parquet_text_end_to_end(sources, tiny_model_dir, data_root):
    model, tokenizer = load_model(ModelRef(str(tiny_model_dir)), "cpu")
    metrics = {
        m.metric: m.value for m in Evaluator(model, tokenizer, ppl(sources["parquet"], data_root)).run()
    }
    assert metrics["perplexity"] > 1.0 and metrics["bits_per_byte"] > 0.0


def test_parquet_without_a_column_is_refused_naming_the_columns(sources, data_root):
    path = sources["parquet"].rsplit(":", 1)[0]
    with pytest.raises(ValueError, match=r"name the column to read.*columns: \['id', 'content'\]"):
        check_eval_spec(ppl(path, data_root))
    with pytest.raises(ValueError, match=r"column 'text' not in .*columns: \['id', 'content'\]"):
        check_eval_spec(ppl(f"{path}:text", data_root))
    folder = sources["dataset"].rsplit(":", 1)[0]
    with pytest.raises(ValueError, match=r"saved dataset.*columns: \['id', 'text'\]"):
        check_eval_spec(ppl(folder, data_root))


def test_non_utf8_text_gets_a_clear_preflight_message(tmp_path, data_root):
    file = tmp_path / "latin1.txt"
    file.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(
        ValueError, match=r"perplexity text .*latin1.txt.* is not UTF-8 text \(byte 0xe9 at offset 3\)"
    ):
        check_eval_spec(ppl(str(file), data_root))
    problems = check_calibration(CalibrationSpec(str(file)), data_root, [], needed=True)
    assert len(problems) == 1 and "not UTF-8" in problems[0]


def test_missing_text_and_field_are_named(sources, data_root):
    with pytest.raises(ValueError, match=r"not found \(looked for"):
        check_eval_spec(ppl("no/such/text.txt", data_root))
    with pytest.raises(ValueError, match=r"field 'text' not in .* keys seen: \['body', 'id'\]"):
        check_eval_spec(ppl(sources["jsonl"].replace(":body", ":text"), data_root))
