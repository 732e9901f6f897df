"""lm-eval tasks on an in-memory model, with every request built and tokenized once per model.

`LmEvalSuite` loads the tasks (offline ones from `pipeline/tasks`, data root as TaskManager
metadata), builds their requests once, and wraps the model in an `HFLM` whose context/continuation
encodings are memoized. Each `run()` goes through `lm_eval.evaluator.evaluate` on those same task
objects: their `build_all_requests` is replaced, per object, by one that only clears the previous
responses. No lm-eval response cache is used (its key ignores the weights, so it would return the
first quantization config's answers for every other config). Standard errors are computed here from
the per-document values (`bootstrap_iters=0`): the sample standard error of the mean, as lm-eval
reports it, and the delta method for perplexity (lm-eval would bootstrap it in a process pool).
With `metrics="numpy"` (the default of `scorer="fast"`), `pipeline.evals.fastmetrics` computes the same
values straight from the log-likelihoods instead of `evaluate`, for suites it can plan.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernels.registry import unknown_name_message
from pipeline.evals.tasks import OFFLINE_TASKS
from pipeline.evals.units import document_units
from pipeline.specs import MetricValue

if TYPE_CHECKING:
    from lm_eval.api.task import Task
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from pipeline.evals.fastmetrics import SuitePlan

log = logging.getLogger(__name__)

REPORTED_METRICS = ("acc", "acc_norm", "perplexity")


def task_manager(names: tuple[str, ...], data_root: Path, include_path: tuple[str, ...] = ()) -> Any:
    """A TaskManager over pipeline/tasks and the user's `include_path` folders (which override it);
    lm-eval's own tasks are indexed only when one of `names` is defined in none of those folders."""
    from lm_eval.tasks import TaskManager

    from pipeline.evals.taskdefs import task_folders, task_index

    local = task_index(include_path) if include_path else {}
    include_defaults = any(name not in OFFLINE_TASKS and name not in local for name in names)
    manager = TaskManager(
        include_path=[str(folder) for folder in task_folders(include_path)],
        include_defaults=include_defaults,
        metadata={"data_root": str(data_root)},
    )
    quiet_lm_eval()  # after TaskManager, which may set lm-eval's logging up itself
    compile_templates_once()
    return manager


def compile_templates_once() -> None:
    """Make lm-eval compile each prompt template once instead of once per document and field.

    `lm_eval.utils.apply_template` calls jinja's `Environment.from_string`, which compiles (parses,
    generates and `exec`s Python) on every call and caches nothing: building paper_ladder's 4,500
    requests compiled ~5,000 templates, 4.5 s of a 10 s Evaluator build on a 2-core CPU. The
    replacement renders the same compiled template (rendering is stateless), so prompts are
    unchanged, character for character. Idempotent.
    """
    import functools

    import lm_eval.utils

    if getattr(lm_eval.utils.apply_template, "compiles_once", False):
        return
    env = lm_eval.utils.env

    @functools.lru_cache(maxsize=1024)
    def compiled(template: str) -> Any:
        return env.from_string(template)

    def apply_template(template: str, doc: dict[str, Any]) -> str:
        return str(compiled(template).render(**doc))

    apply_template.compiles_once = True  # type: ignore[attr-defined]
    lm_eval.utils.apply_template = apply_template


def _named_in_lm_eval_yaml(name: str) -> bool:
    """A cheap necessary condition for an lm-eval task name: it appears in one of lm-eval's YAMLs."""
    import lm_eval

    pattern = re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
    root = Path(lm_eval.__file__).parent / "tasks"
    return any(pattern.search(path.read_text(errors="ignore")) for path in root.rglob("*.yaml"))


def check_task_names(
    names: tuple[str, ...], include_path: tuple[str, ...] = (), data_root: Path | None = None
) -> None:
    """Unknown task names -> KeyError listing the offline tasks; tasks that cannot run here -> ValueError.

    Offline names are checked at once, then names the `include_path` folders define (cheap to index);
    any other name must be registered by lm-eval, which takes indexing its ~14k YAMLs (~25 s), so a name
    that no lm-eval YAML even mentions fails first. With `data_root`, a task that downloads from the hub
    while the hub is unreachable, or reads a local file that is missing, is refused, naming both.
    """
    from pipeline.evals.taskdefs import include_path_problems, offline_problems, task_index

    problems = include_path_problems(include_path)
    if problems:
        raise ValueError("; ".join(problems))
    index = task_index(include_path)
    others = [name for name in names if name not in OFFLINE_TASKS and name not in index]
    for name in others:
        if not _named_in_lm_eval_yaml(name) or name not in _lm_eval_task_names(include_path):
            known = sorted({*OFFLINE_TASKS, *(n for n in index if n not in OFFLINE_TASKS)})
            raise KeyError(
                unknown_name_message("lm-eval task", name, known).replace("(allowed:", "(offline tasks:")
                + "; other names must be tasks, groups or tags registered by lm-eval or defined in a "
                "folder of eval.include_path"
            )
    if data_root is None:
        return
    from pipeline.hub import offline_reason

    if others:
        index = task_index(include_path, include_defaults=True)
    problems = offline_problems(names, index, data_root, offline_reason() or "")
    if problems:
        raise ValueError("; ".join(problems))


def _lm_eval_task_names(include_path: tuple[str, ...] = ()) -> set[str]:
    from pipeline.evals.taskdefs import task_index

    return set(task_index(include_path, include_defaults=True))


def verbose() -> bool:
    """`verbose=true` (the driver sets KBIT_VERBOSE for itself and every worker)."""
    return os.environ.get("KBIT_VERBOSE", "") not in ("", "0")


def quiet_lm_eval() -> None:
    """lm-eval's per-job notices (model kwargs, task metadata) off unless verbose: errors still show."""
    if not verbose():
        logging.getLogger("lm_eval").setLevel(logging.ERROR)


def make_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> Any:
    """An HFLM over the in-memory model whose (context, continuation) encodings are memoized."""
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval()

    class MemoHFLM(HFLM):
        """HFLM that tokenizes each distinct request once for the life of the model; no progress bars
        unless verbose (lm-eval passes `disable=False` to tqdm, which TQDM_DISABLE cannot override)."""

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not verbose())

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not verbose())

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not verbose())

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.encoded: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            key = (context, continuation)
            if key not in self.encoded:
                self.encoded[key] = super()._encode_pair(context, continuation)
            return self.encoded[key]

        def pretokenize(self, context: str, continuation: str) -> None:
            """Encode one request ahead of scoring (empty contexts are cheap and not memoized)."""
            if context:
                self._encode_pair(context, continuation)

    return MemoHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


METRICS_PATHS = ("lm_eval", "numpy")


def make_scorer(
    scorer: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int
) -> Any:
    """The lm-eval LM that answers requests: "hflm" (lm-eval's HFLM) or "fast" (`FastScorer`)."""
    if scorer == "hflm":
        return make_lm(model, tokenizer, batch_size)
    if scorer == "fast":
        from pipeline.evals.fastscore import FastScorer

        return FastScorer(model, tokenizer, batch_size)
    raise ValueError(unknown_name_message("eval.scorer", scorer, ("hflm", "fast")))


def _reuse_requests(task: Task) -> None:
    """Make later `build_all_requests` calls on this task object reuse the instances built now."""
    instances = list(task.instances)

    def build_all_requests(**_: Any) -> None:
        for instance in instances:
            instance.resps = []
            instance.filtered_resps = {}
        task._instances = instances

    task.build_all_requests = build_all_requests


def metric_stderr(metric: str, values: list[float]) -> float | None:
    """Standard error of a metric from its per-document values (perplexity: the delta method)."""
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    if metric == "perplexity":  # values are log-likelihoods; perplexity = exp(-mean)
        return math.exp(-mean) * std / math.sqrt(n)
    return std / math.sqrt(n)


def task_metrics(name: str, task_result: dict[str, Any], samples: list[dict[str, Any]]) -> list[MetricValue]:
    """The reported metrics of one task, stderr and units (`units.document_units`, in document order)
    from its per-document values."""
    samples = sorted(samples, key=lambda sample: sample["doc_id"])
    metrics = []
    for metric in REPORTED_METRICS:
        key = f"{metric},none"
        if key not in task_result:
            continue
        values = [float(sample[metric]) for sample in samples]
        sums, counts = document_units(metric, values)
        stderr = metric_stderr(metric, values)
        metrics.append(MetricValue(name, metric, float(task_result[key]), stderr, len(samples), sums, counts))
    return metrics


class LmEvalSuite:
    """lm-eval tasks for one resident model: requests built and tokenized once, scored per `run()`.

    `scorer="fast"` answers log-likelihood requests with `FastScorer` (shared contexts run once)
    instead of HFLM. `metrics` picks what turns the answers into metrics: "lm_eval" (lm-eval's
    `evaluate`) or "numpy" (`pipeline.evals.fastmetrics`: the same values, for suites whose every task
    it supports, else lm-eval's); None: "numpy" with the fast scorer, "lm_eval" with HFLM.

    With `cache=True`, a fast scorer on numpy metrics keeps what it built from the tokenizer and the
    task definitions (the metric plans and every request's token ids) on disk (`evalcache`): a later
    suite with the same key loads them instead of loading the tasks, and lm-eval's task objects are
    loaded only if something asks for `task_dict`.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        names: tuple[str, ...],
        *,
        data_root: Path,
        limit: int | None,
        batch_size: int,
        scorer: str = "hflm",
        metrics: str | None = None,
        include_path: tuple[str, ...] = (),
        cache: bool = False,
    ) -> None:
        check_task_names(names, include_path)
        metrics = metrics or ("numpy" if scorer == "fast" else "lm_eval")
        if metrics not in METRICS_PATHS:
            raise ValueError(f"metrics {metrics!r} unknown; allowed: {', '.join(map(repr, METRICS_PATHS))}")
        self.names, self.limit, self.data_root, self.include_path = names, limit, data_root, include_path
        self.lm = make_scorer(scorer, model, tokenizer, batch_size)
        self._task_dict: dict[str, Any] | None = None
        self.plan: SuitePlan | None = None
        self.pairs: list[Any] | None = None  # FastScorer token ids of the plan's requests, in order
        self.cache_hit = False
        key = self._cache_key(tokenizer) if cache and metrics == "numpy" and scorer == "fast" else None
        from pipeline.evals import evalcache

        cached = evalcache.load(key)
        if cached is not None:
            self.plan, self.pairs, self.cache_hit = cached[0], cached[1], True
            return
        if metrics == "numpy":
            from pipeline.evals.fastmetrics import plan_suite

            self.plan = plan_suite(self.task_dict["tasks"], limit)
        else:
            self.load_tasks()  # now: the build, not the first job, pays for it
        if self.plan is not None and hasattr(self.lm, "score_pairs"):
            self.pairs = [self.lm.encode(*request.args[:2]) for request in self.plan.requests]
            # the cached plan holds no lm-eval Instance: a loaded suite needs only the token ids
            evalcache.store(key, (dataclasses.replace(self.plan, requests=()), self.pairs))

    def _cache_key(self, tokenizer: PreTrainedTokenizerBase) -> str | None:
        """`evalcache.suite_key` of this suite, with the FastScorer's tokenization settings."""
        from pipeline.evals.evalcache import suite_key, tokenizer_fingerprint

        hf = self.lm.hf
        tokenization = {
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": hf.max_length,
            "prefix_token_id": hf.prefix_token_id,
            "add_bos_token": hf.add_bos_token,
            "backend": str(getattr(hf, "backend", None)),
        }
        return suite_key(self.names, self.limit, self.include_path, self.data_root, tokenization)

    @property
    def task_dict(self) -> dict[str, Any]:
        """lm-eval's task objects with their requests built and tokenized (loaded on first use)."""
        return self.load_tasks()

    def load_tasks(self) -> dict[str, Any]:
        """Load lm-eval's tasks, build and tokenize their requests, unless done already."""
        if self._task_dict is None:
            self._task_dict = task_manager(self.names, self.data_root, self.include_path).load(
                list(self.names)
            )
            for task in self._task_dict["tasks"].values():
                task.build_all_requests(limit=self.limit, rank=0, world_size=1)
                for instance in task.instances:
                    if instance.request_type == "loglikelihood":
                        self.lm.pretokenize(*instance.args[:2])
                _reuse_requests(task)
        return self._task_dict

    def run(self) -> list[MetricValue]:
        """Score every task with the model as it is now."""
        if self.plan is not None:
            from pipeline.evals.fastmetrics import answer_metrics, score_suite

            if self.pairs is not None:
                return answer_metrics(self.plan.tasks, self.lm.score_pairs(self.pairs))
            return score_suite(self.plan, self.lm)
        from lm_eval.evaluator import evaluate

        task_dict = self.task_dict
        results = evaluate(
            self.lm, task_dict, limit=self.limit, bootstrap_iters=0, log_samples=True, write_out=False
        )
        metrics = []
        for name in task_dict["tasks"]:
            metrics += task_metrics(name, results["results"][name], results["samples"][name])
        return metrics
