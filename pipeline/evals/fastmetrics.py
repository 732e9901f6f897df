"""lm-eval's metrics for plain log-likelihood tasks, computed straight from the answers with numpy.

lm-eval's `evaluate` spends most of a small model's job outside the forward passes: per request it
applies filters, per document it rebuilds the choices and calls `process_results`, and it logs every
sample. For tasks whose metrics are only `acc`, `acc_norm` and `perplexity` over `loglikelihood` or
`multiple_choice` requests with the default filter (the offline tasks in pipeline/tasks), everything
but the log-likelihoods is the same on every run, so `plan_suite` reads it once: the requests in the
order `evaluate` sends them, per document the request of each choice, the gold index and each
choice's length in characters (lm-eval's `acc_norm` divides by `len(choice)`). `score_suite` then
asks the LM for the log-likelihoods and repeats lm-eval's arithmetic on them: per document
`argmax(lls)` and `argmax(lls / lengths)` (float64, first maximum, as `np.argmax` per document), the
same per-document values (floats 1.0/0.0 for choices, `int(is_greedy)` and the log-likelihood for
`loglikelihood` tasks) and the task's own aggregation functions over them, so the values are
identical to lm-eval's, not merely close.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.evals.lmeval import REPORTED_METRICS, metric_stderr
from pipeline.evals.units import document_units
from pipeline.specs import MetricValue

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance
    from lm_eval.api.task import Task

log = logging.getLogger(__name__)

METRICS_BY_OUTPUT = {"loglikelihood": {"acc", "perplexity"}, "multiple_choice": {"acc", "acc_norm"}}


@dataclass(frozen=True)
class TaskPlan:
    """What one task's metrics need besides the log-likelihoods, read once."""

    name: str
    output_type: str  # "loglikelihood" or "multiple_choice"
    metrics: tuple[str, ...]  # reported metrics, in REPORTED_METRICS order
    aggregations: dict[str, Callable[[list[Any]], float]]  # the task's own, e.g. lm-eval's `mean`
    slots: np.ndarray  # [docs, choices] index into the suite's requests; -1 past a document's choices
    gold: np.ndarray  # [docs] gold choice index (-100 when lm-eval finds none)
    choice_chars: np.ndarray  # [docs, choices] float64 len(choice); 1.0 past a document's choices


@dataclass(frozen=True)
class SuitePlan:
    """The suite's requests in `evaluate`'s order, and one plan per task."""

    requests: tuple[Instance, ...]
    tasks: tuple[TaskPlan, ...]


def unsupported_reason(task: Task) -> str | None:
    """Why lm-eval's `evaluate` must score this task (None: `score_suite` gives its exact metrics)."""
    output = getattr(task, "OUTPUT_TYPE", None)
    metrics = set(getattr(task, "_metric_fn_list", {}))
    config = task.config
    if output not in METRICS_BY_OUTPUT:
        return f"output_type {output!r}"
    if not metrics or not metrics <= METRICS_BY_OUTPUT[output]:
        return f"metrics {sorted(metrics)}"
    if callable(config.process_results) or config.filter_list is not None:
        return "a custom process_results or filter"
    if getattr(task, "multiple_target", 0):
        return "several gold targets"
    if any(i.request_type != "loglikelihood" or i.repeats != 1 for i in task.instances):
        return "requests other than single loglikelihood ones"
    return None


def gold_index(task: Task, doc: dict[str, Any], choices: Sequence[str]) -> int | None:
    """The gold choice as lm-eval's `process_results` finds it (-100: out of range; None: not an int/str)."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, bool) or not isinstance(gold, int | str):
        return None
    if isinstance(gold, str):
        return choices.index(gold) if gold in choices else -100
    return gold if gold < len(choices) else -100


def plan_task(name: str, task: Task, limit: int | None, position: dict[int, int]) -> TaskPlan | None:
    """The task's plan; `position` maps id(instance) to its index in the suite's requests."""
    from lm_eval.evaluator_utils import get_sample_size

    by_doc: dict[int, list[Instance]] = defaultdict(list)
    for instance in task.instances:
        by_doc[instance.doc_id].append(instance)
    docs = list(task.doc_iterator(rank=0, limit=get_sample_size(task, limit), world_size=1))
    width = max(len(by_doc[doc_id]) for doc_id, _ in docs)
    slots = np.full((len(docs), width), -1, dtype=np.int64)
    chars = np.ones((len(docs), width), dtype=np.float64)
    gold = np.zeros(len(docs), dtype=np.int64)
    for row, (doc_id, doc) in enumerate(docs):
        instances = sorted(by_doc[doc_id], key=lambda i: i.idx)
        slots[row, : len(instances)] = [position[id(i)] for i in instances]
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            index = gold_index(task, doc, choices)
            if index is None or len(choices) != len(instances):
                return None
            gold[row] = index
            chars[row, : len(choices)] = [float(len(c)) for c in choices]
    return TaskPlan(
        name=name,
        output_type=task.OUTPUT_TYPE,
        metrics=tuple(m for m in REPORTED_METRICS if m in task._metric_fn_list),
        aggregations=task.aggregation(),
        slots=slots,
        gold=gold,
        choice_chars=chars,
    )


def plan_suite(tasks: dict[str, Task], limit: int | None) -> SuitePlan | None:
    """The plan of every task (requests already built), or None if lm-eval must score any of them."""
    requests = tuple(instance for task in tasks.values() for instance in task.instances)
    position = {id(instance): index for index, instance in enumerate(requests)}
    plans = []
    for name, task in tasks.items():
        reason = unsupported_reason(task)
        plan = None if reason else plan_task(name, task, limit, position)
        if plan is None:
            log.info("task %s: %s; lm-eval's evaluate scores the suite", name, reason or "its choices")
            return None
        plans.append(plan)
    return SuitePlan(requests, tuple(plans))


def document_values(plan: TaskPlan, lls: np.ndarray, greedy: np.ndarray) -> dict[str, list[Any]]:
    """Per metric, the per-document values lm-eval's `process_results` gives."""
    if plan.output_type == "loglikelihood":
        index = plan.slots[:, 0]
        values = {"perplexity": lls[index].tolist(), "acc": greedy[index].astype(int).tolist()}
    else:
        choice_lls = np.where(plan.slots >= 0, lls[plan.slots], -np.inf)  # padding never wins
        pred = choice_lls.argmax(1)
        pred_norm = (choice_lls / plan.choice_chars).argmax(1)
        values = {
            "acc": np.where(pred == plan.gold, 1.0, 0.0).tolist(),
            "acc_norm": np.where(pred_norm == plan.gold, 1.0, 0.0).tolist(),
        }
    return {metric: values[metric] for metric in plan.metrics}


def task_metric_values(plan: TaskPlan, lls: np.ndarray, greedy: np.ndarray) -> list[MetricValue]:
    """One task's reported metrics: the task's aggregations, stderr and per-document units as
    `LmEvalSuite` reports them."""
    out = []
    for metric, values in document_values(plan, lls, greedy).items():
        value = float(plan.aggregations[metric](values))
        floats = [float(v) for v in values]
        sums, counts = document_units(metric, floats)
        stderr = metric_stderr(metric, floats)
        out.append(MetricValue(plan.name, metric, value, stderr, len(values), sums, counts))
    return out


def score_suite(plan: SuitePlan, lm: Any) -> list[MetricValue]:
    """Ask `lm` for every request's log-likelihood at once, as `evaluate` does, and compute the metrics."""
    return answer_metrics(plan.tasks, lm.loglikelihood(list(plan.requests)))


def answer_metrics(tasks: Sequence[TaskPlan], answers: Sequence[tuple[float, bool]]) -> list[MetricValue]:
    """Every task's metrics from the (log-likelihood, is greedy) answers to the suite's requests, in
    the suite's request order (what `score_suite` asks for, or `FastScorer.score_pairs` on the same
    requests' token ids, as a cached suite holds them)."""
    lls = np.fromiter((ll for ll, _ in answers), dtype=np.float64, count=len(answers))
    greedy = np.fromiter((bool(g) for _, g in answers), dtype=bool, count=len(answers))
    return [m for task in tasks for m in task_metric_values(task, lls, greedy)]
