"""Pre-flight: every bad value of every cell, in one message, before results/, a ladder or Ray is touched.

`preflight(cells)` checks each distinct quant, model and eval part once (a recipe field by field; a
model's dtype, files and causal-LM architecture; a ladder's data when it must be trained; an eval's
data files), calibration sources, recovery settings and training text, perplexity windows against
the model's positions, each study's name and results folder, and the run-wide Ray settings, and
raises one `ConfigError` listing all:
- `results_problems`: a results folder that is a file, or that cannot be written;
- `ray_problems`: Ray settings out of range, and an address nothing answers at. Ray itself retries
  an unreachable cluster for tens of seconds to minutes (a closed port: 40 s per attempt); one TCP
  connect with `RAY_PROBE_TIMEOUT_S` says the same in seconds. A listener that is not Ray is
  still found by Ray itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.calibration import CalibrationSpec
from pipeline.compact import compact_problems
from pipeline.config import (
    Config,
    RayConfig,
    eval_spec,
    model_ref,
    project_path,
    recipe,
    recover_spec,
    to_spec,
)
from pipeline.memplan import JobLoad
from pipeline.recipe import BASELINE_BITS
from pipeline.sweep import ConfigError

log = logging.getLogger(__name__)

RAY_PROBE_TIMEOUT_S = 5.0
AT_LEAST_ONE: tuple[str, ...] = ("workers_per_gpu", "gpus_per_worker", "cpus_per_worker", "max_attempts")
AT_LEAST_ONE += ("in_flight_per_worker",)
GCS_PORT, CLIENT_PORT = 6379, 10001  # Ray's default ports: the head's GCS, the Ray Client server


def preflight(cells: Sequence[Config]) -> None:
    """Check every distinct quant, model, eval and run setting; raise one ConfigError listing all."""
    # ladders train from the first cell's data root (`plan_cells`); a dry run trains nothing
    train_root = None if cells[0].dry_run else project_path(cells[0].eval.data_root)
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
                _check_part(kind, cell, train_root)
            except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
                problems[f"{_describe(kind, part)}: {error_message(err)}"] = None
        calibrated = f"cal:{cell.model.name_or_path}:{id(cell.quant)}:{id(cell.eval)}"
        if cell.quant.calibration.source is not None and calibrated not in seen:
            seen.add(calibrated)
            problems.update(dict.fromkeys(_check_calibration(cell)))
        recovered = f"recover:{cell.model.name_or_path}:{id(cell.recover)}:{id(cell.eval)}"
        if recovered not in seen:
            seen.add(recovered)
            problems.update(dict.fromkeys(_check_recover(cell)))
        pair = f"fit:{cell.model.name_or_path}:{id(cell.eval)}"
        if pair not in seen:
            seen.add(pair)
            problems.update(dict.fromkeys(_check_context_fits(cell)))
        if f"study:{cell.study}" not in seen:
            seen.add(f"study:{cell.study}")
            problems.update(dict.fromkeys(_check_study(cell)))
    problems.update(dict.fromkeys(ray_problems(cells[0].ray)))  # run-wide (`RUN_WIDE`): one value
    problems.update(dict.fromkeys(compact_problems(cells[0].compact)))
    problems.update(dict.fromkeys(memory_problems(cells, driver_gpu_capacity(cells[0].ray))))
    if problems:
        raise ConfigError(list(problems))


def driver_gpu_capacity(ray: RayConfig) -> tuple[int, ...]:
    """Bytes per GPU a worker will have: this machine's GPUs for a local cluster (total memory: no CUDA
    context is created here); () for a remote cluster, whose GPUs the driver cannot see."""
    from pipeline.memplan import gpu_capacity

    return gpu_capacity() if ray.address is None and ray.num_gpus != 0 else ()


def memory_problems(cells: Sequence[Config], capacity: Sequence[int]) -> list[str]:
    """The memory plan of each distinct (model, job load) against `capacity` (logged as a table); a
    message naming what to change for each that cannot fit (nothing is enforced without a capacity)."""
    from pipeline.memplan import check_snapshot, fit_problem, model_shape, plan_memory

    n_gpus = cells[0].ray.gpus_per_worker
    problems: list[str] = []
    seen: set[Any] = set()
    for cell in cells:
        model, load = cell.model, _cell_load(cell)
        key = (model.name_or_path, model.torch_dtype, model.snapshot, load)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_snapshot(model.snapshot)
        except ValueError as err:
            problems.append(str(err))
            continue
        if n_gpus < 1:  # reported by `ray_problems`
            continue
        shape = model_shape(model.name_or_path, model.torch_dtype, bool(capacity))
        if shape is None:  # a ladder not trained yet, or a model the model check refuses
            continue
        plan = plan_memory(shape, load, snapshot=model.snapshot, n_gpus=n_gpus, gpu_capacity=capacity)
        log.info("%s", plan.table(model.name_or_path))
        problem = fit_problem(plan, shape, load, f"model {model.name_or_path!r}")
        problems.extend([problem] if problem else [])
    return problems


def _cell_load(cell: Config) -> JobLoad:
    """The `JobLoad` of a cell (as `memplan.job_load` of its jobs)."""
    from pipeline.memplan import TASK_SEQ_LEN

    evals, rec = cell.eval, cell.recover
    seq_len = max([p.context_length for p in evals.perplexity] + ([TASK_SEQ_LEN] if evals.tasks else [1]))
    on = rec.method != "none" and cell.quant.bits != BASELINE_BITS
    tokens = rec.batch_size * rec.seq_len if on else 0
    return JobLoad(evals.batch_size, seq_len, cell.quant.method, rec.rank if on else 0, tokens)


def _check_part(kind: str, cell: Config, train_root: Path | None) -> None:
    """Raise ValueError/KeyError/FileNotFoundError naming what is wrong with `cell`'s `kind` part.

    A ladder that must be trained (`train_root` set) needs the corpus under that data root.
    """
    from pipeline.evals.evaluate import check_eval_spec
    from pipeline.ladders.ladder import check_ladder_data, is_ladder_ref, parse_ladder_ref
    from pipeline.models import check_model_ref
    from pipeline.models.loading import check_torch_dtype

    if kind == "quant":
        _check_quant(cell)
    elif kind == "model" and is_ladder_ref(cell.model.name_or_path):
        parse_ladder_ref(cell.model.name_or_path)
        check_torch_dtype(cell.model.torch_dtype)
        if train_root is not None:
            check_ladder_data(cell.model.name_or_path, train_root)
    elif kind == "model":
        check_model_ref(model_ref(cell.model))
    elif kind == "eval":
        check_eval_spec(eval_spec(cell.eval))


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
    from pipeline.methods import METHODS

    if quant.method in METHODS:  # beside codes the method takes (bcq's are not int4)
        known.update(method=quant.method, **METHODS[quant.method].typical_codes())
    # the fields alone are checked with a calibration source; the last two probes check the real one
    source = dataclasses.replace(quant.calibration, source=quant.calibration.source or "corpus:train")
    probes = [  # each field alone next to known-good values, then the whole recipe
        *(
            dataclasses.replace(quant, **_except(known, name), params={}, calibration=source)
            for name in known
        ),
        dataclasses.replace(quant, **_except(known, "method")),  # the method's own parameters
        quant,
    ]
    for probe in probes:
        try:
            recipe(probe)
        except (ValueError, KeyError, TypeError) as err:
            messages[error_message(err)] = None
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
    needed = METHODS[cell.quant.method].needs_calibration or cell.quant.allocation != "uniform"
    problems = check_calibration(spec, project_path(cell.eval.data_root), texts, needed)
    try:
        resolve_seq_len(spec, max_positions(cell.model.name_or_path))
    except ValueError as err:
        problems.append(f"quant.calibration: {err}")
    return problems


def _check_recover(cell: Config) -> list[str]:
    """Recovery settings out of range, and training text that is an evaluation text, missing, or in
    longer windows than the model takes (a 16-bit baseline trains nothing: not checked)."""
    from pipeline.models import max_positions
    from pipeline.recovery import check_recover

    if cell.recover.method == "none" or cell.quant.bits == BASELINE_BITS:
        return []
    try:
        spec = recover_spec(cell.recover)
    except (ValueError, TypeError) as err:
        return [str(err)]
    texts = [p.path for p in cell.eval.perplexity]
    positions = max_positions(cell.model.name_or_path)
    mixed = []
    if spec.sparsity and cell.quant.allocation != "uniform":  # the sparse bit count needs one k
        allocation = cell.quant.allocation
        mixed = [f"recover.sparsity={spec.sparsity} needs quant.allocation='uniform', got {allocation!r}"]
    return mixed + check_recover(spec, project_path(cell.eval.data_root), texts, positions)


def _check_study(cell: Config) -> list[str]:
    """The study's name, and its results folder (`results_problems`)."""
    if not cell.study or any(c in cell.study for c in "/\\") or cell.study.startswith("."):
        return [f"study={cell.study!r}: use a plain folder name (no '/', not starting with '.')"]
    return results_problems(project_path(cell.results_root), cell.study, cell.dry_run)


def _describe(kind: str, part: object) -> str:
    fields = getattr(part, "__dataclass_fields__", {})
    shown = ", ".join(f"{k}={getattr(part, k)!r}" for k in fields if k not in ("perplexity",))
    return f"{kind}({shown})"


def error_message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def results_problems(root: Path, study: str, dry_run: bool) -> list[str]:
    """A message if `root/study` cannot be a writable folder (a dry run only reads it)."""
    folder = root / study
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"results_root={str(root)!r}: {str(existing)!r} is a file, not a folder"]
    if not dry_run and not os.access(existing, os.W_OK | os.X_OK):
        return [f"results_root={str(root)!r}: {str(existing)!r} is not writable"]
    return []


def ray_problems(ray: RayConfig) -> list[str]:
    """A message per Ray setting out of range, and one for an address nothing answers at."""
    problems = []
    for name in AT_LEAST_ONE:
        if getattr(ray, name) < 1:
            problems.append(f"ray.{name}={getattr(ray, name)}: must be >= 1")
    for name, least in (("num_cpus", 1), ("num_gpus", 0), ("max_workers", 1)):
        value = getattr(ray, name)
        if value is not None and value < least:
            problems.append(f"ray.{name}={value}: must be >= {least}, or null (Ray decides)")
    if ray.gpus_per_worker > 1 and ray.workers_per_gpu > 1:
        problems.append(
            f"ray.gpus_per_worker={ray.gpus_per_worker} with ray.workers_per_gpu={ray.workers_per_gpu}: a "
            "worker spans several GPUs or shares one, not both; set one of them to 1"
        )
    if ray.gpus_per_worker > 1 and ray.num_gpus is not None and ray.num_gpus < ray.gpus_per_worker:
        problems.append(
            f"ray.gpus_per_worker={ray.gpus_per_worker} but ray.num_gpus={ray.num_gpus}: a worker needs "
            "that many GPUs of one node; lower gpus_per_worker or raise num_gpus"
        )
    if ray.keep_workers and ray.address is None:
        problems.append(
            "ray.keep_workers=true needs a Ray cluster that outlives the command: start one with "
            "`ray start --head` and add ray=cluster (ray.address=auto)"
        )
    problem = address_problem(ray.address)
    return problems + ([problem] if problem else [])


def address_problem(address: str | None, timeout_s: float = RAY_PROBE_TIMEOUT_S) -> str | None:
    """Why nothing answers at a Ray address (`host:port`, `ray://host:port`, or `auto`: `RAY_ADDRESS`
    or the cluster `ray start` recorded on this machine); None when it answers or nothing is known."""
    if address is None or address == "local":
        return None
    target = (os.environ.get("RAY_ADDRESS") or _recorded_cluster()) if address == "auto" else address
    if not target:
        return None  # Ray reports "no running instance" itself, at once
    host, port = _host_port(target)
    if not host:
        return f"ray.address={address}: give host:port, ray://host:port, auto, or null (a local cluster)"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        return (
            f"ray.address={address}: no Ray cluster answers at {host}:{port} ({reason}, {timeout_s:g} s "
            "probe); start it (ray start --head) or leave ray.address unset for a local cluster"
        )


def _host_port(address: str) -> tuple[str, int]:
    url = urlparse(address if "://" in address else f"//{address}")
    try:
        port = url.port
    except ValueError:
        return "", 0
    return url.hostname or "", port or (CLIENT_PORT if url.scheme == "ray" else GCS_PORT)


def _recorded_cluster() -> str | None:
    """The address `ray start` wrote to `<temp>/ray/ray_current_cluster`, if any."""
    folder = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
    try:
        return (folder / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None
