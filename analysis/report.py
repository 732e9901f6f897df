"""`python -m analysis.report results/<study> [--out DIR]`: figures, an HTML report and a Markdown summary.

With `analysis.parts` (whose tasks save their own figures), the one place in `analysis` that writes
files: `figures/<name>.png` and `.svg`, `report.html` (self-contained: figures embedded) and
`summary.md`, all under the output folder (default: `<results>/report`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd

from analysis.chance import at_chance_families
from analysis.errors import AnalysisError
from analysis.metrics import check_metric, default_loss, default_metric, metric_label
from analysis.parts import build_sections, save_figures
from analysis.render import Section, figure_names, render_html, render_markdown
from analysis.sections import N_BOOT, Study, shared_points
from analysis.tidy import PAPER_TASKS, acc_tasks_used, tidy_jobs
from analysis.tokens import at_largest_tokens
from pipeline.results import ResultsError, load_results

__all__ = ["build_report", "build_sections", "load_study", "main", "study_from_results", "write_report"]

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
        points=shared_points(tidy, [chosen, loss]),
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
