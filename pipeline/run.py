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

import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.calibration import CalibrationSpec
from pipeline.config import (
    Config,
    RayConfig,
    eval_spec,
    import_plugins,
    model_ref,
    project_path,
    recipe,
    run_wide_problems,
    to_spec,
)
from pipeline.jobs import Job, ModelSource, build_jobs, group_by_model, split_by_study
from pipeline.ladders.configs import LADDER_PREFIX
from pipeline.progress import Progress
from pipeline.recipe import BASELINE_BITS
from pipeline.results import STATUS_OK, job_status
from pipeline.specs import ModelRef
from pipeline.sweep import ConfigError, expand, plan_sweep

log = logging.getLogger(__name__)

DEFAULT_ARGV = ("-m", "+sweep=demo")
USAGE = __doc__ or ""


@dataclass(frozen=True)
class Settings:
    """The run-wide part of the config (`config.RUN_WIDE`: one value for every cell)."""

    results_root: Path
    rerun_failed: bool
    dry_run: bool
    ray: RayConfig
    report: bool = False
    plugins: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What a run will do: every job, and those still to run."""

    n_cells: int
    jobs: tuple[Job, ...]
    to_run: tuple[Job, ...]
    skipped: int  # jobs with an ok result already
    settings: Settings


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


def preflight(cells: Sequence[Config]) -> None:
    """Check every distinct quant, model, eval and run setting; raise one ConfigError listing all."""
    from pipeline.evals.evaluate import check_eval_spec
    from pipeline.ladders.ladder import is_ladder_ref, parse_ladder_ref
    from pipeline.models import check_model_ref

    problems: dict[str, None] = {}  # ordered set
    seen: set[str] = set()
    seen_ids: set[int] = set()  # cells share sub-configs; `cells` keeps them alive, so ids are stable
    for cell in cells:
        for kind, part in (("quant", cell.quant), ("model", cell.model), ("eval", cell.eval)):
            if id(part) in seen_ids:
                continue
            seen_ids.add(id(part))
            text = f"{kind}:{part!r}"
            if text in seen:
                continue
            seen.add(text)
            try:
                if kind == "quant":
                    _check_quant(cell)
                elif kind == "model" and is_ladder_ref(cell.model.name_or_path):
                    parse_ladder_ref(cell.model.name_or_path)
                elif kind == "model":
                    check_model_ref(model_ref(cell.model))
                elif kind == "eval":
                    check_eval_spec(eval_spec(cell.eval))
            except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
                problems[f"{_describe(kind, part)}: {_message(err)}"] = None
        calibrated = f"cal:{cell.model.name_or_path}:{id(cell.quant)}:{id(cell.eval)}"
        if cell.quant.calibration.source is not None and calibrated not in seen:
            seen.add(calibrated)
            problems.update(dict.fromkeys(_check_calibration(cell)))
        pair = f"fit:{cell.model.name_or_path}:{id(cell.eval)}"
        if pair not in seen:
            seen.add(pair)
            problems.update(dict.fromkeys(_check_context_fits(cell)))
        if id(cell.ray) not in seen_ids or cell.study not in seen:
            seen_ids.add(id(cell.ray))
            seen.add(cell.study)
            problems.update(dict.fromkeys(_check_run(cell)))
    if problems:
        raise ConfigError(list(problems))


def _check_quant(cell: Config) -> None:
    """Raise one ValueError naming every bad quant field (`Recipe` stops at the first)."""
    quant = cell.quant
    messages: dict[str, None] = {}
    known: dict[str, Any] = {
        "method": "rtn",
        "dtype": "int",
        "bits": 4,
        "block_size": 64,
        "exponent_bits": None,
    }
    probes = [  # each field alone next to known-good values, then the whole recipe
        *(dataclasses.replace(quant, **_except(known, name), params={}) for name in known),
        dataclasses.replace(quant, **_except(known, "method")),  # the method's own parameters
        quant,
    ]
    for probe in probes:
        try:
            recipe(probe)
        except (ValueError, KeyError, TypeError) as err:
            messages[_message(err)] = None
    if messages:
        raise ValueError("; ".join(messages))


def _except(values: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k != key}


def _check_context_fits(cell: Config) -> list[str]:
    """Perplexity windows longer than the model's positions, and a scorer that cannot score the model
    (both known without loading it, else skipped)."""
    from pipeline.evals.evaluate import context_problems, scorer_problems
    from pipeline.models import local_config, max_positions

    name = cell.model.name_or_path
    model_type = (local_config(name) or {}).get("model_type")
    return [
        f"eval {problem}" for problem in context_problems(cell.eval.perplexity, name, max_positions(name))
    ] + scorer_problems(cell.eval.scorer, bool(cell.eval.tasks), name, model_type)


def _check_calibration(cell: Config) -> list[str]:
    """Calibration text that is an evaluation text, missing, or longer windows than the model takes."""
    from pipeline.calibration import check_calibration, resolve_seq_len
    from pipeline.methods import METHODS
    from pipeline.models import max_positions

    if cell.quant.method not in METHODS or cell.quant.bits == BASELINE_BITS:
        return []  # reported by the quant check; the baseline calibrates nothing
    spec = to_spec(cell.quant.calibration, CalibrationSpec)
    texts = [p.path for p in cell.eval.perplexity]
    needed = METHODS[cell.quant.method].needs_calibration
    problems = check_calibration(spec, project_path(cell.eval.data_root), texts, needed)
    try:
        resolve_seq_len(spec, max_positions(cell.model.name_or_path))
    except ValueError as err:
        problems.append(f"quant.calibration: {err}")
    return problems


def _check_run(cell: Config) -> list[str]:
    problems = []
    if not cell.study or any(c in cell.study for c in "/\\") or cell.study.startswith("."):
        problems.append(f"study={cell.study!r}: use a plain folder name (no '/', not starting with '.')")
    ray = cell.ray
    for name in ("workers_per_gpu", "cpus_per_worker", "max_attempts", "in_flight_per_worker"):
        if getattr(ray, name) < 1:
            problems.append(f"ray.{name}={getattr(ray, name)}: must be >= 1")
    return problems


def _describe(kind: str, part: object) -> str:
    fields = getattr(part, "__dataclass_fields__", {})
    shown = ", ".join(f"{k}={getattr(part, k)!r}" for k in fields if k not in ("perplexity",))
    return f"{kind}({shown})"


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def resolve_models(ref: ModelRef, data_root: Path, train: bool = True) -> list[ModelSource]:
    """A ladder reference -> its trained members (training on first use; with `train=False`, the
    reference itself unless every member is cached); anything else -> itself."""
    from pipeline.ladders.ladder import cached_ladder, is_ladder_ref, resolve_ladder

    if not is_ladder_ref(ref.name_or_path):
        return [ModelSource(ref=ref, label=ref.name_or_path)]
    members = resolve_ladder(ref.name_or_path, data_root) if train else cached_ladder(ref.name_or_path)
    if members is None:
        return [ModelSource(ref=ref, label=f"{ref.name_or_path} (not trained yet: counted as one model)")]
    return [
        ModelSource(
            ref=dataclasses.replace(ref, name_or_path=member.path),
            label=ladder_label(member.family, member.size_name, Path(member.path)),
            family=member.family,
        )
        for member in members
    ]


def ladder_label(family: str, size_name: str, path: Path) -> str:
    """E.g. "ladder:tiny/d32@570f1b5f": the ladder's config hash (its cache folder's suffix) keeps
    members of a retuned ladder apart from the old ones in the same study."""
    version = path.parent.name.rpartition("-")[2][:8]
    return f"{LADDER_PREFIX}{family}/{size_name}@{version}"


def plan_run(overrides: Sequence[str], multirun: bool = True) -> Plan:
    """Expand the overrides, then `plan_cells` (no job runs here).

    Raises:
        ConfigError: any bad override or value, before results/ or any ladder is touched.
    """
    return plan_cells(expand(plan_sweep(overrides, multirun)))


def plan_cells(cells: Sequence[Config]) -> Plan:
    """Check every cell, resolve ladders, build and dedupe jobs, and subtract finished ones.

    Raises:
        ConfigError: any bad value in any cell, before results/ or any ladder is touched.
    """
    start = time.perf_counter()
    first = cells[0]
    problems = run_wide_problems(cells)
    try:
        import_plugins(first.plugins)  # before pre-flight: a plugin may register the method it checks
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ConfigError(problems)
    preflight(cells)
    settings = Settings(
        project_path(first.results_root),
        first.rerun_failed,
        first.dry_run,
        first.ray,
        first.report,
        tuple(first.plugins),
    )
    data_root = project_path(first.eval.data_root)
    if settings.dry_run:  # a dry run trains nothing: ladders not trained yet stay one unresolved model
        jobs = build_jobs(cells, lambda ref: resolve_models(ref, data_root, train=False))
    else:
        try:
            jobs = build_jobs(cells, lambda ref: resolve_models(ref, data_root))
        except KeyError as err:
            raise ConfigError([f"model: {_message(err)}"]) from err
    to_run, skipped = select_jobs(jobs, settings.results_root, settings.rerun_failed)
    log.info(
        "%d cells -> %d jobs (%d models): %d to run, %d already done (planned in %.2fs)",
        len(cells), len(jobs), len(group_by_model(jobs)), len(to_run), skipped, time.perf_counter() - start,
    )  # fmt: skip
    return Plan(len(cells), tuple(jobs), tuple(to_run), skipped, settings)


def select_jobs(jobs: Sequence[Job], results_root: Path, rerun_failed: bool) -> tuple[list[Job], int]:
    """(jobs still to run, number skipped): ok jobs are skipped, failed ones unless `rerun_failed`."""
    to_run: list[Job] = []
    skipped = 0
    for study, study_jobs in split_by_study(jobs).items():
        status = job_status(results_root / study)
        for job in study_jobs:
            state = status.get(job.key)
            if state == STATUS_OK or (state is not None and not rerun_failed):
                skipped += 1
            else:
                to_run.append(job)
    return to_run, skipped


def execute(plan: Plan, worker_cls: type | None = None) -> Progress:
    """Run the plan's pending jobs on Ray; returns the final progress (counts and first errors)."""
    from pipeline.dispatch import connect, plan_workers, run_jobs, start_workers

    label = ",".join(sorted({job.study for job in plan.jobs})) or "none"
    progress = Progress(total=len(plan.to_run), skipped=plan.skipped, label=label)
    if not plan.to_run:
        return progress
    import ray

    cfg = plan.settings.ray
    started = connect(cfg)
    workers: list = []
    try:
        workers_plan = plan_workers(cfg, ray.cluster_resources(), len(plan.to_run))
        workers = start_workers(
            workers_plan, plan.settings.results_root, cfg.max_attempts, worker_cls, plan.settings.plugins
        )
        log.info("%d worker(s), each %s", len(workers), workers_plan.options)
        progress.interrupted = not run_jobs(
            plan.to_run, workers, progress, plan.settings.results_root, cfg.max_attempts,
            cfg.in_flight_per_worker,
        )  # fmt: skip
    finally:
        for actor in workers:
            ray.kill(actor)
        if started:
            ray.shutdown()
    return progress


def describe_plan(plan: Plan) -> str:
    """A short table of a plan: jobs per model and bits."""
    lines = [f"{plan.n_cells} cells -> {len(plan.jobs)} jobs; {len(plan.to_run)} to run, {plan.skipped} done"]
    for model, jobs in group_by_model(plan.jobs).items():
        bits = sorted({job.bits for job in jobs})
        lines.append(f"  {jobs[0].model_label or model.name_or_path}: {len(jobs)} jobs, bits {bits}")
    return "\n".join(lines)


def write_reports(plan: Plan) -> None:
    """The analysis report of each study of the plan (a report that fails is logged, not fatal)."""
    from analysis.report import main as report_main

    for study in sorted({job.study for job in plan.jobs}):
        if report_main([str(plan.settings.results_root / study)]) != 0:
            log.warning("the report of study %s could not be written (see above)", study)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit codes: 0 all ok, 1 some job failed, 2 bad config, 130 interrupted."""
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    try:
        multirun, show, overrides = parse_argv(args)
        if not args:
            log.info("no arguments: running the demo study (python -m pipeline.run -m +sweep=demo)")
        if show:
            from dataclasses import asdict

            from omegaconf import OmegaConf

            cells = expand(plan_sweep(overrides, multirun))
            print(OmegaConf.to_yaml(asdict(cells[0])))
            return 0
        plan = plan_run(overrides, multirun)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if plan.settings.dry_run:
        print(describe_plan(plan))
        return 0
    progress = execute(plan)
    print(progress.summary())
    if plan.settings.report and not progress.interrupted:
        write_reports(plan)
    return 130 if progress.interrupted else (1 if progress.failed else 0)


if __name__ == "__main__":
    sys.exit(main())
