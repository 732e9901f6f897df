"""Synthetic studies written as real Parquet through `pipeline.results.write_job_rows`.

Metrics follow known laws so tests can check that the analysis recovers them:
mean accuracy = a_k + b * log2(total model bits), and cross-entropy =
A * (N_u + N_q * (1 - exp(-k / gamma)))^(-alpha) + E (`analysis.effective`; N_q quantized parameters,
N_u = N - N_q, the 16-bit baseline at N_eff = N).

`Units` adds per-unit data (`unit_sums` / `unit_counts`) to the perplexity and accuracy rows: chunks
whose difficulty is shared by every job of a study (the same text), plus optional per-job noise.
`study_frame` returns a study as an in-memory results table (what `load_results` gives), with the unit
columns, whatever the Parquet schema holds.

A job's method, scope and evaluation settings (`Config.method`, `Config.evals`, ...) are written to
the result columns of the same names.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.results import COLUMNS, write_job_rows

TASK_OFFSETS = {"lambada_openai": 0.05, "piqa": 0.1, "hellaswag": -0.1, "winogrande": -0.05}  # sum 0
TEXT_SET = "wikitext2"  # the perplexity text set of every synthetic job


@dataclass(frozen=True)
class Law:
    """The true laws behind a synthetic study."""

    intercepts: Mapping[int, float] = field(
        # mean accuracies of 0.4-0.8 on the default grids: above the four tasks' chance rate (0.3125)
        default_factory=lambda: {3: -0.63, 4: -0.6, 5: -0.62, 6: -0.635, 8: -0.66, 16: -0.8}
    )
    slope: float = 0.05
    A: float = 40.0
    alpha: float = 0.3
    gamma: float = 1.5
    E: float = 1.8

    def accuracy(self, bits: int, total_bits: float) -> float:
        return self.intercepts[bits] + self.slope * math.log2(total_bits)

    def loss(self, n_params: float, bits: int, n_quantized: float | None = None) -> float:
        """The loss of `n_params` parameters, `n_quantized` of them (default all) quantized to `bits`."""
        n_q = n_params if n_quantized is None else n_quantized
        n_eff = n_params if bits >= 16 else n_params - n_q + n_q * (1 - math.exp(-bits / self.gamma))
        return self.A * n_eff ** (-self.alpha) + self.E


@dataclass(frozen=True)
class Evals:
    """How a synthetic job was evaluated: lm-eval tasks (scorer, limit) and perplexity (context, ...)."""

    scorer: str | None = None
    eval_limit: int | None = None
    context_length: int | None = None
    stride: int | None = None
    max_tokens: int | None = None

    def columns(self, task: str | None) -> dict[str, Any]:
        """The evaluation columns of one result row of `task` (perplexity fields on the text set)."""
        text = task == TEXT_SET
        return {
            "scorer": None if text else self.scorer,
            "eval_limit": None if text else self.eval_limit,
            "context_length": self.context_length if text else None,
            "stride": self.stride if text else None,
            "max_tokens": self.max_tokens if text else None,
        }


@dataclass(frozen=True)
class Config:
    """One synthetic job's model, quantization and evaluation."""

    n_params: int
    bits: int
    dtype: str = "fp"
    block_size: int | None = 64
    outlier_fraction: float = 0.0
    family: str = "toy"
    method: str = "rtn"
    method_params: str = "{}"
    quantize_embeddings: bool = False
    quantize_lm_head: bool = False
    evals: Evals = Evals()
    unquantized: int = 0  # parameters left in 16 bits (embeddings, head) when bits < 16
    train_tokens: int | None = None  # a ladder member kept at this many training tokens
    allocation: str | None = None  # a mixed job's allocation JSON (its bits: the cheapest candidate's)
    extra_bits: float = 0.0  # bits a quantized parameter above `bits` (a mixed job's costlier layers)
    recover: str = "none"  # recovery adapters trained after quantization
    adapter_bits: int = 0  # their bits, counted in total_bits

    @property
    def n_quantized(self) -> int:
        return self.n_params - self.unquantized if self.bits < 16 else 0

    @property
    def total_bits(self) -> int:
        """Quantized parameters at `bits_per_param`, the rest at 16 bits."""
        kept = 16 * (self.n_params - self.n_quantized)
        return round(self.n_quantized * self.bits_per_param + kept + self.adapter_bits)

    @property
    def bits_per_param(self) -> float:
        if self.bits >= 16:
            return 16.0
        constants = 16 / self.block_size if self.block_size else 0.0
        return self.bits + self.extra_bits + constants + self.outlier_fraction * (16 - self.bits)

    @property
    def key(self) -> str:
        defaults = ", allocation=None, extra_bits=0.0, recover='none', adapter_bits=0)"
        text = repr(self).replace(defaults, ")").replace(", train_tokens=None)", ")")  # keys as before
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def job_columns(cfg: Config, task: str | None) -> dict[str, Any]:
    """The method, scope and evaluation columns of one result row (method 'none' at 16 bits)."""
    return {
        "method": cfg.method if cfg.bits < 16 else "none",
        "method_params": cfg.method_params if cfg.bits < 16 else "{}",
        "quantize_embeddings": cfg.quantize_embeddings,
        "quantize_lm_head": cfg.quantize_lm_head,
        **cfg.evals.columns(task),
    }


def job_rows(
    cfg: Config, metrics: Iterable[tuple[str, str, float, float | None]], study: str = "synthetic"
) -> list[dict[str, Any]]:
    """Result rows of one finished job; `metrics` are (task, metric, value, stderr)."""
    head = {
        "job_key": cfg.key,
        "study": study,
        "model": f"{cfg.family}-{cfg.n_params}" + (f"@{cfg.train_tokens}" if cfg.train_tokens else ""),
        "model_family": cfg.family,
        "n_params": cfg.n_params,
        "n_quantized_params": cfg.n_quantized,
        "n_kept_params": 0,
        "dtype": cfg.dtype if cfg.bits < 16 else "none",
        "bits": cfg.bits,
        "block_size": cfg.block_size if cfg.bits < 16 else None,
        "exponent_bits": 2 if cfg.dtype == "fp" and cfg.bits < 16 else None,
        "outlier_fraction": cfg.outlier_fraction,
        "centering": False,
        "bits_per_param": cfg.bits_per_param,
        "total_model_bits": cfg.total_bits,
        "status": "ok",
        "device": "cpu",
        **({"train_tokens": cfg.train_tokens} if cfg.train_tokens is not None else {}),
        "allocation": cfg.allocation,
        "recover": cfg.recover if cfg.bits < 16 else "none",
        "adapter_bits": cfg.adapter_bits,
    }
    return [
        {**head, **job_columns(cfg, t), "task": t, "metric": m, "value": v, "stderr": s}
        for t, m, v, s in metrics
    ]


def law_metrics(
    cfg: Config, law: Law, noise: float, rng: np.random.Generator, acc_offset: float = 0.0
) -> list[tuple[str, str, float, float | None]]:
    """Accuracy on the paper's four tasks and perplexity metrics on 'wikitext2' from `law`; `acc_offset`
    raises the accuracy and lowers the loss by as much."""
    acc = law.accuracy(cfg.bits, cfg.total_bits) + acc_offset + noise * rng.standard_normal()
    nats = law.loss(cfg.n_params, cfg.bits, cfg.n_quantized) - acc_offset + noise * rng.standard_normal()
    rows: list[tuple[str, str, float, float | None]] = [
        (task, "acc", acc + offset, noise * 2 if noise else None) for task, offset in TASK_OFFSETS.items()
    ]
    rows += [
        ("wikitext2", "nats_per_token", nats, None),
        ("wikitext2", "perplexity", math.exp(nats), None),
        ("wikitext2", "bits_per_byte", nats / math.log(2) / 4.0, None),
        ("lambada_openai", "perplexity", 30.0, None),
    ]
    return rows


@dataclass(frozen=True)
class Units:
    """Per-unit data of synthetic rows: `n_units` chunks (or documents) of one text per task.

    A unit's difficulty (shared_sd, per task) is the same for every job: the text is shared, so it
    moves every configuration together. job_sd adds noise of each job on each unit (what pairing
    cannot remove). The units always reproduce the row's value exactly.
    """

    n_units: int = 100
    shared_sd: float = 0.5
    job_sd: float = 0.0
    seed: int = 0

    def columns(self, task: str, value: float, rng: np.random.Generator) -> dict[str, list[float]]:
        text = np.random.default_rng([self.seed, sum(task.encode())])
        counts = text.integers(50, 150, self.n_units).astype(float)
        per_unit = text.normal(0.0, self.shared_sd, self.n_units) + rng.normal(0.0, self.job_sd, self.n_units)
        per_unit += value - np.sum(counts * per_unit) / counts.sum()  # sum(sums) / sum(counts) == value
        return {"unit_sums": (counts * per_unit).tolist(), "unit_counts": counts.tolist()}


def with_units(rows: list[dict[str, Any]], units: Units, rng: np.random.Generator) -> list[dict[str, Any]]:
    """`rows` of one job with unit columns on accuracy and perplexity rows of the text set."""
    nats = {
        r["task"]: units.columns(str(r["task"]), float(r["value"]), rng)
        for r in rows
        if r["metric"] == "nats_per_token"
    }
    out = []
    for row in rows:
        if row["metric"] in ("nats_per_token", "perplexity") and row["task"] in nats:
            row = {**row, **nats[row["task"]]}  # perplexity = exp(the nats' ratio of sums)
        elif row["metric"] == "acc" and row["task"] not in nats:
            row = {**row, **units.columns(str(row["task"]), float(row["value"]), rng)}
        out.append(row)
    return out


def study_rows(
    configs: Iterable[Config],
    law: Law | None = None,
    noise: float = 0.0,
    seed: int = 0,
    offset: Callable[[Config], float] | None = None,
    units: Units | None = None,
) -> list[tuple[Config, list[dict[str, Any]]]]:
    """Each config with its result rows; `offset(cfg)` shifts its accuracy and its loss (its sign
    flipped: a better configuration has a higher accuracy and a lower loss)."""
    law = law or Law()
    rng = np.random.default_rng(seed)
    out = []
    for cfg in configs:
        shift = offset(cfg) if offset else 0.0
        metrics = law_metrics(cfg, law, noise, rng, shift)
        rows = job_rows(cfg, metrics)
        out.append((cfg, with_units(rows, units, rng) if units else rows))
    return out


def write_study(
    study_dir: Path,
    configs: Iterable[Config],
    law: Law | None = None,
    noise: float = 0.0,
    seed: int = 0,
    offset: Callable[[Config], float] | None = None,
    units: Units | None = None,
) -> list[Config]:
    """Write one Parquet file per config (see `study_rows`); `units` needs the schema's unit columns."""
    written = study_rows(configs, law, noise, seed, offset, units)
    for cfg, rows in written:
        write_job_rows(study_dir, cfg.key, rows)
    return [cfg for cfg, _ in written]


def study_frame(
    configs: Iterable[Config],
    law: Law | None = None,
    noise: float = 0.0,
    seed: int = 0,
    offset: Callable[[Config], float] | None = None,
    units: Units | None = None,
) -> pd.DataFrame:
    """The results table `load_results` would give for these configs, with the unit columns."""
    rows = [row for _, job in study_rows(configs, law, noise, seed, offset, units) for row in job]
    extra = ["train_tokens"] if any("train_tokens" in row for row in rows) else []
    columns = list(dict.fromkeys([*COLUMNS, "unit_sums", "unit_counts", *extra]))
    return pd.DataFrame(rows).reindex(columns=columns)


def grid(
    sizes: Iterable[int] = (2_000_000, 8_000_000, 32_000_000, 128_000_000),
    bits: Iterable[int] = (3, 4, 5, 6, 8),
    dtypes: Iterable[str] = ("fp",),
    block_sizes: Iterable[int | None] = (64,),
    outlier_fractions: Iterable[float] = (0.0,),
    family: str = "toy",
) -> list[Config]:
    """The full grid plus one 16-bit baseline per size."""
    sizes, bits = list(sizes), list(bits)
    configs = [
        Config(n, k, d, b, p, family)
        for n in sizes
        for k in bits
        for d in dtypes
        for b in block_sizes
        for p in outlier_fractions
    ]
    return configs + [Config(n, 16, family=family) for n in sizes]


def write_failed(study_dir: Path, cfg: Config, error: str = "CUDA out of memory") -> None:
    """A failed job: one row with status 'failed' and its error."""
    row = {**job_rows(cfg, [(None, None, None, None)])[0], "status": "failed", "error": error}  # type: ignore[list-item]
    write_job_rows(study_dir, cfg.key, [row])
