"""`python -m analysis.report results/<study> [--out DIR]`: figures, an HTML report and a Markdown summary.

This is the one place in `analysis` that writes files: `figures/<name>.png` and `.svg`,
`report.html` (self-contained: figures embedded) and `summary.md`, all under the output folder
(default: `<results>/report`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from analysis.answer import OPTIMALITY_TITLE, answer_section, optimality_section, optimality_table
from analysis.chance import at_chance_families
from analysis.errors import AnalysisError
from analysis.metrics import check_metric, default_loss, default_metric, metric_label
from analysis.render import Block, Section, figure_names, render_html, render_markdown
from analysis.sections import (
    METHODS_TITLE,
    N_BOOT,
    Study,
    curves_section,
    failures_section,
    fits_section,
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


def build_sections(study: Study) -> list[Section]:
    """Every section of the report, gaps stated where a part could not be produced."""
    table, reason = None, ""
    try:
        table = optimality_table(study)
    except AnalysisError as err:
        reason = str(err)
    body = [
        guarded("Study", lambda: study_section(study)),
        guarded("Scaling curves", lambda: curves_section(study)),
        guarded("Parametric fits", lambda: fits_section(study)),
        guarded(OPTIMALITY_TITLE, lambda: optimality_section(study, table))
        if table is not None
        else Section(OPTIMALITY_TITLE, (Block(gap=reason),)),
        guarded("Pareto front", lambda: pareto_section(study)),
        guarded("Data type and block size", lambda: fixed_precision_section(study)),
        *(
            [guarded("Proxy quantization at 3 and 4 bits", lambda: proxy_section(study))]
            if has_proxy(study)
            else []
        ),
        *([guarded(METHODS_TITLE, lambda: methods_section(study))] if has_methods(study) else []),
        *([guarded(TOKENS_TITLE, lambda: tokens_section(study))] if has_tokens(study) else []),
        *([guarded(BINARY_TITLE, lambda: binary_section(study))] if has_binary(study) else []),
        *([guarded(MIXED_TITLE, lambda: mixed_section(study))] if has_mixed(study) else []),
        *([guarded(RECOVERY_TITLE, lambda: recovery_section(study))] if has_recovery(study) else []),
        guarded("Failed jobs", lambda: failures_section(study)),
    ]
    return [answer_section(study, table, reason), gaps_section(body), *body]


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Save `fig` as `<stem>.png` and `<stem>.svg`; the layout is computed once, then frozen."""
    fig.draw_without_rendering()
    fig.set_layout_engine("none")  # both formats reuse the constrained layout of the first draw
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path in paths:
        fig.savefig(path, format=path.suffix[1:])
    return paths


def write_report(title: str, sections: list[Section], out_dir: Path) -> ReportFiles:
    """Save every figure as PNG and SVG, then the HTML report and the Markdown summary."""
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    pngs: dict[str, bytes] = {}
    written: list[Path] = []
    figures: dict[str, Figure] = {
        b.name: b.figure for s in sections for b in s.blocks if b.figure is not None
    }
    for name in figure_names(sections):
        written += save_figure(figures[name], fig_dir / name)
        pngs[name] = (fig_dir / f"{name}.png").read_bytes()
    html_path, md_path = out_dir / "report.html", out_dir / "summary.md"
    html_path.write_text(render_html(title, sections, pngs), encoding="utf-8")
    md_path.write_text(render_markdown(title, sections), encoding="utf-8")
    gaps = tuple(f"{s.title}: {g}" for s in sections[2:] for g in s.gaps)
    return ReportFiles(html_path, md_path, tuple(written), gaps)


def build_report(
    results: str | Path,
    out_dir: str | Path | None = None,
    metric: str | None = None,
    tasks: Sequence[str] = PAPER_TASKS,
    n_boot: int = N_BOOT,
    n_budgets: int = 12,
    fixed_bits: int | None = None,
) -> ReportFiles:
    """Analyse a results folder and write the report (see the module doc for what is written)."""
    results = Path(results)
    study = load_study(results, metric, tasks, n_boot, n_budgets, fixed_bits)
    out = (
        Path(out_dir) if out_dir is not None else (results if results.is_dir() else results.parent) / "report"
    )
    sections = build_sections(study)
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
    args = parser.parse_args(argv)
    if args.n_boot < 0 or args.budgets < 1:
        parser.error(f"--n-boot must be >= 0 and --budgets >= 1; got {args.n_boot} and {args.budgets}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 on bad input)."""
    matplotlib.use("Agg")  # figures are drawn on Agg canvases; never open a display
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        files = build_report(
            args.results, args.out, args.metric, tasks, args.n_boot, args.budgets, args.fixed_bits
        )
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
