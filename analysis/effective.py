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
bootstrap refits with one weight per point, the number of times its model size was drawn); the rows of
many groups (every setting of a family) share batches (`solve_many`), bit for bit one group at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """The law's inputs per point: unquantized and quantized counts (divided by n_ref) and bits; each
    array (n,) for one group's points, or (R, n) in a batch whose rows come from several groups."""

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

    def per_row(self, rows: int) -> LawInputs:
        """The same inputs repeated for `rows` rows of a batch: arrays (rows, n)."""
        tile = lambda a: np.tile(a, (rows, 1))  # noqa: E731
        return LawInputs(tile(self.n_unquantized), tile(self.n_quantized), tile(self.k), self.n_ref)

    def take(self, keep: np.ndarray) -> LawInputs:
        """The rows `keep` of per-row inputs (inputs shared by every row are returned as they are)."""
        if np.ndim(self.k) == 1:
            return self
        return LawInputs(self.n_unquantized[keep], self.n_quantized[keep], self.k[keep], self.n_ref)


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
    residual, terms = _residuals(x, inputs, targets, root_w)
    return residual, _weighted_jacobian(x, terms, inputs, root_w)


Terms = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # power, decay, base (R, n); gamma (R, 1)


def _residuals(
    x: np.ndarray, inputs: LawInputs, targets: np.ndarray, root_w: np.ndarray
) -> tuple[np.ndarray, Terms]:
    """Weighted residuals (R, n) for parameter rows x (R, 4), and the terms their Jacobian reuses (a
    solver computes the Jacobian only where it takes the step: `_weighted_jacobian`)."""
    log_a, alpha, log_gamma = (x[:, i : i + 1] for i in range(3))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        gamma = np.exp(log_gamma)
        decay = np.exp(-inputs.k / gamma)
        base = inputs.n_unquantized + inputs.n_quantized * (1.0 - decay)
        power = np.exp(log_a) * base ** (-alpha)
        residual = power + x[:, 3:4] - targets
    return residual * root_w, (power, decay, base, gamma)


def _weighted_jacobian(x: np.ndarray, terms: Terms, inputs: LawInputs, root_w: np.ndarray) -> np.ndarray:
    """Weighted Jacobians (R, n, 4) at parameter rows x (R, 4), from `_residuals`' terms at x."""
    power, decay, base, gamma = terms
    alpha = x[:, 1:2]
    jac = np.empty((*power.shape, 4))  # each column weighted as it is written: no stacked copy
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        d_log_gamma = alpha * power * decay * inputs.k * inputs.n_quantized / (gamma * base)
        np.multiply(power, root_w, out=jac[..., 0])
        np.multiply(-power * np.log(base), root_w, out=jac[..., 1])
        np.multiply(d_log_gamma, root_w, out=jac[..., 2])
        jac[..., 3] = root_w  # d / dE = 1, weighted
    return jac


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
    damping (scale-free like x_scale="jac") updated from the gain ratio (`_damping`), variables at a
    bound that the gradient pushes outward held there, steps clipped into the box; a row stops once an
    accepted step lowers its cost by less than `FTOL` relatively, or no step lowers it any more.
    `weights` (R, n): each point's weight in the sum of squares (default 1).

    Every row is solved on its own (the same arithmetic whichever rows share the batch), so the
    batch keeps only the rows still running, and a row's Jacobian, gradient and normal matrix are
    recomputed only after a step it took (a rejected step leaves them as they were).
    """
    x, cost, run = _begin(inputs, targets, starts, weights)
    _advance(run, x, cost, max_iter, until_rows=0)
    return x, cost


def _begin(
    inputs: LawInputs, targets: np.ndarray, starts: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, _Run]:
    """Each row's start clipped into its box and its cost there (x (R, 4), cost (R,), the values a row
    that never runs keeps), and the run of the rows whose cost is finite."""
    weights = np.ones_like(targets) if weights is None else weights
    root_w = np.sqrt(weights)
    lower, upper = _bounds(targets, weights)
    x = np.clip(starts, lower + 1e-9, upper - 1e-9)
    residual, jac = _batch_eval(x, inputs, targets, root_w)
    cost = 0.5 * np.sum(residual**2, axis=1)
    live = np.flatnonzero(np.isfinite(cost))
    grad, normal = _normal_equations(jac[live], residual[live])
    damping, growth, steps = np.full(len(live), 1e-3), np.full(len(live), 2.0), np.zeros(len(live), int)
    run = _Run(live, inputs.take(live), x[live], cost[live], damping, growth, steps, targets[live],
               root_w[live], upper[live], residual[live], grad, normal)  # fmt: skip
    return x, cost, run


def _advance(run: _Run, x_out: np.ndarray, cost_out: np.ndarray, max_iter: int, until_rows: int) -> _Run:
    """Step `run` until no more than `until_rows` rows still run (or none: a row stops after `max_iter`
    steps at the latest); rows that stop are written to `x_out`, `cost_out`. The rows left."""
    if max_iter <= 0:  # no steps: every row keeps its start, which `_begin` wrote
        return run.take(np.zeros(len(run.rows), bool))
    while len(run.rows) > until_rows:
        run = _iterate(run, x_out, cost_out, max_iter)
    return run


@dataclass
class _Run:
    """The rows of a solve still running (indices into its output arrays, `rows`) and their state, which
    `_iterate` updates in place (the solver's only mutable object; it never leaves this module)."""

    rows: np.ndarray
    inputs: LawInputs
    x: np.ndarray  # (r, 4)
    cost: np.ndarray  # (r,)
    damping: np.ndarray  # (r,)
    growth: np.ndarray  # (r,): the damping's factor at the next rejected step
    steps: np.ndarray  # (r,): steps taken or rejected so far
    targets: np.ndarray  # (r, n)
    root_w: np.ndarray  # (r, n)
    upper: np.ndarray  # (r, 4)
    residual: np.ndarray  # (r, n), weighted
    grad: np.ndarray  # (r, 4): J^T r
    normal: np.ndarray  # (r, 4, 4): J^T J

    def take(self, keep: np.ndarray) -> _Run:
        """The rows where `keep` (a boolean array) is true."""
        fields = {name: value[keep] for name, value in vars(self).items() if name != "inputs"}
        return _Run(inputs=self.inputs.take(keep), **fields)

    @staticmethod
    def concat(runs: Sequence[_Run]) -> _Run:
        """The rows of several runs (of per-row inputs with the same number of points) as one run."""
        names = [name for name in vars(runs[0]) if name != "inputs"]
        fields = {name: np.concatenate([getattr(run, name) for run in runs]) for name in names}
        return _Run(inputs=_concat_inputs([run.inputs for run in runs]), **fields)


def _normal_equations(jac: np.ndarray, residual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient J^T r (r, 4) and normal matrix J^T J (r, 4, 4) of weighted Jacobians and residuals."""
    jt = jac.transpose(0, 2, 1)
    return (jt @ residual[:, :, None])[:, :, 0], jt @ jac


def _iterate(run: _Run, x_out: np.ndarray, cost_out: np.ndarray, max_iter: int) -> _Run:
    """One damped step of every running row; rows that stop (converged, no step lowers the cost, or
    `max_iter` steps) are written to `x_out`, `cost_out`."""
    run.steps += 1
    grad, normal, xl, hi, lam = run.grad, run.normal, run.x, run.upper, run.damping
    diag = np.diagonal(normal, axis1=1, axis2=2)
    scale = np.maximum(diag, 1e-12 * diag.max(axis=1, keepdims=True) + 1e-300)
    free = ~(((xl <= LOWER) & (grad > 0)) | ((xl >= hi) & (grad < 0)))
    mask = free[:, :, None] & free[:, None, :]
    eye = np.eye(4)
    system = np.where(mask, normal + lam[:, None, None] * scale[:, :, None] * eye, eye)
    step = -np.linalg.solve(system, np.where(free, grad, 0.0)[:, :, None])[:, :, 0]
    trial = np.clip(xl + step, LOWER, hi)
    trial_residual, terms = _residuals(trial, run.inputs, run.targets, run.root_w)
    trial_cost = 0.5 * np.sum(trial_residual**2, axis=1)
    better = np.isfinite(trial_cost) & (trial_cost < run.cost)
    converged = better & (run.cost - trial_cost <= FTOL * run.cost)
    with np.errstate(over="ignore", invalid="ignore"):
        gain = (run.cost - trial_cost) / np.maximum(_predicted_decrease(grad, normal, trial - xl), 1e-300)
    run.damping[:], run.growth[:] = _damping(lam, run.growth, better, gain)
    if better.any():
        took = np.flatnonzero(better)
        taken: Terms = (terms[0][took], terms[1][took], terms[2][took], terms[3][took])
        jac = _weighted_jacobian(trial[took], taken, run.inputs.take(took), run.root_w[took])
        run.x[took], run.cost[took], run.residual[took] = trial[took], trial_cost[took], trial_residual[took]
        run.grad[took], run.normal[took] = _normal_equations(jac, run.residual[took])
    keep = ~converged & (run.damping <= 1e10) & (run.steps < max_iter)
    if keep.all():
        return run
    stop = ~keep
    x_out[run.rows[stop]], cost_out[run.rows[stop]] = run.x[stop], run.cost[stop]
    return run.take(keep)


def _predicted_decrease(grad: np.ndarray, normal: np.ndarray, change: np.ndarray) -> np.ndarray:
    """The cost decrease (r,) the Gauss-Newton model predicts for steps `change` (r, 4) (clipped into
    the box, so not always the damped step the system was solved for)."""
    curvature = np.einsum("ri,rij,rj->r", change, normal, change)
    return -(np.sum(grad * change, axis=1) + 0.5 * curvature)


def _damping(
    damping: np.ndarray, growth: np.ndarray, better: np.ndarray, gain: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Nielsen's update (Madsen, Nielsen & Tingleff 2004, "Methods for non-linear least squares
    problems", 3.2) of each row's damping and growth factor from the step's gain ratio (actual over
    predicted decrease): a step the quadratic model predicted well (gain near 1) cuts the damping by up
    to 3, a poor one (gain near 0) raises it; each rejection in a row multiplies it by a growth factor
    that doubles. The fixed /3 on success, x2 on rejection it replaced crawled along this law's narrow
    valleys: the 42-point bootstrap refits ran to 400 steps with 10-20% of rows unconverged
    (docs/benchmarks.md, "thirteenth session")."""
    fit = 2.0 * np.clip(np.nan_to_num(gain, nan=1.0), 0.0, 1.0) - 1.0
    taken = damping * np.maximum(1.0 / 3.0, 1.0 - fit**3)
    return np.where(better, taken, damping * growth), np.where(better, 2.0, growth * 2.0)


def starts(y: np.ndarray) -> list[np.ndarray]:
    """Starting points for the point estimate: two alphas x `GAMMA_STARTS`."""
    e0 = 0.5 * float(np.min(y))
    log_a0 = float(np.log(max(float(np.mean(y)) - e0, 1e-6)))
    return [np.array([log_a0, alpha, np.log(gamma), e0]) for alpha in (0.1, 0.5) for gamma in GAMMA_STARTS]


BATCH_ROWS = 4096  # rows a batch of `solve_many` starts with (problems with the same number of points)
TAIL_ROWS = 256  # a batch down to this many running rows joins the other batches' tails

Problem = tuple[LawInputs, np.ndarray, np.ndarray, np.ndarray | None]  # inputs, targets, starts, weights


def solve_many(
    problems: Sequence[Problem], batch_rows: int = BATCH_ROWS, tail_rows: int = TAIL_ROWS, max_iter: int = 400
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`solve_batch` of each problem, the rows of problems with the same number of points solved in
    shared batches of about `batch_rows` rows (inputs repeated per row): the same result, bit for bit,
    as one call per problem (rows are solved independently).

    A batch runs until `tail_rows` of its rows still run; those slow rows then run on with the tails
    of the other batches (same number of points) in one shared loop: a loop's per-step cost, not its
    rows, dominates once few rows are left, and each batch running on to its slowest row cost most of
    the effective law's report part at 35,000 jobs (docs/benchmarks.md, "thirteenth session")."""
    solved: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros((0, 4)), np.zeros(0))] * len(problems)
    for chunks in _chunks(problems, batch_rows):
        parts = [[problems[i] for i in chunk] for chunk in chunks]
        sizes = [[len(targets) for _, targets, _, _ in part] for part in parts]
        x_out, cost_out = np.empty((sum(map(sum, sizes)), 4)), np.empty(sum(map(sum, sizes)))
        tails, offset = [], 0
        for part, size in zip(parts, sizes, strict=True):
            inputs = _concat_inputs([p[0].per_row(n) for p, n in zip(part, size, strict=True)])
            weights = np.vstack([np.ones_like(t) if w is None else w for _, t, _, w in part])
            x, cost, run = _begin(
                inputs, np.vstack([p[1] for p in part]), np.vstack([p[2] for p in part]), weights
            )
            rows = slice(offset, offset + len(x))
            x_out[rows], cost_out[rows], run.rows = x, cost, run.rows + offset
            tails.append(_advance(run, x_out, cost_out, max_iter, until_rows=tail_rows))
            offset += len(x)
        _advance(_Run.concat(tails), x_out, cost_out, max_iter, until_rows=0)
        bounds = np.cumsum([0, *(n for size in sizes for n in size)])
        for i, lo, hi in zip((i for chunk in chunks for i in chunk), bounds[:-1], bounds[1:], strict=True):
            solved[i] = (x_out[lo:hi], cost_out[lo:hi])
    return solved


def _chunks(problems: Sequence[Problem], batch_rows: int) -> list[list[list[int]]]:
    """Problem indices in batches of about `batch_rows` rows, grouped by the problems' number of points
    (the batches of one group share their tails: `solve_many`)."""
    by_points: dict[int, list[int]] = {}
    for i, (_, targets, _, _) in enumerate(problems):
        by_points.setdefault(targets.shape[1], []).append(i)
    groups = []
    for indices in by_points.values():
        chunks: list[list[int]] = []
        rows = 0
        for i in indices:
            if rows and rows + len(problems[i][1]) > batch_rows:
                rows = 0
            if rows == 0:
                chunks.append([])
            chunks[-1].append(i)
            rows += len(problems[i][1])
        groups.append(chunks)
    return groups


def _concat_inputs(parts: Sequence[LawInputs]) -> LawInputs:
    """Per-row inputs (R_i, n) of several problems as one batch's (sum R_i, n)."""
    return LawInputs(
        np.vstack([p.n_unquantized for p in parts]),
        np.vstack([p.n_quantized for p in parts]),
        np.vstack([p.k for p in parts]),
        float("nan"),  # n_ref differs between groups; solving does not use it
    )


def best_fit(inputs: LawInputs, y: np.ndarray) -> np.ndarray:
    """The point estimate: all `starts` solved at once, the best one polished by `least_squares`."""
    return best_fits([(inputs, y)])[0]


def best_fits(groups: Sequence[tuple[LawInputs, np.ndarray]]) -> list[np.ndarray]:
    """`best_fit` of each (inputs, y), the starts of all of them solved together (`solve_many`)."""
    firsts = [np.array(starts(y)) for _, y in groups]
    problems: list[Problem] = [
        (inputs, np.broadcast_to(y, (len(first), len(y))).copy(), first, None)
        for (inputs, y), first in zip(groups, firsts, strict=True)
    ]
    best = []
    for (inputs, y), (solved, cost) in zip(groups, solve_many(problems), strict=True):
        candidate = solved[int(np.argmin(cost))]
        polished = solve(inputs, y, candidate)
        best.append(polished.x if polished.cost <= float(np.min(cost)) else candidate)
    return best


def refit(
    inputs: LawInputs, targets: np.ndarray, best: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Each target row (weighted by its `weights` row) refit from `best` and from `best` with the
    other `GAMMA_STARTS`; the lowest cost wins. (R, 4).

    gamma is weakly identified (flat once k / gamma is large), so a single local solve can stall on
    a plateau that another start leaves for a lower minimum.
    """
    return refits([(inputs, targets, best, weights)])[0]


Refit = tuple[LawInputs, np.ndarray, np.ndarray, np.ndarray | None]  # inputs, targets, best, weights


def refits(groups: Sequence[Refit]) -> list[np.ndarray]:
    """`refit` of each group, the rows of all of them solved together (`solve_many`)."""
    problems: list[Problem] = []
    shapes = []
    for inputs, targets, best, weights in groups:
        weights = np.ones_like(targets) if weights is None else weights
        # Rows are solved independently, so equal (target, weight) rows -- a bootstrap over a few
        # model sizes redraws the same counts often -- are solved once and scattered back: same
        # result, bit for bit, at a fraction of the work (docs/benchmarks.md, "report at scale").
        unique, inverse = np.unique(np.hstack([targets, weights]), axis=0, return_inverse=True)
        targets, weights = unique[:, : targets.shape[1]], unique[:, targets.shape[1] :]
        tries = [best] + [np.array([*best[:2], np.log(gamma), best[3]]) for gamma in GAMMA_STARTS]
        stacked = np.vstack([np.broadcast_to(start, (len(targets), 4)) for start in tries])
        problems.append(
            (inputs, np.tile(targets, (len(tries), 1)), stacked, np.tile(weights, (len(tries), 1)))
        )
        shapes.append((len(tries), len(targets), inverse.reshape(-1)))
    out = []
    for (solved, cost), (n_tries, rows, inverse) in zip(solve_many(problems), shapes, strict=True):
        pick = np.argmin(cost.reshape(n_tries, rows), axis=0)
        out.append(solved.reshape(n_tries, rows, 4)[pick, np.arange(rows)][inverse])
    return out
