"""Document loading and prompt helpers that the offline task YAMLs name with `!function`.

Kept free of torch and transformers; `datasets` is imported when documents are loaded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.ladders.corpus import read_text

if TYPE_CHECKING:
    import datasets

DEFAULT_DATA_ROOT = "../shared/data"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every JSON line of a `.jsonl` or `.jsonl.xz` file."""
    return [json.loads(line) for line in read_text(path).split("\n") if line.strip()]


def data_path(data_file: str, data_root: str | None = None) -> Path:
    """`<data_root>/<data_file>`; the root defaults to `$KBIT_DATA_ROOT`, then `../shared/data`."""
    path = Path(data_root or os.environ.get("KBIT_DATA_ROOT") or DEFAULT_DATA_ROOT) / data_file
    if not path.is_file():
        raise FileNotFoundError(f"task data {str(path)!r} not found; set the data root (eval.data_root)")
    return path


def load_split(*, data_file: str, split: str, data_root: str | None = None, **_: Any) -> datasets.DatasetDict:
    """lm-eval `custom_dataset`: one split read from `<data_root>/<data_file>` (metadata gives the root).

    lm-eval passes the task metadata and `dataset_kwargs` as keyword arguments; the rest is ignored.
    """
    import datasets

    docs = read_jsonl(data_path(data_file, data_root))
    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


def _clean_hellaswag(text: str) -> str:
    # WikiHow artefacts: " [title]" marks a sentence end, other [bracketed] tags are dropped
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """HellaSwag's query ("activity: context") and cleaned endings, as lm-eval builds them."""
    context = f"{doc['ctx_a']} {doc['ctx_b'].capitalize()}"
    return {
        **doc,
        "query": _clean_hellaswag(f"{doc['activity_label']}: {context}"),
        "choices": [_clean_hellaswag(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def load_hellaswag(
    *, data_file: str, split: str, data_root: str | None = None, **_: Any
) -> datasets.DatasetDict:
    """`load_split` with the prompts built once at load (lm-eval's `process_docs` reruns on every pass)."""
    import datasets

    docs = [hellaswag_doc(doc) for doc in read_jsonl(data_path(data_file, data_root))]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


def winogrande_text(doc: dict[str, Any]) -> int:
    """WinoGrande scores the shared ending after each filled-in option: the 'text' is the gold index."""
    return int(doc["answer"]) - 1


def winogrande_target(doc: dict[str, Any]) -> str:
    """The sentence after the blank, which both options continue into."""
    sentence = doc["sentence"]
    return sentence[sentence.index("_") + 1 :].strip()


def winogrande_choices(doc: dict[str, Any]) -> list[str]:
    """The sentence up to the blank, filled with each option."""
    sentence = doc["sentence"]
    head = sentence[: sentence.index("_")]
    return [head + doc["option1"], head + doc["option2"]]
