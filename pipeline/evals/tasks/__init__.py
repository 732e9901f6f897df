"""Offline lm-eval tasks: the standard zero-shot tasks read from files under a data root.

Each YAML here has the name, prompts and metrics of lm-eval 0.4.13's task of the same name (so
they override lm-eval's hub-backed definitions when both are indexed) but loads its documents
through `pipeline.evals.tasks.docs.load_split` from `<data_root>/<data_file>`. The data root travels as
TaskManager metadata (`TaskManager(include_path=TASKS_DIR, metadata={"data_root": ...})`), so
the YAMLs need no templating; without it they read `$KBIT_DATA_ROOT` or `../shared/data`.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

# task name -> (data file under the data root, split name, number of documents)
OFFLINE_TASKS: dict[str, tuple[str, str, int]] = {
    "lambada_openai": ("eval/lambada_openai/test.jsonl", "test", 5153),
    "piqa": ("eval/piqa/validation.jsonl", "validation", 1838),
    "hellaswag": ("eval/hellaswag/validation.jsonl.xz", "validation", 10042),
    "winogrande": ("eval/winogrande/validation.jsonl", "validation", 1267),
    "arc_easy": ("eval/arc_easy/test.jsonl", "test", 2376),
    "arc_challenge": ("eval/arc_challenge/test.jsonl", "test", 1172),
}

__all__ = ["OFFLINE_TASKS", "TASKS_DIR"]
