"""Jobs: one quantize-and-evaluate unit each, keyed by a content hash, deduped and grouped by model.

A job's `key` is the sha256 of the canonical JSON of what determines its numbers: the model
reference, the recipe, the eval spec without its `data_root` (the same files under another mount
are the same data), the content hashes of what the job reads (`pipeline.fingerprint`: a local model
folder's files, each perplexity text and offline task data file, a calibrating recipe's source
text), `kernels.numerics.NUMERICS_VERSION` and `KEY_VERSION`. A hub id is keyed (and loaded) at the
commit its revision resolves to in the local hub cache, where it does. The calibration token ids
follow from the source text, the spec and the model's tokenizer (all keyed), so the driver does not
tokenize; the worker records their hash in the `calibration` column. Every row stores its job's
canonical JSON (`job_json`), so the fingerprints a result was computed from stay with it.

The key has its own version, apart from the results schema's: a new results column changes no key;
a change in what a key means bumps KEY_VERSION on purpose (every earlier study then reruns on
resume; its rows still load). Version 2: the recipe replaced version 1's QuantSpec, outlier fraction
and the model's quantization scope. Version 3: the model, data and numerics fingerprints.
Recovery adapters (`recover`, with the content hash of their training text) enter the key only when
a job trains some: a job without them (`recover.method=none`) keeps the key it had before recovery
existed, so no version bump. A 16-bit baseline never trains adapters (its recover part is dropped),
so every 16-bit cell of a sweep stays one job.

A ladder member is keyed by its label (`ladder:h100/d128@<config hash>`), not by its cache folder
or its weights, so a ladder study resumes on any machine whose cache holds the same ladder config.
The study is NOT in the key: it only names the folder a job's rows land in, so the same cell in
two studies is the same job, and rows can be compared or copied between studies by key.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kernels.numerics import NUMERICS_VERSION
from pipeline.config import Config, eval_spec, model_ref, recipe, recover_spec
from pipeline.ladders.configs import LADDER_PREFIX
from pipeline.recipe import Recipe
from pipeline.recovery import NO_RECOVERY, RecoverSpec
from pipeline.specs import EvalSpec, ModelRef

KEY_VERSION = 3
# EvalSpec fields that change where inputs are read or how fast, not the numbers: kept out of the key
EVAL_NOT_KEYED = frozenset({"data_root", "compile", "include_path"})
# ModelRef fields that change where memory goes, not the numbers: kept out of the key
MODEL_NOT_KEYED = frozenset({"snapshot"})


@dataclass(frozen=True)
class ModelSource:
    """A model as the driver resolved it: where to load it from and how to name it in results."""

    ref: ModelRef
    label: str  # the `model` column: e.g. "ladder:tiny/1" for a ladder member, else name_or_path
    family: str | None = None  # the `model_family` column; None: the worker uses HF's model_type


ModelResolver = Callable[[ModelRef], Sequence[ModelSource]]


@dataclass(frozen=True)
class Job:
    """One quantize-and-evaluate unit."""

    model: ModelRef
    recipe: Recipe  # recipe.is_baseline: the unquantized 16-bit baseline
    evals: EvalSpec
    study: str
    model_label: str = ""
    model_family: str | None = None
    calibration_sha256: str | None = None  # the calibration source's content (see `source_fingerprint`)
    model_sha256: str | None = None  # a local model folder's content (`fingerprint.folder_sha256`)
    data_sha256: tuple[tuple[str, str | None], ...] = ()  # (text:<path> | task:<name>, content sha256)
    recover: RecoverSpec = NO_RECOVERY  # adapters trained after quantization (never on the baseline)
    recover_sha256: str | None = None  # the recovery training text's content (see `source_fingerprint`)

    @functools.cached_property
    def canonical(self) -> dict[str, Any]:
        """What determines this job's numbers, as plain JSON-able data."""
        recover = {"recover": json.loads(self._recover_json)} if self.recover.enabled else {}
        return {
            **recover,
            "key_version": KEY_VERSION,
            "model": json.loads(self._model_json),
            "recipe": self.recipe.plain(),
            "evals": _plain(self.evals),
            "calibration_sha256": self.calibration_sha256,
            "model_sha256": self.model_sha256,
            "data_sha256": dict(self.data_sha256),
            "numerics_version": NUMERICS_VERSION,
        }

    @functools.cached_property
    def job_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): the text the key hashes.

        Assembled from memoized per-spec JSON; equal to `_dumps(self.canonical)` (a test checks).
        """
        return (
            f'{{"calibration_sha256":{_dumps(self.calibration_sha256)},'
            f'"data_sha256":{_data_json(self.data_sha256)},"evals":{_spec_json(self.evals)},'
            f'"key_version":{KEY_VERSION},"model":{self._model_json},'
            f'"model_sha256":{_dumps(self.model_sha256)},"numerics_version":{NUMERICS_VERSION},'
            f'"recipe":{_recipe_json(self.recipe)}'
            + (f',"recover":{self._recover_json}' if self.recover.enabled else "")
            + "}"
        )

    @functools.cached_property
    def _recover_json(self) -> str:
        """The recovery part of the key: its settings and its training text's content hash."""
        return _dumps({**self.recover.plain(), "data_sha256": self.recover_sha256})

    @functools.cached_property
    def _model_json(self) -> str:
        """The model part of the key: a ladder member by its label, anything else by its reference."""
        if self.model_label.startswith(LADDER_PREFIX) and "@" in self.model_label:
            return _ladder_model_json(self.model, self.model_label)
        return _spec_json(self.model)

    @functools.cached_property
    def key(self) -> str:
        """sha256 hex of `job_json`."""
        return hashlib.sha256(self.job_json.encode()).hexdigest()

    @property
    def bits(self) -> int:
        return self.recipe.bits


@functools.lru_cache(maxsize=4096)
def _plain(spec: Any) -> dict[str, Any]:
    """`dataclasses.asdict` of a frozen spec (an EvalSpec without data_root and compile), memoized.

    A 35,000-job grid has few distinct specs. The returned dict is shared: read it, never modify it.
    """
    plain = dataclasses.asdict(spec)
    if isinstance(spec, EvalSpec):
        return {k: v for k, v in plain.items() if k not in EVAL_NOT_KEYED}
    if isinstance(spec, ModelRef):
        return {k: v for k, v in plain.items() if k not in MODEL_NOT_KEYED}
    return plain


@functools.lru_cache(maxsize=4096)
def _spec_json(spec: Any) -> str:
    return _dumps(_plain(spec))


@functools.lru_cache(maxsize=4096)
def _recipe_json(recipe: Recipe) -> str:
    return _dumps(recipe.plain())


@functools.lru_cache(maxsize=4096)
def _data_json(data_sha256: tuple[tuple[str, str | None], ...]) -> str:
    return _dumps(dict(data_sha256))


@functools.lru_cache(maxsize=4096)
def _ladder_model_json(model: ModelRef, label: str) -> str:
    return _dumps({**_plain(model), "name_or_path": label})


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def single_source(ref: ModelRef) -> Sequence[ModelSource]:
    """The resolver for plain models (hub ids, local dirs): the model is its own label; a GGUF checkpoint
    adds its file (`folder/model-q8_0.gguf`), so two files of one folder never share a label."""
    label = f"{ref.name_or_path.rstrip('/')}/{ref.gguf_file}" if ref.gguf_file else ref.name_or_path
    return [ModelSource(ref=ref, label=label)]


def build_jobs(cells: Iterable[Config], resolve: ModelResolver = single_source) -> list[Job]:
    """One job per (cell, resolved model), deduped by key in first-seen order.

    `quant.bits=16` becomes the baseline recipe, so every 16-bit cell of a model and eval collapses
    into one job. Specs are built once per distinct config value.

    Raises:
        ValueError, KeyError: a recipe that does not validate (pre-flight catches these first).
    """
    from pipeline.fingerprint import eval_data_sha256

    recipes = _Memo(lambda c: recipe(c.quant))
    fingerprints = _Memo(lambda c: _calibration_sha256(recipes(repr(c.quant), c), c))
    evals = _Memo(lambda c: eval_spec(c.eval))
    data = _Memo(lambda c: eval_data_sha256(evals(repr(c.eval), c)))
    sources = _Memo(lambda c: tuple(_pinned(s) for s in resolve(model_ref(c.model))))
    recovers = _Memo(lambda c: _recover_part(c, recipes(repr(c.quant), c)))
    jobs: dict[str, Job] = {}
    for cell in cells:
        quant = recipes(repr(cell.quant), cell)
        spec = evals(repr(cell.eval), cell)
        texts = data(repr(cell.eval), cell)
        for source, model_sha in sources(repr(cell.model), cell):
            sha = fingerprints(repr(cell.quant) + repr(cell.eval.data_root), cell)
            recover, recover_sha = recovers(
                repr(cell.recover) + repr(cell.quant) + repr(cell.eval.data_root), cell
            )
            where = (source.ref, quant, spec, cell.study, source.label, source.family, sha, model_sha, texts)
            job = Job(*where, recover, recover_sha)
            jobs.setdefault(job.key, job)
    return list(jobs.values())


def _pinned(source: ModelSource) -> tuple[ModelSource, str | None]:
    """(the source with a hub id pinned to its cached commit, a local folder's content hash); a
    ladder member as it is (keyed by its label)."""
    from pipeline.fingerprint import pin_model

    if source.label.startswith(LADDER_PREFIX):
        return source, None
    ref, model_sha = pin_model(source.ref)
    return dataclasses.replace(source, ref=ref), model_sha


def _calibration_sha256(quant: Recipe, cell: Config) -> str | None:
    """The content hash of a calibrating recipe's source text (None without calibration)."""
    if quant.calibration is None or quant.calibration.source is None:
        return None
    from pipeline.calibration import source_fingerprint
    from pipeline.config import project_path

    return source_fingerprint(quant.calibration.source, project_path(cell.eval.data_root))


def _recover_part(cell: Config, quant: Recipe) -> tuple[RecoverSpec, str | None]:
    """(the recover spec, its training text's content hash); none for a baseline or no recovery."""
    spec = recover_spec(cell.recover)
    if not spec.enabled or quant.is_baseline:
        return NO_RECOVERY, None
    from pipeline.calibration import source_fingerprint
    from pipeline.config import project_path

    return spec, source_fingerprint(spec.data, project_path(cell.eval.data_root))


def group_by_model(jobs: Iterable[Job]) -> dict[ModelRef, list[Job]]:
    """Jobs per model, models in first-seen order (each model loads once per worker)."""
    groups: dict[ModelRef, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.model, []).append(job)
    return groups


def split_by_study(jobs: Iterable[Job]) -> dict[str, list[Job]]:
    """Jobs per study (a sweep may set `study` per cell)."""
    studies: dict[str, list[Job]] = {}
    for job in jobs:
        studies.setdefault(job.study, []).append(job)
    return studies


class _Memo:
    """Call `make(cell)` once per distinct text key (config dataclasses are unhashable)."""

    def __init__(self, make: Callable[[Config], Any]) -> None:
        self._make = make
        self._seen: dict[str, Any] = {}

    def __call__(self, key: str, cell: Config) -> Any:
        if key not in self._seen:
            self._seen[key] = self._make(cell)
        return self._seen[key]
