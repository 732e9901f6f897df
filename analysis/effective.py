"""The effective-parameter law for quantized models, and its bounded, batched least squares.

    L = A · (N_u + N_q · (1 − e^(−k/γ)))^(−α) + E

N_q is the number of parameters in quantized matrices (`n_quantized_params`); N_u = N − N_q are the
parameters left in 16 bits (embeddings, norms, an untied LM head, proxy columns), which do not shrink
with fewer bits k. The 16-bit baseline quantizes nothing (N_q = 0), so its N_eff = N.

This is the effective-parameter form of Kumar et al. 2024 ("Scaling Laws for Precision"), which they
fit to *training* in low precision with all N parameters shrinking, N·(1 − e^(−P/γ)); here only the
quantized part shrinks. It is not their post-training form, which adds a penalty to the 16-bit loss,
δ_PTQ = C_T · (D^γ_D / N^γ_N) · e^(−P_post/γ_post), growing with the training tokens D: a ladder trains
every size on the same D, so that term's D-dependence cannot be fit from one ladder.

Solving: parameters x = (log A', α, log γ, E) with N scaled by a reference size n_ref; bounded
Levenberg-Marquardt run on many targets and row weights at once (`solve_batch`: the model-level
bootstrap refits with one weight per point, the number of times its model size was drawn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import OptimizeResult, least_squares

from analysis.tidy import precision_bits

FTOL = 1e-10  # a batched solve stops once a step lowers the cost by less than this, relatively
LOWER = np.array([-30.0, 1e-4, np.log(0.05), 0.0])  # log A', alpha, log gamma, E
UPPER = np.array([30.0, 4.0, np.log(256.0), np.inf])  # E <= min(y), set per fit
GAMMA_STARTS = (0.5, 2.0, 8.0)


@dataclass(frozen=True)
class LawInputs:
    """The law's inputs per point: unquantized and quantized counts (divided by n_ref) and bits."""

    n_unquantized: np.ndarray
    n_quantized: np.ndarray
    k: np.ndarray
    n_ref: float

    @classmethod
    def from_points(cls, group: pd.DataFrame) -> LawInputs:
        n = group["n_params"].to_numpy(float)
        n_q = np.clip(group["n_quantized_params"].fillna(0).to_numpy(float), 0.0, n)
        n_ref = float(np.exp(np.mean(np.log(n))))
        if "precision" in group:  # a mixed curve's k is its target, not its cheapest candidate's bits
            k = group["precision"].map(precision_bits).to_numpy(float)
        else:
            k = group["bits"].to_numpy(float)
        return cls((n - n_q) / n_ref, n_q / n_ref, k, n_ref)


def reported(raw: np.ndarray, n_ref: float) -> dict[str, np.ndarray]:
    """Solver rows (..., 4) -> the reported parameters A, alpha, gamma, E."""
    return {
        "A": np.exp(raw[..., 0]) * n_ref ** raw[..., 1],  # A' (N / n_ref)^-alpha = A' n_ref^alpha N^-alpha
        "alpha": raw[..., 1],
        "gamma": np.exp(raw[..., 2]),
        "E": raw[..., 3],
    }


def bounds_of(y: np.ndarray) -> dict[str, tuple[float, float] | None]:
    """The box each reported parameter is fit in (A: none worth reporting)."""
    return {"A": None, "alpha": (LOWER[1], UPPER[1]), "gamma": (0.05, 256.0), "E": (0.0, float(np.min(y)))}


def model(x: np.ndarray, inputs: LawInputs) -> np.ndarray:
    """The law's prediction at each point for one parameter row x (4,)."""
    log_a, alpha, log_gamma, e = x
    n_eff = inputs.n_unquantized + inputs.n_quantized * (1.0 - np.exp(-inputs.k / np.exp(log_gamma)))
    return np.exp(log_a) * n_eff ** (-alpha) + e


def _batch_eval(
    x: np.ndarray, inputs: LawInputs, targets: np.ndarray, root_w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted residuals (R, n) and Jacobians (R, n, 4) for parameter rows x (R, 4)."""
    log_a, alpha, log_gamma = (x[:, i : i + 1] for i in range(3))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        gamma = np.exp(log_gamma)
        decay = np.exp(-inputs.k / gamma)
        base = inputs.n_unquantized + inputs.n_quantized * (1.0 - decay)
        power = np.exp(log_a) * base ** (-alpha)
        residual = power + x[:, 3:4] - targets
        d_log_gamma = alpha * power * decay * inputs.k * inputs.n_quantized / (gamma * base)
        jac = np.stack([power, -power * np.log(base), d_log_gamma, np.ones_like(power)], axis=-1)
    return residual * root_w, jac * root_w[:, :, None]


def jacobian(x: np.ndarray, inputs: LawInputs) -> np.ndarray:
    """d model / d (log A', alpha, log gamma, E) at x (4,), analytic: (n, 4)."""
    _, jac = _batch_eval(x[None], inputs, np.zeros((1, len(inputs.k))), np.ones((1, len(inputs.k))))
    return jac[0]


def _bounds(targets: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower (4,) and upper (R, 4) bounds, E capped at the lowest target with weight."""
    upper = np.broadcast_to(UPPER, (len(targets), 4)).copy()
    upper[:, 3] = np.maximum(np.min(np.where(weights > 0, targets, np.inf), axis=1), 1e-9)
    return LOWER, upper


def solve(inputs: LawInputs, y: np.ndarray, start: np.ndarray) -> OptimizeResult:
    """One unweighted fit by scipy's `least_squares` (trust region reflective) from `start`."""
    lower, upper = _bounds(y[None], np.ones((1, len(y))))
    x0 = np.clip(start, lower + 1e-9, upper[0] - 1e-9)
    return least_squares(
        lambda x: model(x, inputs) - y,
        x0,
        jac=lambda x: jacobian(x, inputs),
        bounds=(lower, upper[0]),
        x_scale="jac",
        max_nfev=2000,
    )


def solve_batch(
    inputs: LawInputs,
    targets: np.ndarray,
    starts: np.ndarray,
    weights: np.ndarray | None = None,
    max_iter: int = 400,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted fits of many targets (R, n) from starts (R, 4) at once: (x (R, 4), cost (R,)).

    A bounded Levenberg-Marquardt run on all rows together (numpy batched 4x4 solves): Marquardt
    damping (scale-free like x_scale="jac"), variables at a bound that the gradient pushes outward
    held there, steps clipped into the box; a row stops once an accepted step lowers its cost by
    less than `FTOL` relatively, or no step lowers it any more. `weights` (R, n): each point's weight
    in the sum of squares (default 1).
    """
    weights = np.ones_like(targets) if weights is None else weights
    root_w = np.sqrt(weights)
    lower, upper = _bounds(targets, weights)
    x = np.clip(starts, lower + 1e-9, upper - 1e-9)
    residual, jac = _batch_eval(x, inputs, targets, root_w)
    cost = 0.5 * np.sum(residual**2, axis=1)
    damping = np.full(len(x), 1e-3)
    live = np.flatnonzero(np.isfinite(cost))
    eye = np.eye(4)
    for _ in range(max_iter):
        if not len(live):
            break
        r, j, xl, hi, lam = residual[live], jac[live], x[live], upper[live], damping[live]
        jt = j.transpose(0, 2, 1)
        grad = (jt @ r[:, :, None])[:, :, 0]
        normal = jt @ j
        diag = np.diagonal(normal, axis1=1, axis2=2)
        scale = np.maximum(diag, 1e-12 * diag.max(axis=1, keepdims=True) + 1e-300)
        free = ~(((xl <= lower) & (grad > 0)) | ((xl >= hi) & (grad < 0)))
        mask = free[:, :, None] & free[:, None, :]
        system = np.where(mask, normal + lam[:, None, None] * scale[:, :, None] * eye, eye)
        step = -np.linalg.solve(system, np.where(free, grad, 0.0)[:, :, None])[:, :, 0]
        trial = np.clip(xl + step, lower, hi)
        trial_residual, trial_jac = _batch_eval(trial, inputs, targets[live], root_w[live])
        trial_cost = 0.5 * np.sum(trial_residual**2, axis=1)
        better = np.isfinite(trial_cost) & (trial_cost < cost[live])
        converged = better & (cost[live] - trial_cost <= FTOL * cost[live])
        take = live[better]
        x[take], residual[take], jac[take] = trial[better], trial_residual[better], trial_jac[better]
        cost[take] = trial_cost[better]
        damping[live] = np.where(better, lam / 3.0, lam * 2.0)
        live = live[~converged & (damping[live] <= 1e10)]
    return x, cost


def starts(y: np.ndarray) -> list[np.ndarray]:
    """Starting points for the point estimate: two alphas x `GAMMA_STARTS`."""
    e0 = 0.5 * float(np.min(y))
    log_a0 = float(np.log(max(float(np.mean(y)) - e0, 1e-6)))
    return [np.array([log_a0, alpha, np.log(gamma), e0]) for alpha in (0.1, 0.5) for gamma in GAMMA_STARTS]


def best_fit(inputs: LawInputs, y: np.ndarray) -> np.ndarray:
    """The point estimate: all `starts` solved at once, the best one polished by `least_squares`."""
    first = np.array(starts(y))
    solved, cost = solve_batch(inputs, np.broadcast_to(y, (len(first), len(y))).copy(), first)
    candidate = solved[int(np.argmin(cost))]
    polished = solve(inputs, y, candidate)
    return polished.x if polished.cost <= float(np.min(cost)) else candidate


def refit(
    inputs: LawInputs, targets: np.ndarray, best: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Each target row (weighted by its `weights` row) refit from `best` and from `best` with the
    other `GAMMA_STARTS`; the lowest cost wins. (R, 4).

    gamma is weakly identified (flat once k / gamma is large), so a single local solve can stall on
    a plateau that another start leaves for a lower minimum.
    """
    weights = np.ones_like(targets) if weights is None else weights
    # Rows are solved independently, so equal (target, weight) rows -- a bootstrap over a few model
    # sizes redraws the same counts often -- are solved once and scattered back: same result, bit
    # for bit, at a fraction of the work (docs/benchmarks.md, "report at scale").
    unique, inverse = np.unique(np.hstack([targets, weights]), axis=0, return_inverse=True)
    targets, weights = unique[:, : targets.shape[1]], unique[:, targets.shape[1] :]
    tries = [best] + [np.array([*best[:2], np.log(gamma), best[3]]) for gamma in GAMMA_STARTS]
    rows = len(targets)
    stacked = np.vstack([np.broadcast_to(start, (rows, 4)) for start in tries])
    solved, cost = solve_batch(
        inputs, np.tile(targets, (len(tries), 1)), stacked, np.tile(weights, (len(tries), 1))
    )
    pick = np.argmin(cost.reshape(len(tries), rows), axis=0)
    return solved.reshape(len(tries), rows, 4)[pick, np.arange(rows)][inverse.reshape(-1)]
