"""The report's parts as independent tasks, and the pool of worker processes that runs them.

Every part of the report (a section, or a run of families' effective-parameter fits) is a task: a pure
function of the `Study` (seeded resampling), so the parts can run in any order, in worker
processes (`build_sections`), each saving its own figures (`save_figures`) so that no `Figure` crosses a
process boundary; `assemble` puts the results in reading order. The same report for any number of
processes (tests/analysis/test_report_parallel.py).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from analysis.answer import OPTIMALITY_TITLE, answer_section, optimality_section, optimality_table
from analysis.curves import check_sizes
from analysis.errors import AnalysisError
from analysis.fits import FitResult, join_fit_results
from analysis.render import Block, Section
from analysis.sections import (
    METHODS_TITLE,
    Study,
    curves_section,
    failures_section,
    fixed_precision_section,
    gaps_section,
    guarded,
    has_methods,
    has_proxy,
    methods_section,
    pareto_section,
    proxy_section,
    study_draws,
    study_section,
)
from analysis.sections_fits import effective_blocks, effective_fit, fit_blocks_shape
from analysis.sections_frontier import (
    BINARY_TITLE,
    MIXED_TITLE,
    RECOVERY_TITLE,
    binary_section,
    has_binary,
    has_mixed,
    has_recovery,
    mixed_section,
    recovery_section,
)
from analysis.sections_tokens import TOKENS_TITLE, has_tokens, tokens_section

log = logging.getLogger(__name__)


Task = Callable[[], object]  # a part of the report: its sections, or a fit that `assemble` makes them of
EFFECTIVE_PARTS = 8  # tasks the effective-parameter law's families are split into (the costliest part)
FITS_TITLE = "Parametric fits"


@dataclass(frozen=True)
class Failed:
    """A part of 'Parametric fits' that raised `AnalysisError` (the section becomes its gap)."""

    reason: str


def _optimality_sections(study: Study) -> list[Section]:
    """The Answer and the bit-optimality section, which share one optimality table (and the paired
    replicates it was built from)."""
    table, reason, draws = None, "", None
    try:
        study.require_tidy()
        assert study.metric is not None
        check_sizes(study.curve_points(study.metric))  # the table's first checks, before drawing
        draws = study_draws(study, study.metric)
        table = optimality_table(study, draws=draws)
    except AnalysisError as err:
        reason = str(err)
    optimality = (
        guarded(OPTIMALITY_TITLE, lambda: optimality_section(study, table, draws))
        if table is not None
        else Section(OPTIMALITY_TITLE, (Block(gap=reason),))
    )
    return [answer_section(study, table, reason), optimality]


def _attempt(build: Callable[[], object]) -> object:
    """`build()`, or `Failed` with the reason it raised `AnalysisError`."""
    try:
        return build()
    except AnalysisError as err:
        log.warning("%s: %s", FITS_TITLE, err)
        return Failed(str(err))


def _fits_tasks(study: Study) -> dict[str, Task]:
    """'Parametric fits' as independent tasks: its first part (`fit_blocks_shape`), and the
    effective-parameter law, the costliest part of the report, in up to `EFFECTIVE_PARTS` runs of
    families (`_join_fits` makes the section of them)."""
    families = sorted(study.tidy["model_family"].dropna().unique()) if study.tidy is not None else []
    n_runs = max(1, min(len(families), EFFECTIVE_PARTS))
    runs = [[str(f) for f in run] for run in np.array_split(np.array(families, dtype=object), n_runs)]
    tasks: dict[str, Task] = {
        f"fits-effective-{i}": _effective_task(study, run) for i, run in enumerate(runs)
    }
    shape = lambda: [Section(FITS_TITLE, tuple(fit_blocks_shape(study)))]  # noqa: E731
    return {**tasks, "fits-shape": lambda: _attempt(shape)}


def _effective_task(study: Study, families: list[str]) -> Task:
    return lambda: _attempt(lambda: effective_fit(study, families))


def _join_fits(study: Study, done: dict[str, object]) -> Section:
    """What `fits_section` gives: the first part's gap if it failed, else the effective law's first
    failed run's, else both parts (the effective law's runs joined in family order)."""
    runs = [done[key] for key in sorted((k for k in done if k.startswith("fits-effective-")), key=_run_index)]
    for part in (done["fits-shape"], *runs):
        if isinstance(part, Failed):
            return Section(FITS_TITLE, (Block(gap=part.reason),))
    fits = [r for r in runs if isinstance(r, FitResult)]
    law = join_fit_results(fits) if len(fits) == len(runs) else None
    shape = done["fits-shape"]
    assert isinstance(shape, list)
    try:
        return Section(FITS_TITLE, shape[0].blocks + tuple(effective_blocks(study, law)))
    except AnalysisError as err:
        return Section(FITS_TITLE, (Block(gap=str(err)),))


def _run_index(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def _guarded_task(title: str, build: Callable[[Study], Section], study: Study) -> Task:
    return lambda: [guarded(title, lambda: build(study))]


def section_tasks(study: Study) -> dict[str, Task]:
    """Every part of the report as an independent task, costliest first (the order a pool starts them)."""
    optional = [
        ("proxy", "Proxy quantization at 3 and 4 bits", has_proxy, proxy_section),
        ("methods", METHODS_TITLE, has_methods, methods_section),
        ("tokens", TOKENS_TITLE, has_tokens, tokens_section),
        ("binary", BINARY_TITLE, has_binary, binary_section),
        ("mixed", MIXED_TITLE, has_mixed, mixed_section),
        ("recovery", RECOVERY_TITLE, has_recovery, recovery_section),
    ]
    plain = [
        ("curves", "Scaling curves", curves_section),
        ("study", "Study", study_section),
        ("pareto", "Pareto front", pareto_section),
        ("fixed", "Data type and block size", fixed_precision_section),
        *[(key, title, build) for key, title, present, build in optional if present(study)],
        ("failures", "Failed jobs", failures_section),
    ]
    tasks: dict[str, Task] = {**_fits_tasks(study), "optimality": lambda: _optimality_sections(study)}
    return tasks | {key: _guarded_task(title, build, study) for key, title, build in plain}


def assemble(study: Study, done: dict[str, object]) -> list[Section]:
    """The report's sections in reading order from the tasks' results: Answer, Gaps, then the body."""

    def sections(key: str) -> list[Section]:
        found = done.get(key, [])
        assert isinstance(found, list)
        return found

    answer, optimality = sections("optimality")
    body = [*sections("study"), *sections("curves"), _join_fits(study, done), optimality]
    body += [s for key in ("pareto", "fixed", "proxy", "methods", "tokens", "binary", "mixed", "recovery")
             for s in sections(key)]  # fmt: skip
    body += sections("failures")
    return [answer, gaps_section(body), *body]


def build_sections(study: Study, processes: int = 1, fig_dir: Path | None = None) -> list[Section]:
    """Every section of the report, gaps stated where a part could not be produced.

    With `fig_dir`, each task saves its figures there as soon as it has drawn them (the blocks keep
    only the name: `Block.saved`); with `processes` > 1 (needs `fig_dir`) the tasks run in that many
    worker processes (`_pool_context`). Every task is a pure function of `study` (seeded
    resampling), so the report is the same whichever way it runs.
    """
    tasks = section_tasks(study)
    if processes > 1 and fig_dir is not None:
        level = logging.getLogger().getEffectiveLevel()  # the workers log as this process does
        with _pool_context().Pool(min(processes, len(tasks)), _start_worker, (study, fig_dir, level)) as pool:
            results = pool.map(_run_in_worker, list(tasks), chunksize=1)
        return assemble(study, dict(zip(tasks, results, strict=True)))
    done = {key: run_task(key, task, fig_dir) for key, task in tasks.items()}
    return assemble(study, done)


def _pool_context() -> mp.context.BaseContext:
    """'fork' where it is safe: the workers inherit the study, nothing is pickled. Once this process has
    imported Ray (the report a sweep writes in `pipeline.run`), a fresh single-threaded server
    ('forkserver', which has this module imported) starts them from the pickled study instead: Ray's
    threads here may hold locks that a forked child would wait on forever (a CI run hung so). 'spawn'
    where neither exists. Trade-off: at 35,000 jobs the pickled study is ~390 MB a worker (2 s to pickle;
    the whole report 154 -> 161 s, within that machine's noise: docs/benchmarks.md)."""
    methods = mp.get_all_start_methods()
    if "fork" in methods and "ray" not in sys.modules:
        return mp.get_context("fork")
    if "forkserver" not in methods:
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


_WORKER_TASKS: tuple[dict[str, Task], Path] | None = None  # set in each pool worker by `_start_worker`


def _start_worker(study: Study, fig_dir: Path, log_level: int) -> None:
    """In a pool worker: log at the parent's level (a started process has no logging set up), and build
    the tasks from the study (closures over it, so they are never pickled)."""
    global _WORKER_TASKS
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    _WORKER_TASKS = (section_tasks(study), fig_dir)
    log.info("report worker %d ready: %.1f s to build its tasks", os.getpid(), time.perf_counter() - start)


def _run_in_worker(key: str) -> object:
    """In a pool worker: run one task and save its figures (what comes back holds no `Figure`)."""
    assert _WORKER_TASKS is not None
    tasks, fig_dir = _WORKER_TASKS
    return run_task(key, tasks[key], fig_dir)


def run_task(key: str, task: Task, fig_dir: Path | None) -> object:
    """Run one task, save its figures under `fig_dir` (if given), and log how long that took."""
    start, cpu = time.perf_counter(), time.process_time()
    result = task() if fig_dir is None else save_figures(task(), fig_dir)
    log.info("report part %s: %.1f s, %.1f s CPU (process %d)", key, time.perf_counter() - start,
             time.process_time() - cpu, os.getpid())  # fmt: skip
    return result


def save_figures(result: object, fig_dir: Path) -> object:
    """Save every drawn figure of a task's sections under `fig_dir`, and drop it: the blocks become
    `saved` (any other result, a fit, is returned as it is)."""
    if not isinstance(result, list):
        return result
    fig_dir.mkdir(parents=True, exist_ok=True)
    kept = []
    for section in result:
        blocks = []
        for block in section.blocks:
            if block.figure is not None:
                save_figure(block.figure, fig_dir / block.name)
                block = replace(block, figure=None, saved=True)
            blocks.append(block)
        kept.append(replace(section, blocks=tuple(blocks)))
    return kept


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Save `fig` as `<stem>.png` and `<stem>.svg`; the layout is computed once, then frozen."""
    fig.draw_without_rendering()
    fig.set_layout_engine("none")  # both formats reuse the constrained layout of the first draw
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path in paths:
        fig.savefig(path, format=path.suffix[1:])
    return paths
