"""Job keys change when what a job reads changes: model files, data files, hub commits, the numerics."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.fingerprint import file_sha256, folder_sha256, model_files
from pipeline.jobs import Job, build_jobs
from pipeline.sweep import expand, plan_sweep
from tests.pipeline.hub_cache import cache_model

WIKITEXT = "eval/wikitext-2-raw/wiki.test.raw"


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh digest cache per test (the on-disk cache is what a second plan reads)."""
    cache = tmp_path / "kbit-cache"
    monkeypatch.setenv("KBIT_CACHE", str(cache))
    return cache


def one_job(*overrides: str) -> Job:
    (job,) = build_jobs(expand(plan_sweep(list(overrides), multirun=True)))
    return job


def _data_root(tmp_path: Path, data_root: Path) -> Path:
    """A data root holding a copy of WikiText-2's test text (same bytes, another folder)."""
    root = tmp_path / "data"
    (root / WIKITEXT).parent.mkdir(parents=True)
    shutil.copy(data_root / WIKITEXT, root / WIKITEXT)
    return root


def _rewrite(path: Path, data: bytes) -> None:
    """Rewrite a file in place, its mtime moved on (as any real edit does)."""
    stat = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_same_text_under_another_root_is_the_same_job_and_an_edit_is_another(tmp_path, data_root):
    root = _data_root(tmp_path, data_root)
    base = one_job("model.name_or_path=org/m")
    moved = one_job("model.name_or_path=org/m", f"eval.data_root={root}")
    assert moved.key == base.key
    assert dict(moved.data_sha256)[f"text:{WIKITEXT}"] == file_sha256(data_root / WIKITEXT)
    text = (root / WIKITEXT).read_bytes()
    _rewrite(root / WIKITEXT, text.replace(b" the ", b" a ", 1))
    edited = one_job("model.name_or_path=org/m", f"eval.data_root={root}")
    assert edited.key != base.key and edited.job_json != base.job_json


def test_heldout_corpus_and_task_files_are_keyed_by_content(tmp_path, data_root):
    root = tmp_path / "data"
    shutil.copytree(data_root / "corpus", root / "corpus")
    (root / "eval/piqa").mkdir(parents=True)
    shutil.copy(data_root / "eval/piqa/validation.jsonl", root / "eval/piqa")
    args = ["model.name_or_path=org/m", f"eval.data_root={root}", "eval.tasks=[piqa]"]
    args += ["eval.perplexity=[{name: heldout, path: 'corpus:heldout'}]"]
    base = one_job(*args)
    assert {name for name, _ in base.data_sha256} == {"text:corpus:heldout", "task:piqa"}
    piqa = root / "eval/piqa/validation.jsonl"
    _rewrite(piqa, piqa.read_bytes()[:-200])
    after_task = one_job(*args)
    corpus_file = sorted((root / "corpus").rglob("*.xz"))[0]
    _rewrite(corpus_file, corpus_file.read_bytes() + b"")  # same bytes: same key
    assert one_job(*args).key == after_task.key != base.key


def test_local_model_weights_changed_in_place_change_the_key(tmp_path, tiny_model_dir, own_cache):
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    before = one_job(f"model.name_or_path={folder}")
    assert before.model_sha256 == folder_sha256(folder)
    assert f'"model_sha256":"{before.model_sha256}"' in before.job_json  # rows store it
    cached = {entry.read_text() for entry in (own_cache / "digests").iterdir()}
    assert {file_sha256(path) for path in model_files(folder)} <= cached  # hashed once, kept on disk
    (folder / "README.md").write_text("notes")
    assert one_job(f"model.name_or_path={folder}").key == before.key  # docs never change the numbers
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 0.5  # same shapes, same file size
    model.save_pretrained(folder)
    after = one_job(f"model.name_or_path={folder}")
    assert after.key != before.key and after.model_sha256 != before.model_sha256


def test_a_hub_id_is_pinned_to_its_cached_commit(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    unresolved = one_job("model.name_or_path=org/tiny")
    assert unresolved.model.revision is None  # not in the cache: the given revision is kept
    cache_model(tmp_path / "hub", "org/tiny", tiny_model_dir, "a" * 40)
    first = one_job("model.name_or_path=org/tiny")
    assert first.model.revision == "a" * 40 and first.key != unresolved.key
    cache_model(tmp_path / "hub", "org/tiny", tiny_model_dir, "b" * 40)  # main moved on
    second = one_job("model.name_or_path=org/tiny")
    assert second.model.revision == "b" * 40 and second.key != first.key
    assert one_job("model.name_or_path=org/tiny", f"model.revision={'a' * 40}").key == first.key


def test_the_numerics_version_is_in_the_key(monkeypatch):
    import pipeline.jobs

    base = one_job("model.name_or_path=org/m")
    assert json.loads(base.job_json)["numerics_version"] == pipeline.jobs.NUMERICS_VERSION
    monkeypatch.setattr(pipeline.jobs, "NUMERICS_VERSION", pipeline.jobs.NUMERICS_VERSION + 1)
    assert one_job("model.name_or_path=org/m").key != base.key


def test_ladder_members_are_keyed_by_label_not_weights(tmp_path, tiny_model_dir):
    from pipeline.jobs import ModelSource

    def resolve(ref):
        return [ModelSource(ref.__class__(str(tiny_model_dir)), "ladder:t/s@0123abcd", "t")]

    (job,) = build_jobs(expand(plan_sweep(["model.name_or_path=ladder:t"], multirun=True)), resolve)
    assert job.model_sha256 is None and '"name_or_path":"ladder:t/s@0123abcd"' in job.job_json
