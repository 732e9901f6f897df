"""User-defined lm-eval tasks through `eval.include_path`: found, checked offline, keyed by definition."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.config import EvalConfig, eval_spec
from pipeline.evals.evaluate import Evaluator, check_eval_spec
from pipeline.fingerprint import eval_data_sha256
from pipeline.models import load_model
from pipeline.specs import EvalSpec, ModelRef

COPA_DOCS = [
    {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
     "choice2": "He got a hole in his sock.", "question": "cause", "label": 0},
    {"premise": "I tipped the bottle.", "choice1": "The liquid in the bottle froze.",
     "choice2": "The liquid in the bottle poured out.", "question": "effect", "label": 1},
    {"premise": "The sun was rising.", "choice1": "The birds began to sing.",
     "choice2": "The moon turned blue.", "question": "effect", "label": 0},
]  # fmt: skip

COPA_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{premise}}}} {prompt}"
doc_to_target: label
doc_to_choice: "{{{{[choice1, choice2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(folder: Path, name: str = "my_copa", prompt: str = "What happened?", docs=COPA_DOCS) -> Path:
    """A COPA-like task YAML and its jsonl data in `folder`; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / f"{name}.yaml").write_text(COPA_YAML.format(name=name, data=data, prompt=prompt))
    return folder


def spec_for(data_root: Path, folder: Path, tasks=("my_copa",)) -> EvalSpec:
    return EvalSpec(tasks=tuple(tasks), data_root=str(data_root), include_path=(str(folder),), limit=3)


def test_user_task_runs_end_to_end_through_the_evaluator(tiny_model_dir, data_root, tmp_path):
    spec = spec_for(data_root, write_task(tmp_path / "tasks"))
    check_eval_spec(spec)
    model, tokenizer = load_model(ModelRef(str(tiny_model_dir)), "cpu")
    metrics = Evaluator(model, tokenizer, spec).run()
    acc = next(m for m in metrics if m.metric == "acc")
    assert acc.task == "my_copa" and acc.n_examples == 3 and 0.0 <= acc.value <= 1.0


def test_unknown_task_names_the_include_path(data_root, tmp_path):
    spec = spec_for(data_root, write_task(tmp_path / "tasks"), tasks=("my_copx",))
    with pytest.raises(KeyError, match=r"my_copa.*eval.include_path"):
        check_eval_spec(spec)


def test_bad_include_path_and_missing_data_are_refused(data_root, tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        check_eval_spec(spec_for(data_root, tmp_path / "nowhere"))
    folder = write_task(tmp_path / "tasks")
    (folder / "my_copa.jsonl").unlink()
    with pytest.raises(ValueError, match=r"'my_copa' reads .*my_copa.jsonl"):
        check_eval_spec(spec_for(data_root, folder))


def test_hub_task_is_refused_offline_naming_task_and_fix(data_root, tmp_path, monkeypatch):
    folder = tmp_path / "tasks"
    write_task(folder)
    yaml = (folder / "my_copa.yaml").read_text()
    (folder / "my_copa.yaml").write_text(yaml.replace("dataset_path: json", "dataset_path: super_glue"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"'my_copa'.*'super_glue'.*HF_HUB_OFFLINE.*eval.include_path"):
        check_eval_spec(spec_for(data_root, folder))


def test_task_definition_is_in_the_data_key(data_root, tmp_path):
    first = spec_for(data_root, write_task(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "my_copa.yaml", tmp_path / "b")  # same text, same data file
    same = spec_for(data_root, tmp_path / "b")
    other_prompt = spec_for(data_root, write_task(tmp_path / "c", prompt="Why?"))
    other_data = spec_for(data_root, write_task(tmp_path / "d", docs=COPA_DOCS[:2]))
    digests = [dict(eval_data_sha256(s))["taskdef:my_copa"] for s in (first, same, other_prompt, other_data)]
    assert digests[0] is not None and digests[0] == digests[1]
    assert len({digests[0], digests[2], digests[3]}) == 3


def test_user_folder_overrides_an_offline_task_and_is_keyed(data_root, tmp_path):
    folder = write_task(tmp_path / "tasks", name="piqa")
    plain = dict(eval_data_sha256(EvalSpec(tasks=("piqa",), data_root=str(data_root))))
    user = dict(eval_data_sha256(replace(spec_for(data_root, folder, tasks=("piqa",)))))
    assert set(plain) == {"task:piqa"} and set(user) == {"taskdef:piqa"}


def test_include_path_config_is_relative_to_the_project_root():
    spec = eval_spec(EvalConfig(perplexity=[], include_path=["my_tasks"]))
    assert Path(spec.include_path[0]).is_absolute() and spec.include_path[0].endswith("my_tasks")


def test_groups_and_tags_in_an_include_folder_resolve_to_their_members(data_root, tmp_path):
    from pipeline.evals.taskdefs import member_tasks, task_index

    folder = write_task(tmp_path / "tasks")
    write_task(folder, name="my_copa2", prompt="Why?")
    (folder / "my_group.yaml").write_text("group: my_group\ntask:\n  - my_copa\n  - my_copa2\n")
    text = (folder / "my_copa2.yaml").read_text()
    tagged = text.replace("task: my_copa2\n", "task: my_copa2\ntag: my_tag\n")
    (folder / "my_copa2.yaml").write_text(tagged)
    index = task_index([str(folder)])
    assert sorted(member_tasks("my_group", index)) == ["my_copa", "my_copa2"]
    assert member_tasks("my_tag", index) == ["my_copa2"]
    check_eval_spec(spec_for(data_root, folder, tasks=("my_group",)))
    check_eval_spec(spec_for(data_root, folder, tasks=("my_tag",)))
    (folder / "my_copa2.jsonl").unlink()  # a group member's data missing: refused before anything runs
    with pytest.raises(ValueError, match=r"my_copa2"):
        check_eval_spec(spec_for(data_root, folder, tasks=("my_group",)))


def test_a_group_is_keyed_by_its_members_definitions(data_root, tmp_path):
    folder = tmp_path / "tasks"

    def group_digest(prompt: str) -> dict[str, str | None]:
        write_task(folder)
        write_task(folder, name="my_copa2", prompt=prompt)  # same folder: only the prompt differs
        (folder / "my_group.yaml").write_text("group: my_group\ntask:\n  - my_copa\n  - my_copa2\n")
        return dict(eval_data_sha256(spec_for(data_root, folder, tasks=("my_group",))))

    first, again, other = group_digest("Why?"), group_digest("Why?"), group_digest("How?")
    assert first == again and first != other
