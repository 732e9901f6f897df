"""`python -m analysis.report results/<study> [--out DIR]`: figures, an HTML report and a Markdown summary.

This is the one place in `analysis` that writes files: `figures/<name>.png` and `.svg`,
`report.html` (self-contained: figures embedded) and `summary.md`, all under the output folder
(default: `<results>/report`).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.answer import OPTIMALITY_TITLE, answer_section, optimality_section, optimality_table
from analysis.chance import at_chance_families
from analysis.errors import AnalysisError
from analysis.fits import FitResult, join_fit_results
from analysis.metrics import check_metric, default_loss, default_metric, metric_label
from analysis.render import Block, Section, figure_names, render_html, render_markdown
from analysis.sections import (
    METHODS_TITLE,
    N_BOOT,
    Study,
    curves_section,
    effective_blocks,
    effective_fit,
    failures_section,
    fit_blocks_shape,
    fixed_precision_section,
    gaps_section,
    guarded,
    has_methods,
    has_proxy,
    methods_section,
    pareto_section,
    proxy_section,
    study_section,
)
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
from analysis.tidy import PAPER_TASKS, acc_tasks_used, tidy_jobs
from analysis.tokens import at_largest_tokens
from pipeline.results import ResultsError, load_results

log = logging.getLogger(__name__)

DEFAULT_PROCESSES = min(2, os.cpu_count() or 1)  # the report's parts are few, one dominates: 2 suffice


@dataclass(frozen=True)
class ReportFiles:
    """What `build_report` wrote."""

    html: Path
    markdown: Path
    figures: tuple[Path, ...]
    gaps: tuple[str, ...]


def load_study(
    results: Path,
    metric: str | None = None,
    tasks: Sequence[str] = PAPER_TASKS,
    n_boot: int = N_BOOT,
    n_budgets: int = 12,
    fixed_bits: int | None = None,
) -> Study:
    """Read a results folder into a `Study` (raises FileNotFoundError, ResultsError, AnalysisError)."""
    raw = load_results(results)
    return study_from_results(raw, study_name(raw, results), metric, tasks, n_boot, n_budgets, fixed_bits)


def study_from_results(
    raw: pd.DataFrame,
    name: str,
    metric: str | None = None,
    tasks: Sequence[str] = PAPER_TASKS,
    n_boot: int = N_BOOT,
    n_budgets: int = 12,
    fixed_bits: int | None = None,
) -> Study:
    """A `Study` from result rows already read (raises AnalysisError for an unknown `metric`)."""
    try:
        tidy = at_largest_tokens(tidy_jobs(raw, tasks))  # one model per size: see analysis.tokens
    except AnalysisError as err:
        log.warning("%s", err)
        return Study(name, raw, None, None, None, (), n_boot, n_budgets, fixed_bits=fixed_bits)
    if metric is not None:
        check_metric(tidy, metric)
    acc_tasks = tuple(acc_tasks_used(raw, tasks))
    loss = default_loss(tidy)
    chosen, note = (metric, "") if metric is not None else headline_metric(tidy, acc_tasks, loss)
    return Study(
        name=name,
        raw=raw,
        tidy=tidy,
        metric=chosen,
        loss=loss,
        acc_tasks=acc_tasks,
        n_boot=n_boot,
        n_budgets=n_budgets,
        fixed_bits=fixed_bits,
        metric_note=note,
    )


def headline_metric(tidy: pd.DataFrame, acc_tasks: Sequence[str], loss: str | None) -> tuple[str, str]:
    """The default headline metric, and a note when accuracy was passed over: a mean accuracy that is
    not distinguishable from chance in any family gives way to the loss (where there is one)."""
    metric = default_metric(tidy)
    families = set(tidy["model_family"].dropna())
    if loss is None or loss == metric or at_chance_families(tidy, metric, acc_tasks) != families:
        return metric, ""
    note = (
        f"Headline metric: {metric_label(loss)}, not {metric_label(metric)}, which is not distinguishable "
        f"from chance in any model family (see the Answer); --metric {metric} shows it."
    )
    log.info("%s", note)
    return loss, note


def study_name(raw: pd.DataFrame, results: Path) -> str:
    """The study column's value; several studies read together are named together."""
    names = sorted(str(n) for n in raw["study"].dropna().unique())
    if not names:
        return results.name
    return ", ".join(names) if len(names) <= 3 else f"{len(names)} studies ({names[0]}, ...)"


Task = Callable[[], object]  # a part of the report: its sections, or a fit that `assemble` makes them of
EFFECTIVE_PARTS = 8  # tasks the effective-parameter law's families are split into (the costliest part)
FITS_TITLE = "Parametric fits"


@dataclass(frozen=True)
class Failed:
    """A part of 'Parametric fits' that raised `AnalysisError` (the section becomes its gap)."""

    reason: str


def _optimality_sections(study: Study) -> list[Section]:
    """The Answer and the bit-optimality section, which share one optimality table."""
    table, reason = None, ""
    try:
        table = optimality_table(study)
    except AnalysisError as err:
        reason = str(err)
    optimality = (
        guarded(OPTIMALITY_TITLE, lambda: optimality_section(study, table))
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
    only the name: `Block.saved`); with `processes` > 1 (needs `fig_dir` and the 'fork' start method)
    the tasks run in that many worker processes. Every task is a pure function of `study` (seeded
    resampling), so the report is the same whichever way it runs.
    """
    tasks = section_tasks(study)
    if processes > 1 and fig_dir is not None and "fork" in mp.get_all_start_methods():
        global _FORKED_TASKS  # the workers inherit the tasks by fork: closures over `study`, never pickled
        _FORKED_TASKS = (tasks, fig_dir)
        try:
            with mp.get_context("fork").Pool(min(processes, len(tasks))) as pool:
                results = pool.map(_run_forked, list(tasks), chunksize=1)
        finally:
            _FORKED_TASKS = None
        return assemble(study, dict(zip(tasks, results, strict=True)))
    done = {key: run_task(key, task, fig_dir) for key, task in tasks.items()}
    return assemble(study, done)


_FORKED_TASKS: tuple[dict[str, Task], Path] | None = None  # set only while a pool of forks runs them


def _run_forked(key: str) -> object:
    """In a forked worker: run one task and save its figures (what comes back holds no `Figure`)."""
    assert _FORKED_TASKS is not None
    tasks, fig_dir = _FORKED_TASKS
    return run_task(key, tasks[key], fig_dir)


def run_task(key: str, task: Task, fig_dir: Path | None) -> object:
    """Run one task, save its figures under `fig_dir` (if given), and log how long that took."""
    start = time.perf_counter()
    result = task() if fig_dir is None else save_figures(task(), fig_dir)
    log.info("report part %s: %.1f s (process %d)", key, time.perf_counter() - start, os.getpid())
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


def write_report(title: str, sections: list[Section], out_dir: Path) -> ReportFiles:
    """Save every figure not yet saved as PNG and SVG, then the HTML report and the Markdown summary."""
    fig_dir = out_dir / "figures"
    saved = save_figures(sections, fig_dir)
    assert isinstance(saved, list)
    sections = saved
    names = figure_names(sections)
    pngs = {name: (fig_dir / f"{name}.png").read_bytes() for name in names}
    written = tuple(fig_dir / f"{name}{suffix}" for name in names for suffix in (".png", ".svg"))
    html_path, md_path = out_dir / "report.html", out_dir / "summary.md"
    html_path.write_text(render_html(title, sections, pngs), encoding="utf-8")
    md_path.write_text(render_markdown(title, sections), encoding="utf-8")
    gaps = tuple(f"{s.title}: {g}" for s in sections[2:] for g in s.gaps)
    return ReportFiles(html_path, md_path, written, gaps)


def build_report(
    results: str | Path,
    out_dir: str | Path | None = None,
    metric: str | None = None,
    tasks: Sequence[str] = PAPER_TASKS,
    n_boot: int = N_BOOT,
    n_budgets: int = 12,
    fixed_bits: int | None = None,
    processes: int = 1,
) -> ReportFiles:
    """Analyse a results folder and write the report (see the module doc for what is written); the
    report's parts run in `processes` worker processes (the same report for any number)."""
    results = Path(results)
    study = load_study(results, metric, tasks, n_boot, n_budgets, fixed_bits)
    out = (
        Path(out_dir) if out_dir is not None else (results if results.is_dir() else results.parent) / "report"
    )
    sections = build_sections(study, processes, out / "figures")
    return write_report(f"kbitscale report: {study.name}", sections, out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kbitscale-report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a study's results folder, e.g. results/<study>")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <results>/report)")
    parser.add_argument(
        "--metric",
        default=None,
        help="headline metric column, e.g. mean_acc, ce_wikitext2 or ppl_wikitext2@ctx128s128 (a variant)",
    )
    parser.add_argument(
        "--tasks", default=",".join(PAPER_TASKS), help="comma-separated tasks for mean accuracy"
    )
    parser.add_argument("--n-boot", type=int, default=N_BOOT, help=f"bootstrap replicates (default {N_BOOT})")
    parser.add_argument("--budgets", type=int, default=12, help="memory budgets per family (default 12)")
    parser.add_argument(
        "--fixed-bits", type=int, default=None, help="precision of the dtype x block size table"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=DEFAULT_PROCESSES,
        help=f"worker processes for the report's parts (default {DEFAULT_PROCESSES}; 1: none)",
    )
    args = parser.parse_args(argv)
    if args.n_boot < 0 or args.budgets < 1 or args.processes < 1:
        parser.error(
            f"--n-boot must be >= 0, --budgets >= 1 and --processes >= 1; "
            f"got {args.n_boot}, {args.budgets} and {args.processes}"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 on bad input)."""
    matplotlib.use("Agg")  # figures are drawn on Agg canvases; never open a display
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        files = build_report(
            args.results, args.out, args.metric, tasks, args.n_boot, args.budgets, args.fixed_bits,
            args.processes,
        )  # fmt: skip
    except (FileNotFoundError, ResultsError, AnalysisError) as err:
        print(f"kbitscale-report: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {files.html}\nwrote {files.markdown}\nwrote {len(files.figures)} figure files under "
          f"{files.html.parent / 'figures'}")  # fmt: skip
    for gap in files.gaps:
        print(f"gap: {gap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
