"""The training-token axis: quantization degradation against training tokens, and its two laws.

A ladder can keep members at several training-token counts D per size N (`train_tokens`; model labels
`ladder:<name>/<size>@<tokens>`). The degradation of a quantized job is

    ΔqLoss = loss(quantized) − loss(16-bit baseline of the same member)

in nats per token (the study's cross-entropy column), paired with the baseline on the same text chunks
where the rows carry per-unit data (`analysis.units`). Two laws are fit per (family, setting), both
linear in log space, so each is an ordinary least-squares fit of log ΔqLoss:

- Ouyang et al. 2024: ΔqLoss = k·D^β / (N^α·P^γ)   (log k, β, −α, −γ on 1, log D, log N, log P);
- Kumar et al. 2024, post-training term: δ_PTQ = C_T·(D^γ_D / N^γ_N)·e^(−P/γ_post)
  (log C_T, γ_D, −γ_N, −1/γ_post on 1, log D, log N, P).

P is the bit width k; N the parameters in quantized matrices (the non-embedding linear weights,
`n_quantized_params`; `n_params` where that is not recorded). The logarithm needs ΔqLoss > 0: rows at
or below 0 (a quantized model measured no worse than its baseline, noise around 0 at high bits) are
left out and counted. Intervals: model-level bootstrap over sizes (`analysis.fits.cluster_weights`):
all members of one size come from one training run, so they move together and are one cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.errors import AnalysisError
from analysis.fits import SKIPPED_COLUMNS, cluster_weights, identification_note
from analysis.paired import CI_LEVEL, interval
from analysis.tidy import BASELINE_SETTING
from analysis.units import JobDraws

TOKENS = "train_tokens"
MIN_TOKEN_COUNTS = 3  # token counts a fit needs (the D exponent from fewer is not worth reporting)
MIN_SIZES = 2
MIN_BITS = 2
GROUP = ["model_family", "setting"]
DELTA_COLUMNS = [
    "model_family", "model", "n_params", "n_nonembedding", TOKENS, "setting", "dtype", "bits",
    "block_size", "job_key", "baseline_keys", "loss", "baseline_loss", "delta", "delta_ci_low",
    "delta_ci_high",
]  # fmt: skip
PARAM_COLUMNS = ["model_family", "setting", "law", "param", "estimate", "ci_low", "ci_high", "replicates",
                 "identified", "note"]  # fmt: skip
QUALITY_COLUMNS = ["model_family", "setting", "law", "n_points", "n_dropped", "n_sizes", "n_token_counts",
                   "r2_log", "rmse_log"]  # fmt: skip
LAWS = ("ouyang", "kumar_ptq")
NO_DECAY_NOTE = "degradation does not fall with more bits (the coefficient of P is >= 0)"
LAW_TITLES = {
    "ouyang": "Ouyang et al.: ΔqLoss = k·D^β / (N^α·P^γ)",
    "kumar_ptq": "Kumar et al.: δ_PTQ = C_T·(D^γ_D / N^γ_N)·e^(−P/γ_post)",
}


def token_counts(frame: pd.DataFrame) -> list[int]:
    """The distinct training-token counts of a results or tidy table (empty without the column)."""
    if TOKENS not in frame:
        return []
    return sorted(int(t) for t in frame[TOKENS].dropna().unique())


def has_token_axis(frame: pd.DataFrame) -> bool:
    """Whether the study varies training tokens (>= 2 distinct `train_tokens`)."""
    return len(token_counts(frame)) >= 2


def at_largest_tokens(tidy: pd.DataFrame) -> pd.DataFrame:
    """`tidy` restricted to each size's largest `train_tokens` (per family), so that the analyses that
    assume one model per size read one; unchanged where the study does not vary training tokens.
    Jobs without a token count (other models) are kept."""
    if not has_token_axis(tidy):
        return tidy
    largest = tidy.groupby(["model_family", "n_params"])[TOKENS].transform("max")
    keep = (tidy[TOKENS] == largest) | tidy[TOKENS].isna()
    return tidy[keep].reset_index(drop=True)


def tokens_note(frame: pd.DataFrame) -> str:
    """The Study section's sentence on the token axis ('' where the study does not vary it)."""
    counts = token_counts(frame)
    if len(counts) < 2:
        return ""
    shown = ", ".join(f"{t:,}" for t in counts)
    return (
        f"Training tokens: {len(counts)} token counts per model size ({shown}). Every section but "
        "'Training tokens' reads one model per size: each size's member with the most training tokens."
    )


def n_nonembedding(jobs: pd.DataFrame) -> pd.Series:
    """N of the laws: parameters in quantized matrices, `n_params` where that is not recorded."""
    n_q = jobs["n_quantized_params"].astype(float)
    return n_q.where(n_q > 0, jobs["n_params"].astype(float))


def quantization_deltas(tidy: pd.DataFrame, loss: str, draws: JobDraws | None = None) -> pd.DataFrame:
    """ΔqLoss of every quantized job with a `loss` value against the 16-bit baseline of its member.

    The baseline is matched on the model label (one label per (size, train_tokens)); several baseline
    jobs of one member are averaged. `delta_ci_*`: paired bootstrap 95% CI from `draws` (NaN where
    either side has no per-unit data). Jobs whose member has no baseline are left out.

    Raises:
        AnalysisError: `loss` is not a column of `tidy`, or no quantized job has a baseline.
    """
    if loss not in tidy:
        raise AnalysisError(f"loss column {loss!r} not in the results; have {sorted(tidy.columns)}")
    rows = tidy[tidy[loss].notna()]
    if TOKENS not in rows:
        rows = rows.assign(**{TOKENS: np.nan})
    base = rows[rows["setting"] == BASELINE_SETTING].groupby("model")
    baselines = pd.DataFrame(
        {"baseline_keys": base["job_key"].agg(tuple), "baseline_loss": base[loss].mean()}
    )
    quantized = rows[rows["setting"] != BASELINE_SETTING].join(baselines, on="model", how="inner")
    if quantized.empty:
        raise AnalysisError(f"no quantized job with a {loss} value has a 16-bit baseline of its own model")
    out = quantized.assign(
        loss=quantized[loss],
        delta=quantized[loss] - quantized["baseline_loss"],
        n_nonembedding=n_nonembedding(quantized),
    )
    low, high = _delta_interval(out, draws)
    out = out.assign(delta_ci_low=low, delta_ci_high=high)
    order = ["model_family", "setting", "bits", "n_params", TOKENS]
    return out[DELTA_COLUMNS].sort_values(order).reset_index(drop=True)


def _delta_interval(deltas: pd.DataFrame, draws: JobDraws | None) -> tuple[np.ndarray, np.ndarray]:
    if draws is None or draws.n_boot == 0:
        return np.full(len(deltas), np.nan), np.full(len(deltas), np.nan)
    quantized = draws.for_groups([[k] for k in deltas["job_key"]])
    baseline = draws.for_groups([list(k) for k in deltas["baseline_keys"]])
    return interval(quantized - baseline)


@dataclass(frozen=True)
class TokenFits:
    """Both laws' parameters (with model-level CIs), fit quality in log space, and groups not fit."""

    params: pd.DataFrame  # PARAM_COLUMNS
    quality: pd.DataFrame  # QUALITY_COLUMNS
    skipped: pd.DataFrame  # SKIPPED_COLUMNS


def design(group: pd.DataFrame, law: str) -> np.ndarray:
    """(n, 4) regressors of log ΔqLoss: 1, log D, log N, and log P (Ouyang) or P (Kumar)."""
    bits = group["bits"].to_numpy(float)
    last = np.log(bits) if law == "ouyang" else bits
    d, n = group[TOKENS].to_numpy(float), group["n_nonembedding"].to_numpy(float)
    return np.column_stack([np.ones(len(group)), np.log(d), np.log(n), last])


def reported(coef: np.ndarray, law: str) -> dict[str, np.ndarray]:
    """Coefficient rows (..., 4) of `design` -> the law's parameters."""
    if law == "ouyang":
        return {
            "k": np.exp(coef[..., 0]),
            "beta": coef[..., 1],
            "alpha": -coef[..., 2],
            "gamma": -coef[..., 3],
        }
    with np.errstate(divide="ignore"):
        # e^(−P/γ_post) falls with P only for a negative coefficient; otherwise γ_post is infinite
        post = np.where(coef[..., 3] < 0, -1.0 / coef[..., 3], np.inf)
    return {
        "C_T": np.exp(coef[..., 0]),
        "gamma_D": coef[..., 1],
        "gamma_N": -coef[..., 2],
        "gamma_post": post,
    }


def unfit_reason(group: pd.DataFrame) -> str:
    """Why a group's positive rows cannot be fit ('' if they can)."""
    counts = {
        "token counts": (group[TOKENS].nunique(), MIN_TOKEN_COUNTS),
        "model sizes": (group["n_params"].nunique(), MIN_SIZES),
        "bit widths": (group["bits"].nunique(), MIN_BITS),
    }
    for what, (have, need) in counts.items():
        if have < need:
            return f"needs >= {need} {what} with ΔqLoss > 0, has {have}"
    if len(group) <= 4:
        return f"needs more points than the 4 parameters, has {len(group)} with ΔqLoss > 0"
    return ""


def fit_token_laws(deltas: pd.DataFrame, n_boot: int = 200, seed: int = 0) -> TokenFits:
    """Fit both laws (`LAWS`) in log space to the ΔqLoss > 0 rows of every (family, setting).

    Groups with too few token counts, sizes or bit widths are listed in `skipped` with the reason.
    """
    rng = np.random.default_rng(seed)
    params: list[dict[str, object]] = []
    quality: list[dict[str, object]] = []
    skipped: list[dict[str, object]] = []
    for (family, setting), group in deltas[deltas[TOKENS].notna()].groupby(GROUP, sort=True):
        positive = group[group["delta"] > 0].reset_index(drop=True)
        reason = unfit_reason(positive)
        if reason:
            skipped += [
                {"model_family": family, "setting": setting, "law": law, "reason": reason} for law in LAWS
            ]
            continue
        weights = cluster_weights(positive, n_boot, rng)
        y = np.log(positive["delta"].to_numpy(float))
        for law in LAWS:
            head = {"model_family": family, "setting": setting, "law": law}
            coef, fitted, replicates = _log_fit(design(positive, law), y, weights)
            params += _summarize(head, reported(np.vstack([coef, replicates]), law))
            quality.append({**head, **_quality(y, fitted), "n_points": len(positive),
                            "n_dropped": len(group) - len(positive),
                            "n_sizes": positive["n_params"].nunique(),
                            "n_token_counts": positive[TOKENS].nunique()})  # fmt: skip
    return TokenFits(
        pd.DataFrame(params, columns=PARAM_COLUMNS),
        pd.DataFrame(quality, columns=QUALITY_COLUMNS),
        pd.DataFrame(skipped, columns=SKIPPED_COLUMNS),
    )


def _log_fit(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of y on x: (coefficients (4,), fitted (n,), replicate coefficients (R, 4)); a
    replicate whose drawn rows do not determine every coefficient is NaN."""
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    root_w = np.sqrt(weights)[:, :, None]
    weighted = root_w * x[None]  # a replicate's rows, each repeated as often as its size was drawn
    replicates = (np.linalg.pinv(weighted) @ (root_w * y[None, :, None]))[:, :, 0]
    if len(weights):
        replicates[np.linalg.matrix_rank(weighted) < x.shape[1]] = np.nan
    return coef, x @ coef, replicates.reshape(-1, x.shape[1])


def _summarize(head: dict[str, object], draws: dict[str, np.ndarray]) -> list[dict[str, object]]:
    tail = (1 - CI_LEVEL) / 2 * 100
    rows = []
    for name, values in draws.items():
        boot = values[1:][~np.isnan(values[1:])]
        big = np.finfo(float).max  # an infinite gamma_post is ranked above every finite one
        low, high = (
            np.percentile(np.clip(boot, -big, big), [tail, 100 - tail]) if len(boot) else (np.nan, np.nan)
        )
        low, high = (float(np.inf) if v >= big else float(v) for v in (low, high))
        estimate = float(values[0])
        note = identification_note(estimate, low, high, None) if np.isfinite(estimate) else NO_DECAY_NOTE
        rows.append({**head, "param": name, "estimate": estimate, "ci_low": low,
                     "ci_high": high, "replicates": len(boot), "identified": not note,
                     "note": note})  # fmt: skip
    return rows


def _quality(y: np.ndarray, fitted: np.ndarray) -> dict[str, float]:
    residual = y - fitted
    total = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 0 else np.nan
    return {"r2_log": r2, "rmse_log": float(np.sqrt(np.mean(residual**2)))}


def dropped_note(deltas: pd.DataFrame) -> str:
    """How many rows the log-space fits leave out (ΔqLoss <= 0), how many of those decisively."""
    dropped = deltas[~(deltas["delta"] > 0)]
    if dropped.empty:
        return f"All {len(deltas)} quantized jobs degrade (ΔqLoss > 0); the fits use every one."
    decisive = int((dropped["delta_ci_high"] < 0).sum())
    bits = ", ".join(str(int(b)) for b in sorted(dropped["bits"].unique()))
    return (
        f"{len(dropped)} of {len(deltas)} quantized jobs are left out of the log-space fits: their ΔqLoss "
        f"is <= 0 (bits {bits}), i.e. they measure no worse than their 16-bit baseline, and the logarithm "
        f"needs a positive degradation; {decisive} of them are decisively below 0 (paired 95% CI)."
    )
