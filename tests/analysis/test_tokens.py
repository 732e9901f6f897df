"""The training-token axis: ΔqLoss pairing, the Ouyang and Kumar fits, gaps, and the report section."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.render import render_markdown
from analysis.report import build_sections, study_from_results, write_report
from analysis.tidy import tidy_jobs
from analysis.tokens import (
    at_largest_tokens,
    dropped_note,
    fit_token_laws,
    quantization_deltas,
    tokens_note,
)
from analysis.units import job_draws
from pipeline.results import COLUMNS
from tests.analysis.synthetic import Config, Units, grid, job_rows, study_frame, with_units

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = (1_000_000, 4_000_000, 16_000_000, 64_000_000, 256_000_000)
TOKEN_COUNTS = (2_500_000, 5_000_000, 10_000_000, 20_000_000, 40_000_000)
BITS = (3, 4, 6)
FIT_SIZES = tuple(1_000_000 * 2**i for i in range(8))  # a cluster bootstrap over sizes needs several
OUYANG = {"k": 1.5, "beta": 0.5, "alpha": 0.4, "gamma": 3.0}
KUMAR = {"C_T": 0.4, "gamma_D": 0.6, "gamma_N": 0.5, "gamma_post": 1.5}
Degradation = Callable[[float, float, int], float]  # (N, D, P) -> ΔqLoss


def ouyang(n: float, d: float, p: int) -> float:
    return OUYANG["k"] * d ** OUYANG["beta"] / (n ** OUYANG["alpha"] * p ** OUYANG["gamma"])


def kumar(n: float, d: float, p: int) -> float:
    return KUMAR["C_T"] * d ** KUMAR["gamma_D"] / n ** KUMAR["gamma_N"] * math.exp(-p / KUMAR["gamma_post"])


def base_loss(n: float, d: float) -> float:
    """The 16-bit loss of a member: falls with size and with tokens (a Chinchilla-like form)."""
    return 1.8 + 40.0 * n**-0.3 + 30.0 * d**-0.25


def token_configs(
    sizes: tuple[int, ...] = SIZES, tokens: tuple[int, ...] = TOKEN_COUNTS, bits: tuple[int, ...] = BITS
) -> list[Config]:
    """Every size x token count x bits (nf and int, B64), plus a 16-bit baseline per member."""
    quantized = [Config(n, k, dtype, 64, train_tokens=d) for n in sizes for d in tokens for k in bits
                 for dtype in ("nf", "int")]  # fmt: skip
    return quantized + [Config(n, 16, train_tokens=d) for n in sizes for d in tokens]


def token_frame(
    configs: list[Config],
    degradation: Degradation,
    noise: float = 0.0,
    units: Units | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Result rows of a token study: held-out cross-entropy = base loss + ΔqLoss (int 20% worse), with
    multiplicative noise exp(noise·z) on ΔqLoss."""
    rng = np.random.default_rng(seed)
    rows = []
    for cfg in configs:
        d = float(cfg.train_tokens or 0)
        delta = (
            0.0
            if cfg.bits >= 16
            else degradation(cfg.n_params, d, cfg.bits) * (1.2 if cfg.dtype == "int" else 1)
        )
        nats = base_loss(cfg.n_params, d) + delta * math.exp(noise * rng.standard_normal())
        job = job_rows(
            cfg,
            [("wikitext2", "nats_per_token", nats, None), ("wikitext2", "perplexity", math.exp(nats), None)],
        )
        rows += with_units(job, units, rng) if units else job
    return pd.DataFrame(rows).reindex(
        columns=list(dict.fromkeys([*COLUMNS, "unit_sums", "unit_counts", "train_tokens"]))
    )


def deltas_of(raw: pd.DataFrame, n_boot: int = 0) -> pd.DataFrame:
    draws = job_draws(raw, "ce_wikitext2", (), n_boot) if n_boot else None
    return quantization_deltas(tidy_jobs(raw), "ce_wikitext2", draws)


def param(params: pd.DataFrame, law: str, name: str, setting: str = "nf B64") -> pd.Series:
    rows = params[(params["law"] == law) & (params["param"] == name) & (params["setting"] == setting)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_deltas_pair_each_job_with_the_baseline_of_its_own_member() -> None:
    configs = token_configs(sizes=SIZES[:2], tokens=TOKEN_COUNTS[:3])
    deltas = deltas_of(token_frame(configs, ouyang))
    baselines = {(c.n_params, c.train_tokens): c.key for c in configs if c.bits == 16}
    assert len(deltas) == len(configs) - len(baselines)
    for row in deltas.itertuples():
        assert row.baseline_keys == (baselines[(row.n_params, row.train_tokens)],)
        want = ouyang(row.n_params, row.train_tokens, row.bits) * (1.2 if row.dtype == "int" else 1)
        assert row.delta == pytest.approx(want, rel=1e-9)
        assert row.baseline_loss == pytest.approx(base_loss(row.n_params, row.train_tokens))


def test_paired_delta_intervals_come_from_the_shared_chunks() -> None:
    configs = token_configs(sizes=SIZES[:2], tokens=TOKEN_COUNTS[:2], bits=(4,))
    raw = token_frame(configs, ouyang, units=Units(n_units=60, shared_sd=1.0, job_sd=0.02))
    deltas = deltas_of(raw, n_boot=300)
    assert deltas[["delta_ci_low", "delta_ci_high"]].notna().all().all()
    assert ((deltas["delta_ci_low"] <= deltas["delta"]) & (deltas["delta"] <= deltas["delta_ci_high"])).all()
    # paired: the chunks' shared difficulty (sd 1 nat) cancels, so the CI is far narrower than it
    assert (deltas["delta_ci_high"] - deltas["delta_ci_low"]).max() < 0.05


@pytest.mark.parametrize(
    ("degradation", "law", "truth"), [(ouyang, "ouyang", OUYANG), (kumar, "kumar_ptq", KUMAR)]
)
def test_fits_recover_the_exponents_of_the_law_that_made_the_data(
    degradation: Degradation, law: str, truth: dict[str, float]
) -> None:
    deltas = deltas_of(token_frame(token_configs(sizes=FIT_SIZES), degradation, noise=0.05, seed=3))
    fits = fit_token_laws(deltas, n_boot=300, seed=1)
    assert fits.skipped.empty
    for name, value in list(truth.items())[1:]:  # the exponents (the constant is checked by the fit quality)
        row = param(fits.params, law, name)
        assert row["estimate"] == pytest.approx(value, rel=0.1), name
        assert row["ci_low"] <= value <= row["ci_high"], name
        assert row["identified"]
    quality = fits.quality[(fits.quality["law"] == law) & (fits.quality["setting"] == "nf B64")].iloc[0]
    assert quality["r2_log"] > 0.98 and quality["n_dropped"] == 0
    assert quality["n_points"] == len(FIT_SIZES) * len(TOKEN_COUNTS) * len(BITS)


def test_the_other_law_fits_worse_in_log_space() -> None:
    """Ouyang's power of P and Kumar's exponential in P are told apart by the data (3, 4, 6 bits)."""
    deltas = deltas_of(token_frame(token_configs(), kumar))
    quality = fit_token_laws(deltas, n_boot=0).quality.set_index(["setting", "law"])
    assert quality.loc[("nf B64", "kumar_ptq"), "rmse_log"] < 1e-9
    assert quality.loc[("nf B64", "ouyang"), "rmse_log"] > 0.01


def test_nonpositive_degradation_is_dropped_from_the_fits_and_counted() -> None:
    def noisy_at_six(n: float, d: float, p: int) -> float:
        return -1e-4 if p == 6 and n == SIZES[0] else ouyang(n, d, p)

    deltas = deltas_of(token_frame(token_configs(), noisy_at_six))
    quality = fit_token_laws(deltas, n_boot=0).quality
    assert (quality["n_dropped"] == len(TOKEN_COUNTS)).all()  # per setting: one size x every token count
    note = dropped_note(deltas)
    assert (
        note.startswith(f"{2 * len(TOKEN_COUNTS)} of {len(deltas)} quantized jobs are left out")
        and "bits 6" in note
    )


@pytest.mark.parametrize(
    ("sizes", "tokens", "bits", "reason"),
    [
        (SIZES, TOKEN_COUNTS[:2], BITS, "needs >= 3 token counts with ΔqLoss > 0, has 2"),
        (SIZES[:1], TOKEN_COUNTS, BITS, "needs >= 2 model sizes with ΔqLoss > 0, has 1"),
        (SIZES, TOKEN_COUNTS, (4,), "needs >= 2 bit widths with ΔqLoss > 0, has 1"),
    ],
)
def test_too_few_token_counts_sizes_or_bits_is_a_gap(
    sizes: tuple[int, ...], tokens: tuple[int, ...], bits: tuple[int, ...], reason: str
) -> None:
    fits = fit_token_laws(deltas_of(token_frame(token_configs(sizes, tokens, bits), ouyang)), n_boot=10)
    assert fits.params.empty
    assert set(fits.skipped["reason"]) == {reason}
    assert set(fits.skipped["law"]) == {"ouyang", "kumar_ptq"}


def test_two_sizes_fit_without_an_interval() -> None:
    fits = fit_token_laws(deltas_of(token_frame(token_configs(sizes=SIZES[:2]), ouyang)), n_boot=50)
    assert not fits.params.empty and fits.params["ci_low"].isna().all()
    assert param(fits.params, "ouyang", "beta")["estimate"] == pytest.approx(OUYANG["beta"])


def test_other_sections_read_each_size_at_its_largest_token_count() -> None:
    tidy = tidy_jobs(token_frame(token_configs(sizes=SIZES[:2]), ouyang))
    kept = at_largest_tokens(tidy)
    assert set(kept["train_tokens"]) == {TOKEN_COUNTS[-1]}
    assert len(kept) == len(tidy) / len(TOKEN_COUNTS)
    plain = tidy_jobs(study_frame(grid(sizes=SIZES[:2], bits=(4,))))
    assert "train_tokens" not in plain  # a column of nulls (no ladder member) is not kept
    assert at_largest_tokens(plain) is plain and tokens_note(plain) == ""


def _markdown(raw: pd.DataFrame, out: Path, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """Each section's Markdown of the report of `raw` (20 replicates), the report written under `out`."""
    study = study_from_results(raw, "tokens", n_boot=20, n_budgets=5)
    sections = build_sections(study)
    write_report("tokens", sections, out)
    return {s.title: render_markdown("x", [s]) for s in sections if s.title not in skip}


def test_report_has_a_training_tokens_section_and_the_rest_reads_the_largest_members(tmp_path: Path) -> None:
    raw = token_frame(token_configs(sizes=SIZES[:3], tokens=TOKEN_COUNTS[:3]), ouyang, noise=0.05,
                      units=Units(n_units=40, job_sd=0.01))  # fmt: skip
    full = _markdown(raw, tmp_path / "full")
    tokens = full["Training tokens"]
    assert "Gap" not in tokens and "Ouyang" in tokens and "Kumar" in tokens
    assert "Budgets won per bit width, per training-token count" in tokens
    assert "most training tokens" in full["Study"]
    assert (tmp_path / "full" / "figures" / "tokens-toy.png").stat().st_size > 0
    largest = raw[raw["train_tokens"] == TOKEN_COUNTS[2]]
    skip = frozenset({"Study", "Gaps", "Training tokens"})
    assert {t: md for t, md in full.items() if t not in skip} == _markdown(
        largest, tmp_path / "largest", skip
    )


def test_reports_without_the_column_are_unchanged_by_it(tmp_path: Path) -> None:
    frame = study_frame(grid(sizes=SIZES[:3], bits=(3, 4)), noise=0.002, units=Units(n_units=30))
    raw = frame.drop(columns=["train_tokens"], errors="ignore")  # results written before the column
    with_nulls = raw.assign(train_tokens=pd.array([None] * len(raw), dtype="Int64"))
    plain = _markdown(raw, tmp_path / "plain")
    assert "Training tokens" not in plain
    assert plain == _markdown(with_nulls, tmp_path / "nulls")


def test_degradation_that_grows_with_bits_leaves_gamma_post_unidentified() -> None:
    def rising(n: float, d: float, p: int) -> float:
        return 1e-3 * kumar(n, d, p) * math.exp(2 * p / KUMAR["gamma_post"])  # net e^(+P/1.5)

    fits = fit_token_laws(deltas_of(token_frame(token_configs(), rising)), n_boot=20)
    row = param(fits.params, "kumar_ptq", "gamma_post")
    assert row["estimate"] == math.inf and row["ci_high"] == math.inf
    assert not row["identified"] and "does not fall with more bits" in row["note"]
