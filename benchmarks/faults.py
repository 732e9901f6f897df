"""Fault injection: a small CPU sweep through killed drivers, workers and raylets, a corrupted result
file, a crash's temp file and a second driver, rerun to completion and compared to a clean run.

    python benchmarks/faults.py                       # ~4 min on a 2-core VM
    python benchmarks/faults.py --seed 3 --out benchmarks/results/faults-cpu.json
    python benchmarks/faults.py --snapshot            # drivers run a copy of the code (edits meanwhile
                                                      # would change job keys between the runs)

Every driver is the real CLI (`python -m pipeline.run -m ...`) in its own process, on a tiny
random-weight Llama built here (the conftest recipe: BPE on the corpus, seeded weights) and a grid
of a few dozen jobs. First a clean reference run. Then the faulty run, study `faults`, where each
fault comes at a random point (a random count of finished result files, from `--seed`):
1. node_kill: kill -9 of the first driver's raylet and every worker at once (its only node lost):
   the driver must stop by itself ("no Ray node is alive", exit code 1) within 90 s;
2. driver_kill: kill -9 of the second driver mid-sweep (its Ray processes are left to die with it;
   any left after 30 s are counted and killed);
3. temp_file: a crash's half-written temp file left in the study folder;
4. corrupt_file: one finished result file truncated to half;
5. second_driver: a rival driver started on the study while the third runs (it must be refused; the
   third is paused with SIGSTOP while the rival plans, so the sweep cannot end meanwhile);
6. worker_kill: kill -9 of one `ray::ModelWorker` process;
7. raylet_kill: kill -9 of the third driver's raylet, soon after the worker kill; the driver is given
   90 s to end by itself before it is killed (workers that outlive their raylet may finish the sweep);
then the same command again until one run ends with exit code 0. The check: every job of the
reference is in the faulty study exactly once, with the same values; nothing else; no temp or lock
file left. Prints a table; writes JSON (faults injected and their outcome, jobs, rows lost, rows
doubled, values differing, seconds per phase).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STUDY = "faults"
EVAL = [
    "eval.perplexity=[{name:wikitext2,path:eval/wikitext-2-raw/wiki.test.raw,"
    "context_length:256,stride:256,max_tokens:8192}]",
    "eval.tasks=[]",
    "eval.batch_size=8",
]
GRID = ["quant.dtype=int,fp,nf", "quant.bits=3,4,5,6", "quant.block_size=32,64,null"]  # 36 jobs
BOUND_S = 900.0  # no single driver run may take longer (a hung driver is a finding, not a wait)


@dataclass
class Fault:
    kind: str
    at_files: int  # result files in the study when it was injected
    outcome: str


def build_model(path: Path) -> Path:
    """A 4-layer Llama (hidden 128, random seeded weights) with a BPE tokenizer, saved to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.config import project_path
    from pipeline.ladders.corpus import split_corpus
    from pipeline.ladders.tokenizer import train_tokenizer

    text, _ = split_corpus(project_path("../shared/data"))
    tokenizer = train_tokenizer([text[:200_000]], 512)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Driver:
    """One `python -m pipeline.run` process, its log, and the Ray processes under it."""

    def __init__(self, args: list[str], log: Path, code: Path = ROOT) -> None:
        self.log = log
        with open(log, "w") as out:
            command = [sys.executable, "-m", "pipeline.run", "-m", *args]
            self.proc = subprocess.Popen(command, cwd=code, stdout=out, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def descendants(self) -> list[Any]:
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def find(self, name: str) -> list[Any]:
        """Descendant processes whose command starts with `name` (e.g. "ray::ModelWorker", "raylet")."""
        found = []
        for proc in self.descendants():
            try:
                command = proc.cmdline()
            except Exception:  # it ended meanwhile
                continue
            if command and Path(command[0]).name.startswith(name):
                found.append(proc)
        return found

    def wait_for_files(self, study: Path, n: int) -> int:
        """Wait until the study holds `n` result files or the driver ended; the count then."""
        while self.proc.poll() is None and count_files(study) < n:
            if time.monotonic() - self.started > BOUND_S:
                break
            time.sleep(0.1)
        return count_files(study)

    def wait_for_lock(self, study: Path) -> None:
        """Wait until this driver holds the study's lock (or has ended)."""
        lock = study / ".driver.lock"
        while self.proc.poll() is None and time.monotonic() - self.started < BOUND_S:
            try:
                if json.loads(lock.read_text()).get("pid") == self.proc.pid:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)

    def kill(self) -> list[str]:
        """kill -9 the driver; its Ray processes get 30 s to die with it; the names of those left."""
        tree = self.descendants()
        self.proc.kill()
        self.proc.wait()
        deadline = time.monotonic() + 30
        while any(_running(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [p for p in tree if _running(p)]
        names = sorted(_name(p) for p in left)
        for proc in left:
            _kill(proc)
        return names

    def finish(self, timeout_s: float = BOUND_S) -> int | None:
        """The driver's exit code; None if it had to be killed after `timeout_s`."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


def _running(proc: Any) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != "zombie")
    except Exception:  # it ended meanwhile
        return False


def _kill(proc: Any) -> None:
    """kill -9 a psutil process, if it still runs."""
    with contextlib.suppress(Exception):  # it ended meanwhile
        proc.kill()


def _name(proc: Any) -> str:
    """E.g. "ray::ModelWorker" or "raylet"."""
    try:
        return Path(proc.cmdline()[0]).name.split(".")[0]
    except Exception:  # it ended meanwhile
        return "?"


def count_files(study: Path) -> int:
    return len([p for p in study.glob("*.parquet") if not p.name.startswith(".")])


def snapshot(work: Path) -> Path:
    """A copy of the code (no .git, .venv or results) beside a link to the shared data, to run drivers in."""
    code = work / "code"
    ignore = shutil.ignore_patterns(".git", ".venv", "results", "__pycache__", ".*_cache")
    shutil.copytree(ROOT, code, ignore=ignore, symlinks=True)
    if (ROOT.parent / "shared").exists() and not (work / "shared").exists():
        (work / "shared").symlink_to(ROOT.parent / "shared")  # the default data root is ../shared/data
    return code


def run_to_end(args: list[str], work: Path, tag: str, code: Path, max_runs: int = 4) -> list[int | None]:
    """The same command until a run ends with exit code 0 (at most `max_runs`); their exit codes."""
    codes: list[int | None] = []
    for i in range(max_runs):
        codes.append(Driver(args, work / f"{tag}-{i}.log", code).finish())
        if codes[-1] == 0:
            break
    return codes


def inject(args: list[str], study: Path, work: Path, code: Path, rng: random.Random) -> list[Fault]:
    """The faulty phase: the faults of the module docstring, each at a random file count."""
    n_jobs = count_files(work / "reference" / STUDY)
    step = max(2, n_jobs // 6)
    faults: list[Fault] = []
    first = Driver(args, work / "faulty-1.log", code)
    at = first.wait_for_files(study, rng.randint(1, step))
    node = first.find("raylet") + first.find("ray::ModelWorker")
    for proc in node:
        _kill(proc)
    exit_code = first.finish(timeout_s=90)
    ended = "killed after 90 s" if exit_code is None else f"driver exit code {exit_code}"
    stopped = ", stopped by itself" if "no Ray node is alive" in first.log.read_text() else ""
    faults.append(Fault("node_kill", at, f"raylet + {len(node) - 1} workers killed; {ended}{stopped}"))

    second = Driver(args, work / "faulty-2.log", code)
    at = second.wait_for_files(study, count_files(study) + rng.randint(1, step))
    left = second.kill()
    after = count_files(study)
    outcome = f"killed; {len(left)} Ray process(es) outlived it by 30 s {left}, writing {after - at} file(s)"
    faults.append(Fault("driver_kill", at, outcome))
    temp = study / f".tmp-{'0' * 64}-deadbeef.parquet"
    temp.write_bytes(b"PAR1 half a table")
    faults.append(Fault("temp_file", after, "left in the study"))
    victim = rng.choice(sorted(p for p in study.glob("*.parquet") if not p.name.startswith(".")))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    faults.append(Fault("corrupt_file", after, f"{victim.name[:12]}... truncated to half"))

    third = Driver(args, work / "faulty-3.log", code)
    at = third.wait_for_files(study, count_files(study) + rng.randint(1, step))
    third.wait_for_lock(study)
    third.proc.send_signal(signal.SIGSTOP)  # it holds the lock, paused while the rival plans (seconds)
    rival = Driver(args, work / "faulty-3-rival.log", code)
    rival_code = rival.finish()
    third.proc.send_signal(signal.SIGCONT)
    refused = "in use by another driver" in rival.log.read_text()
    faults.append(Fault("second_driver", at, f"exit code {rival_code}, {'' if refused else 'NOT '}refused"))
    at = third.wait_for_files(study, at + rng.randint(1, step))
    workers = third.find("ray::ModelWorker")
    if workers:
        _kill(rng.choice(workers))
    outcome = f"killed 1 of {len(workers)} workers" if workers else "none found (the sweep had ended)"
    faults.append(Fault("worker_kill", at, outcome))
    at = third.wait_for_files(study, at + rng.randint(0, 2))  # soon: Ray may still be restarting the worker
    raylets = third.find("raylet")
    for raylet in raylets:
        _kill(raylet)
    exit_code = third.finish(timeout_s=90)
    ended = "killed after 90 s" if exit_code is None else f"driver exit code {exit_code}"
    faults.append(Fault("raylet_kill", at, f"{len(raylets)} raylet(s) killed; {ended}"))
    return faults


def compare(reference: Path, faulty: Path) -> dict[str, Any]:
    """Rows lost, doubled, differing in value, and leftovers, of the faulty study against the reference."""
    from pipeline.results import ResultsError, load_results

    try:
        ref, got = load_results(reference), load_results(faulty)
    except ResultsError as err:
        return {"error": str(err)}
    cell = ["job_key", "task", "metric"]
    doubled = int(got.duplicated(cell).sum())
    merged = ref.merge(got.drop_duplicates(cell), on=cell, how="left", suffixes=("", "_got"))
    lost = int(merged["value_got"].isna().sum())
    found = merged.dropna(subset=["value_got"])
    diff = (found["value"] - found["value_got"]).abs()
    return {
        "jobs": int(ref.job_key.nunique()),
        "rows_reference": len(ref),
        "rows_final": len(got),
        "rows_lost": lost,
        "rows_doubled": doubled,
        "rows_extra": len(set(got.job_key) - set(ref.job_key)),
        "values_differing": int((diff > 0).sum()),
        "max_abs_value_diff": float(diff.max()) if len(diff) else 0.0,
        "failed_rows": int((got.status != "ok").sum()),
        "temp_files_left": len(list(faulty.glob(".tmp-*"))),
        "lock_left": (faulty / ".driver.lock").exists(),
    }


def table(faults: list[Fault], check: dict[str, Any], seconds: dict[str, float]) -> str:
    lines = ["| fault | at result files | outcome |", "|---|---|---|"]
    lines += [f"| {f.kind} | {f.at_files} | {f.outcome} |" for f in faults]
    lines += ["", "| check | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in {**check, **seconds}.items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="where the faults fall")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faults-cpu.json")
    parser.add_argument("--work", type=Path, default=None, help="keep logs and studies here (default: temp)")
    parser.add_argument("--snapshot", action="store_true", help="drivers run a copy of the code, made first")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="kbit-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    code = snapshot(work) if args.snapshot else ROOT
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    model = build_model(work / "model")
    seconds["build_model_s"] = round(time.perf_counter() - t, 1)

    def sweep(root: Path) -> list[str]:
        return [*EVAL, *GRID, f"model.name_or_path={model}", f"results_root={root}", f"study={STUDY}",
                "ray.num_cpus=2"]  # fmt: skip

    t = time.perf_counter()
    reference_codes = run_to_end(sweep(work / "reference"), work, "reference", code, max_runs=1)
    seconds["reference_run_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    faults = inject(sweep(work / "faulty"), work / "faulty" / STUDY, work, code, rng)
    seconds["faulty_phase_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    rerun_codes = run_to_end(sweep(work / "faulty"), work, "rerun", code)
    seconds["reruns_to_completion_s"] = round(time.perf_counter() - t, 1)
    check = compare(work / "reference" / STUDY, work / "faulty" / STUDY)
    check |= {"reference_exit_codes": reference_codes, "rerun_exit_codes": rerun_codes}
    print(table(faults, check, seconds))
    out = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
        "seed": args.seed,
        "faults_injected": len(faults),
        "faults": [asdict(f) for f in faults],
        **check,
        **seconds,
        "work": str(work),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} (logs and studies in {work})")
    ok = check.get("rows_lost") == check.get("rows_doubled") == check.get("values_differing") == 0
    return 0 if ok and rerun_codes[-1] == 0 else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
