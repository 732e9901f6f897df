"""Evaluate an in-memory model: strided perplexity of text sets and lm-eval tasks.

`Evaluator` is built once per resident model; it reads and tokenizes every text and builds every
lm-eval request then, so `run()` (called after each restore + quantize) only runs forward passes
and metrics. A text with `kl_tokens` also keeps the logits the model gives when the Evaluator is
built (its KL reference): build it on the pristine 16-bit weights, before any quantization.
`check_eval_spec` validates an `EvalSpec` cheaply, before any job runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernels.registry import unknown_name_message
from pipeline.evals.perplexity import check_perplexity_spec, kl_reference, perplexity_metrics, tokenize_text
from pipeline.evals.tasks import OFFLINE_TASKS
from pipeline.models.architectures import UNPACKABLE
from pipeline.specs import EvalSpec, MetricValue, PerplexitySpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from pipeline.config import PerplexityConfig
    from pipeline.evals.lmeval import LmEvalSuite

log = logging.getLogger(__name__)

SCORERS = ("auto", "hflm", "fast")


def resolve_scorer(setting: str, model_type: str | None) -> str:
    """`EvalSpec.scorer` resolved for a model of `model_type`: "auto" is "fast" unless the architecture
    is in UNPACKABLE ("hflm"); an Evaluator also falls back to "hflm" when auto's probe refuses packing."""
    if setting != "auto":
        return setting
    return "hflm" if model_type in UNPACKABLE else "fast"


def scorer_problems(scorer: str, has_tasks: bool, model: str, model_type: str | None) -> list[str]:
    """A message if `scorer` cannot score `model` (of `model_type`, None: unknown) on lm-eval tasks."""
    if scorer != "fast" or not has_tasks or model_type not in UNPACKABLE:
        return []
    return [
        f"eval.scorer='fast' cannot score {model!r} ({model_type}: {UNPACKABLE[model_type]}); "
        "use eval.scorer=hflm"
    ]


# The break-even of `eval.compile=null` (auto), measured on one H200 (docs/benchmarks.md, third
# session, 410M-class model, FastScorer): compiling costs ~40 s once per model and worker (build + first
# job 51.5 s compiled against 11.8 s eager) and saves ~0.14 s a job (0.455 s against 0.596 s), so it
# pays from ~285 jobs a worker runs on one model.
COMPILE_COST_S = 40.0
COMPILE_SAVING_PER_JOB_S = 0.14


def compile_pays(jobs_per_worker: int) -> bool:
    """The break-even rule: jobs_per_worker x saving per job > the one-time compile cost."""
    return jobs_per_worker * COMPILE_SAVING_PER_JOB_S > COMPILE_COST_S


def should_compile(setting: bool | None, device_type: str, scorer: str, has_tasks: bool) -> bool:
    """`EvalSpec.compile` resolved: None (auto) compiles on CUDA when every forward has a planned
    shape (FastScorer's batches, perplexity windows): HFLM's batch widths vary batch by batch, and a
    compiled block compiles once per width."""
    if setting is not None:
        return setting
    return device_type == "cuda" and (scorer == "fast" or not has_tasks)


def _check_text_path(path: str, data_root: Path) -> None:
    from pipeline.evals.perplexity import text_problems

    problems = text_problems(path, data_root)
    if problems:
        raise ValueError("; ".join(problems))


def check_eval_spec(spec: EvalSpec) -> None:
    """Raise ValueError/KeyError naming the first bad value of an EvalSpec; reads no model."""
    data_root = Path(spec.data_root).expanduser()
    if not data_root.is_dir():
        raise ValueError(f"data_root {spec.data_root!r} is not a directory")
    if spec.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {spec.batch_size}")
    if spec.scorer not in SCORERS:
        raise ValueError(unknown_name_message("eval.scorer", spec.scorer, SCORERS))
    if spec.compile not in (None, True, False):
        raise ValueError(f"compile must be true, false or null (auto), got {spec.compile!r}")
    if spec.limit is not None and spec.limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {spec.limit}")
    names = [p.name for p in spec.perplexity] + list(spec.tasks)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate task names in the eval spec: {duplicates}")
    for ppl in spec.perplexity:
        check_perplexity_spec(ppl)
        _check_text_path(ppl.path, data_root)
    for name in spec.tasks:
        if name in OFFLINE_TASKS and not (data_root / OFFLINE_TASKS[name][0]).is_file():
            raise ValueError(f"task {name!r} needs {str(data_root / OFFLINE_TASKS[name][0])!r}")
    if spec.include_path or any(name not in OFFLINE_TASKS for name in spec.tasks):
        from pipeline.evals.lmeval import check_task_names

        check_task_names(spec.tasks, spec.include_path, data_root)


def context_problems(
    perplexity: Sequence[PerplexitySpec | PerplexityConfig], model: str, limit: int | None
) -> list[str]:
    """One message per perplexity window longer than `model`'s `limit` positions (None: unknown)."""
    return [
        f"perplexity {p.name!r}: context_length={p.context_length} exceeds {model!r}'s {limit} positions "
        f"(max_position_embeddings={limit}); use context_length <= {limit}"
        for p in perplexity
        if limit is not None and p.context_length > limit
    ]


def check_context_fits(spec: EvalSpec, model: PreTrainedModel) -> None:
    """Raise ValueError if a perplexity window is longer than the model's position table."""
    limit = getattr(model.config, "max_position_embeddings", None)
    problems = context_problems(spec.perplexity, model.config.name_or_path or "the model", limit)
    if problems:
        raise ValueError("; ".join(problems))


class Evaluator:
    """Scores one resident model on an EvalSpec; everything but the forward passes is done once.

    Built on the 16-bit weights: texts with `kl_tokens` keep the logits of the model as it is then.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: EvalSpec,
        *,
        scorer: str | None = None,
    ) -> None:
        """`scorer` overrides `spec.scorer`: "auto", "hflm" (lm-eval's HFLM) or "fast" (`FastScorer`).
        `self.scorer` is the one used ("hflm" or "fast"; the rows' `scorer` column). What depends on
        the tokenizer and the task definitions only is loaded from `evalcache` when there."""
        check_eval_spec(spec)
        check_context_fits(spec, model)
        setting = scorer or spec.scorer
        scorer = resolve_scorer(setting, getattr(model.config, "model_type", None))
        self.model, self.spec, self.scorer = model, spec, scorer
        self.phases: dict[str, float] = {}  # seconds per build phase (compile_s, texts_s, kl_s, tasks_s)
        self.cache_hits: dict[str, bool] = {}  # per text and "tasks": loaded from `evalcache`
        start = time.perf_counter()
        if should_compile(spec.compile, model.device.type, scorer, bool(spec.tasks)):
            from pipeline.models import compile_layers

            log.info("compiled %d decoder blocks", compile_layers(model))
        start = self._phase("compile_s", start)
        data_root = Path(spec.data_root).expanduser().resolve()
        self.texts = tuple(self._tokenize(p, tokenizer, data_root) for p in spec.perplexity)
        start = self._phase("texts_s", start)
        self.kl_references = tuple(kl_reference(model, text) for text in self.texts)
        start = self._phase("kl_s", start)
        self.suite: LmEvalSuite | None = None
        if spec.tasks:
            self.suite = self._suite(tokenizer, data_root, auto=setting == "auto")
            self.cache_hits["tasks"] = self.suite.cache_hit
        self._phase("tasks_s", start)

    def _phase(self, name: str, start: float) -> float:
        """Record the seconds since `start` as phase `name`; returns now."""
        now = time.perf_counter()
        self.phases[name] = now - start
        return now

    def _tokenize(self, spec: PerplexitySpec, tokenizer: PreTrainedTokenizerBase, data_root: Path) -> Any:
        """A perplexity text tokenized into window batches, its token ids from `evalcache` when there."""
        from pipeline.evals import evalcache
        from pipeline.evals.perplexity import encode_text, perplexity_text

        text = perplexity_text(spec.path, data_root)
        key = evalcache.text_key(text, tokenizer, spec.max_tokens)
        encoded = evalcache.load(key)
        self.cache_hits[spec.name] = encoded is not None
        if encoded is None:
            encoded = encode_text(text, tokenizer, spec.max_tokens)
            evalcache.store(key, encoded)
        return tokenize_text(spec, text, tokenizer, self.spec.batch_size, self.model.device, encoded)

    def _suite(self, tokenizer: PreTrainedTokenizerBase, data_root: Path, *, auto: bool) -> LmEvalSuite:
        """The lm-eval suite scored by `self.scorer`; under "auto", HFLM when FastScorer's probe refuses."""
        from pipeline.evals.fastscore import PackingRefused

        try:
            return self._make_suite(tokenizer, data_root, self.scorer)
        except PackingRefused as err:
            if not auto or self.scorer != "fast":
                raise
            log.warning("eval.scorer=auto: scoring with HFLM (%s)", err)
            self.scorer = "hflm"
            return self._make_suite(tokenizer, data_root, "hflm")

    def _make_suite(self, tokenizer: PreTrainedTokenizerBase, data_root: Path, scorer: str) -> LmEvalSuite:
        from pipeline.evals.lmeval import LmEvalSuite

        spec = self.spec
        return LmEvalSuite(
            self.model,
            tokenizer,
            spec.tasks,
            data_root=data_root,
            limit=spec.limit,
            batch_size=spec.batch_size,
            scorer=scorer,
            include_path=spec.include_path,
            cache=True,
        )

    def run(self) -> list[MetricValue]:
        """Every metric of the spec, for the model's weights as they are now."""
        metrics = [
            m
            for text, reference in zip(self.texts, self.kl_references, strict=True)
            for m in perplexity_metrics(self.model, text, reference)
        ]
        if self.suite is not None:
            metrics += self.suite.run()
        return metrics
