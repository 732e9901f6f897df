"""`python -m pipeline.run [-m] [overrides...]`: the driver of a sweep.

    python -m pipeline.run                      # the demo study (tiny ladder, local Ray, results/demo/)
    python -m pipeline.run -m quant.dtype=int,fp,nf,quantile,dynamic quant.bits='range(3,9)' \\
        quant.block_size=64,1024,null model.name_or_path=<dir-or-hub-id>,<another> study=my_study
    python -m pipeline.run -m +sweep=paper model.name_or_path=...    # a named grid from sweeps/
    python -m pipeline.run -m +sweep=smoke dry_run=true              # the plan only; nothing runs

Steps: expand the overrides into cells (pipeline.sweep), check every cell before anything runs
(one message listing every bad value), resolve ladders (training them on first use), build and
dedupe jobs, skip jobs that already have an ok result file (failed ones only with
rerun_failed=true), then fan the rest out over Ray workers with progress on stderr and a summary
at the end. Re-running the same command after a crash or Ctrl-C runs only what is missing.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # answer before the heavy imports
    from pipeline.cli_help import help_text

    print(help_text())
    raise SystemExit(0)
if __name__ == "__main__":  # Ray starts now, on a guess from the arguments, while the imports below run
    from pipeline.bytecode import use_in_this_process
    from pipeline.prestart import prestart

    use_in_this_process()  # where the environment writes no bytecode, cache it under $KBIT_CACHE

    prestart(sys.argv[1:])

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import (
    Config,
    RayConfig,
    import_plugins,
    project_path,
    run_wide_problems,
)
from pipeline.jobs import Job, ModelSource, build_jobs, group_by_model, single_source, split_by_study
from pipeline.ladders.configs import LADDER_PREFIX
from pipeline.lock import StudyLocked, claim_studies
from pipeline.preflight import error_message, preflight, ray_problems, results_problems
from pipeline.progress import Progress, interrupt_signal, sigterm_interrupts
from pipeline.results import STATUS_OK, job_status
from pipeline.specs import ModelRef
from pipeline.startup import PhaseClock
from pipeline.sweep import ConfigError, expand, plan_sweep

if TYPE_CHECKING:
    from pipeline.cluster import EarlyStart

log = logging.getLogger(__name__)

DEFAULT_ARGV = ("-m", "+sweep=demo")


@dataclass(frozen=True)
class Settings:
    """The run-wide part of the config (`config.RUN_WIDE`: one value for every cell)."""

    results_root: Path
    rerun_failed: bool
    dry_run: bool
    ray: RayConfig
    report: bool = False
    plugins: tuple[str, ...] = ()
    verbose: bool = False
    compact: str = "auto"  # `pipeline.compact.COMPACT_SETTINGS`: compact each study after the sweep


@dataclass(frozen=True)
class Plan:
    """What a run will do: every job, and those still to run."""

    n_cells: int
    jobs: tuple[Job, ...]
    to_run: tuple[Job, ...]
    skipped: int  # jobs with a result already: ok, or failed (without rerun_failed)
    settings: Settings
    skipped_failed: int = 0  # of `skipped`, the jobs that failed in an earlier run


def parse_argv(argv: Sequence[str]) -> tuple[bool, bool, list[str]]:
    """(multirun, show config, overrides); no arguments at all means the demo study."""
    args = list(argv) or list(DEFAULT_ARGV)
    multirun = any(a in ("-m", "--multirun") for a in args)
    show = any(a in ("--cfg", "--config") for a in args)
    flags = {"-m", "--multirun", "--cfg", "--config"}
    unknown = [a for a in args if a.startswith("-") and a not in flags]
    if unknown:
        raise ConfigError([f"unknown option(s) {unknown}; allowed: -m/--multirun, --cfg, --help"])
    return multirun, show, [a for a in args if a not in flags]


def resolve_models(ref: ModelRef, data_root: Path, train: bool = True) -> list[ModelSource]:
    """A ladder reference -> its trained members (training on first use; with `train=False`, the
    reference itself unless every member is cached); anything else -> itself."""
    from pipeline.ladders.ladder import cached_ladder, is_ladder_ref, resolve_ladder

    if not is_ladder_ref(ref.name_or_path):
        return list(single_source(ref))  # a GGUF checkpoint labelled with its file
    members = resolve_ladder(ref.name_or_path, data_root) if train else cached_ladder(ref.name_or_path)
    if members is None:
        return [ModelSource(ref=ref, label=f"{ref.name_or_path} (not trained yet: counted as one model)")]
    return [
        ModelSource(
            ref=dataclasses.replace(ref, name_or_path=member.path),
            label=ladder_label(member.family, member.name, Path(member.path)),
            family=member.family,
        )
        for member in members
    ]


def ladder_label(family: str, size_name: str, path: Path) -> str:
    """E.g. "ladder:tiny/d32@570f1b5f" ("ladder:h100-tokens/d128@2490368@1cb7d2fa" for a kept token
    count): the ladder's config hash (its cache folder's suffix) keeps members of a retuned ladder
    apart from the old ones in the same study."""
    version = path.parent.name.rpartition("-")[2][:8]
    return f"{LADDER_PREFIX}{family}/{size_name}@{version}"


def plan_run(overrides: Sequence[str], multirun: bool = True) -> Plan:
    """Expand the overrides, then `plan_cells` (no job runs here).

    Raises:
        ConfigError: any bad override or value, before results/ or any ladder is touched.
    """
    return plan_cells(expand(plan_sweep(overrides, multirun)))


def check_cells(cells: Sequence[Config]) -> None:
    """Every check that needs no job key: run-wide settings, plugins, then pre-flight of every cell.

    Raises:
        ConfigError: any bad value in any cell, before results/ or any ladder is touched.
    """
    problems = run_wide_problems(cells)
    try:
        import_plugins(cells[0].plugins)  # before pre-flight: a plugin may register the method it checks
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ConfigError(problems)
    preflight(cells)


def plan_cells(cells: Sequence[Config], checked: bool = False) -> Plan:
    """Check every cell (unless `checked`: `check_cells` ran), resolve ladders, build and dedupe jobs,
    and subtract finished ones.

    Raises:
        ConfigError: any bad value in any cell, before results/ or any ladder is touched.
    """
    start = time.perf_counter()
    first = cells[0]
    if not checked:
        check_cells(cells)
    settings = Settings(
        project_path(first.results_root),
        first.rerun_failed,
        first.dry_run,
        first.ray,
        first.report,
        tuple(first.plugins),
        first.verbose,
        first.compact,
    )
    if settings.verbose:  # read by every worker (pipeline.evals.lmeval.verbose): set before Ray starts
        os.environ["KBIT_VERBOSE"] = "1"
    data_root = project_path(first.eval.data_root)
    if settings.dry_run:  # a dry run trains nothing: ladders not trained yet stay one unresolved model
        jobs = build_jobs(cells, lambda ref: resolve_models(ref, data_root, train=False))
    else:
        try:
            jobs = build_jobs(cells, lambda ref: resolve_models(ref, data_root))
        except KeyError as err:
            raise ConfigError([f"model: {error_message(err)}"]) from err
    to_run, n_ok, n_failed = classify_jobs(jobs, settings.results_root, settings.rerun_failed)
    log.info(
        "%d cells -> %d jobs (%d models): %d to run, %d already done%s (planned in %.2fs)",
        len(cells), len(jobs), len(group_by_model(jobs)), len(to_run), n_ok, _failed_note(n_failed),
        time.perf_counter() - start,
    )  # fmt: skip
    return Plan(len(cells), tuple(jobs), tuple(to_run), n_ok + n_failed, settings, n_failed)


def _failed_note(n_failed: int) -> str:
    if not n_failed:
        return ""
    return f", {n_failed} failed in an earlier run and skipped (rerun_failed=true runs them again)"


def select_jobs(jobs: Sequence[Job], results_root: Path, rerun_failed: bool) -> tuple[list[Job], int]:
    """(jobs still to run, number skipped): ok jobs are skipped, failed ones unless `rerun_failed`."""
    to_run, n_ok, n_failed = classify_jobs(jobs, results_root, rerun_failed)
    return to_run, n_ok + n_failed


def classify_jobs(jobs: Sequence[Job], results_root: Path, rerun_failed: bool) -> tuple[list[Job], int, int]:
    """(jobs still to run, ok jobs skipped, failed jobs skipped: all of them unless `rerun_failed`)."""
    to_run: list[Job] = []
    n_ok = n_failed = 0
    for study, study_jobs in split_by_study(jobs).items():
        status = job_status(results_root / study)
        for job in study_jobs:
            state = status.get(job.key)
            if state == STATUS_OK:
                n_ok += 1
            elif state is not None and not rerun_failed:
                n_failed += 1
            else:
                to_run.append(job)
    return to_run, n_ok, n_failed


def execute(plan: Plan, worker_cls: type | None = None, early: EarlyStart | None = None) -> Progress:
    """Run the plan's pending jobs on Ray, holding each study's lock (temp files a crash left are
    removed, jobs another driver finished meanwhile skipped); returns the final progress. SIGTERM
    and Ctrl-C end it with `progress.interrupted` set. `early`: Ray and workers started while planning
    (`start_early`), used here; the caller cancels it if nothing ran.

    Raises:
        StudyLocked: another driver runs one of the plan's studies.
    """
    from pipeline.dispatch import run_on_ray

    label = ",".join(sorted({job.study for job in plan.jobs})) or "none"
    progress = Progress(total=len(plan.to_run), skipped=plan.skipped, label=label)
    if not plan.to_run:
        return progress
    settings = plan.settings
    with sigterm_interrupts():
        try:
            with claim_studies(plan.to_run, settings.results_root) as to_run:
                progress.skipped += len(plan.to_run) - len(to_run)
                progress.total = len(to_run)
                if to_run:
                    run_on_ray(
                        to_run, settings.ray, settings.results_root, progress, worker_cls, settings.plugins,
                        early,
                    )  # fmt: skip
                compact_studies(plan, settings)
        except KeyboardInterrupt as err:
            progress.interrupt(err)
    return progress


def compact_studies(plan: Plan, settings: Settings) -> None:
    """The end-of-sweep hook: each study of the plan compacted per `settings.compact`, under the
    locks `execute` holds (`pipeline.compact.compact_after_sweep`)."""
    from pipeline.compact import compact_after_sweep

    for study in sorted({job.study for job in plan.to_run}):
        done = compact_after_sweep(settings.results_root / study, settings.compact)
        if done is not None and done.part is not None:
            log.info("study %s: compacted %d job file(s) into %s", study, done.job_files, done.part.name)


def describe_plan(plan: Plan) -> str:
    """A short table of a plan: jobs per model and bits."""
    done = plan.skipped - plan.skipped_failed
    lines = [
        f"{plan.n_cells} cells -> {len(plan.jobs)} jobs; {len(plan.to_run)} to run, {done} done"
        + _failed_note(plan.skipped_failed)
    ]
    for model, jobs in group_by_model(plan.jobs).items():
        bits = sorted({job.bits for job in jobs})
        lines.append(f"  {jobs[0].model_label or model.name_or_path}: {len(jobs)} jobs, bits {bits}")
    from pipeline.memplan import describe_jobs
    from pipeline.preflight import driver_gpu_capacity

    ray = plan.settings.ray
    return "\n".join(lines + describe_jobs(plan.jobs, ray.gpus_per_worker, driver_gpu_capacity(ray)))


def report_is_current(study_dir: Path) -> bool:
    """The study's report is newer than every result file of the study and every analysis module."""
    summary = study_dir / "report" / "summary.md"
    if not summary.is_file():
        return False
    inputs = [*study_dir.glob("*.parquet"), *Path(__file__).resolve().parents[1].glob("analysis/*.py")]
    return all(path.stat().st_mtime <= summary.stat().st_mtime for path in inputs)


def write_reports(plan: Plan) -> None:
    """The analysis report of each study of the plan, unless it is current (a report that fails is
    logged, not fatal)."""
    from analysis.report import main as report_main

    for study in sorted({job.study for job in plan.jobs}):
        folder = plan.settings.results_root / study
        if report_is_current(folder):
            log.info("report of study %s is up to date (no result or analysis file is newer): %s", study,
                     folder / "report")  # fmt: skip
        elif report_main([str(folder)]) != 0:
            log.warning("the report of study %s could not be written (see above)", study)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit codes: 0 all ok, 1 some job failed or did not run, 2 bad config, 3 the
    study is in use by another driver, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in args):
        from pipeline.cli_help import help_text

        print(help_text())
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    with sigterm_interrupts():
        try:
            return _main(args)
        except KeyboardInterrupt as err:
            signum = interrupt_signal(err)
            print(f"interrupted ({signal.Signals(signum).name}) before any job ran", file=sys.stderr)
            return 128 + signum


def start_early(cells: Sequence[Config]) -> EarlyStart | None:
    """Start an embedded Ray cluster on a background thread while the driver runs pre-flight and
    builds the jobs (model and data fingerprints, ladders, finished jobs) (`EarlyStart`); its workers
    wait for `EarlyStart.proceed`, which the driver calls once pre-flight has passed, so bad input never
    starts a worker or touches a GPU. A start already made on the driver's first line
    (`pipeline.prestart`) is adopted when it started the Ray these cells ask for, else cancelled. Not
    for a dry run, a cluster joined by address (`ray.address`), with `KBIT_EARLY_START=0`, or when a
    run-wide check (Ray settings, results folder) fails."""
    from pipeline import prestart

    guessed = prestart.take()
    first = cells[0]
    root = project_path(first.results_root)
    studies = sorted({cell.study for cell in cells})
    if (
        first.dry_run
        or first.ray.address is not None
        or os.environ.get("KBIT_EARLY_START", "1") == "0"
        or run_wide_problems(cells)
        or ray_problems(first.ray)
        or any(results_problems(root, s, False) for s in studies)
    ):
        if guessed is not None:
            guessed.cancel()
        return None
    from pipeline.cluster import EarlyStart

    if first.verbose:  # read by every worker (pipeline.evals.lmeval.verbose): set before they start
        os.environ["KBIT_VERBOSE"] = "1"
    if guessed is not None:
        if guessed.adopt(first.ray, len(cells), root, tuple(first.plugins)):
            return guessed
        guessed.cancel()
    return EarlyStart(first.ray, len(cells), root, tuple(first.plugins), workers=False)


def _main(args: list[str]) -> int:
    starts: list[EarlyStart] = []  # at most one; cancelled however the run ends
    try:
        return _run(args, starts)
    finally:
        from pipeline import prestart

        for early in [*starts, prestart.take()]:  # a start on a guess is still here if nothing took it
            if early is not None:
                early.cancel()  # a no-op once run_on_ray has taken the cluster and the workers


def _run(args: list[str], starts: list[EarlyStart]) -> int:
    clock = PhaseClock()  # the driver's start-up phases (`pipeline.startup`), from the process's start
    clock.mark("driver_imports")
    try:
        multirun, show, overrides = parse_argv(args)
        if not args:
            log.info("no arguments: running the demo study (python -m pipeline.run -m +sweep=demo)")
        cells = expand(plan_sweep(overrides, multirun))
        if show:
            from dataclasses import asdict

            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(asdict(cells[0])))
            return 0
        clock.mark("driver_config", cells=len(cells))
        early = start_early(cells)  # Ray alone, while pre-flight runs
        starts.extend([early] if early is not None else [])
        check_cells(cells)  # bad input is refused before a worker starts or a GPU is touched
        clock.mark("driver_preflight")
        if early is not None:
            early.proceed()
        plan = plan_cells(cells, checked=True)
        clock.mark("driver_plan", jobs=len(plan.to_run))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if plan.settings.dry_run:
        print(describe_plan(plan))
        return 0
    try:
        progress = execute(plan, early=early)
    except StudyLocked as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    print(progress.summary())
    if plan.skipped_failed:
        n_failed = plan.skipped_failed
        print(f"skipped {n_failed} job(s) that failed in an earlier run; rerun_failed=true runs them again")
    if plan.settings.report and not progress.interrupted:
        write_reports(plan)
    return progress.exit_code()


if __name__ == "__main__":
    sys.exit(main())
