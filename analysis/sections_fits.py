"""The 'Parametric fits' section: interpolation (leave-one-out), the shared-slope law and the
effective-parameter law, with their intervals, identification and stated replicate rules.

`analysis.parts` runs its two parts (`fit_blocks_shape`, the effective law per run of families) as
separate tasks; `fits_section` gives the same section in one piece.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from analysis.curves import check_sizes
from analysis.fits import FitResult, fit_families, interpolation_loo
from analysis.metrics import metric_label
from analysis.plots_curves import fit_quality_table, plot_fit_quality
from analysis.render import Block, Section
from analysis.sections import MAX_FAMILY_FIGURES, Study


def _fit_blocks(fit: FitResult, label: str, title: str, name: str) -> list[Block]:
    blocks = [Block(gap=f"{r.model_family} / {r.setting}: {r.reason}") for r in fit.skipped.itertuples()]
    if fit.predictions.empty:
        return blocks or [Block(gap=f"{title}: nothing to fit")]
    if not fit.params.empty:
        blocks.append(Block(text=_identification_line(fit.params)))
        blocks.append(Block(table=fit.params, name=f"{title}: parameters with model-level bootstrap 95% CIs"))
    blocks.append(Block(table=fit_quality_table(fit), name=f"{title}: goodness of fit (R² only where "
                                                          "the verdict is ok)"))  # fmt: skip
    blocks.append(Block(figure=plot_fit_quality(fit, label, title), name=name))
    return blocks


FITS_TEXT = (
    "Intervals: model-level bootstrap, {n_boot} replicates. Each replicate draws the fit's model sizes with "
    "replacement (every point of a drawn size), redraws the trained seeds of each size where it has several "
    "(`ladder:<name>+seeds<N>`), and refits, so the intervals "
    "carry what differs between trained models, not only the scatter of points around the curve; with "
    "fewer than 3 sizes no interval is given. 'identified: no' marks a parameter the data do not "
    "determine: its estimate sits at a bound of the fit, lies outside its own interval, or the interval "
    "reaches a bound. log2 is of total model bits."
)
EFFECTIVE_TEXT = (
    "The effective-parameter law fit here: L = A·(N_u + N_q·(1 − e^(−k/γ)))^(−α) + E, where N_q counts "
    "the parameters in quantized matrices (n_quantized_params) and N_u = N − N_q those left in 16 bits "
    "(embeddings, norms, LM head, proxy columns): only the quantized part shrinks with fewer bits k, and "
    "the 16-bit baseline has N_eff = N. This is Kumar et al.'s (2024) effective-parameter form for "
    "training in low precision, N·(1 − e^(−P/γ)), restricted to the quantized parameters; it is not "
    "their post-training form, which adds δ_PTQ = C_T·(D^γ_D/N^γ_N)·e^(−P/γ_post) to the 16-bit loss "
    "and grows with training tokens D (fit in the section 'Training tokens' where a study has members "
    "at several token counts)."
)


def _identification_line(params: pd.DataFrame) -> str:
    """How many parameters are not identified, per parameter name."""
    unidentified = params[~params["identified"].astype(bool)]
    if unidentified.empty:
        return f"Every one of the {len(params)} parameters is identified (none at a bound or outside its CI)."
    per_param = unidentified.groupby("param").size()
    counts = ", ".join(f"{name} in {n}" for name, n in per_param.items())
    n_fits = params.groupby(["model_family", "setting"]).ngroups
    return (
        f"Not identified: {len(unidentified)} of {len(params)} parameters ({counts}, of {n_fits} fits); "
        "see the 'note' column."
    )


def fits_section(study: Study) -> Section:
    """Interpolation (leave-one-out), shared-slope law, and the effective-parameter law on the loss."""
    return Section("Parametric fits", tuple(fit_blocks_shape(study) + fit_blocks_effective(study)))


SCALE_FIT_BOOT = 200  # replicates of each parametric fit in a study of more than MAX_FAMILY_FIGURES families
SCALE_FIT_TEXT = (
    " This study has more than {families} model families, so each fit's intervals use {n_boot} replicates "
    "rather than {asked} (one bounded least-squares refit per replicate, fit and family is the report's "
    "largest cost): the same model-level bootstrap, with more Monte Carlo error in the interval ends "
    "(a percentile interval's ends rest on the 5 most extreme replicates of 200), not a narrower interval; "
    "--n-boot sets the count for studies up to {families} families."
)


def fit_replicates(study: Study) -> int:
    """Bootstrap replicates of each parametric fit: `n_boot`, at most `SCALE_FIT_BOOT` once the study
    has more than `MAX_FAMILY_FIGURES` families (a stated rule, like the combined curve figure)."""
    families = 0 if study.tidy is None else study.tidy["model_family"].nunique()
    return min(study.n_boot, SCALE_FIT_BOOT) if families > MAX_FAMILY_FIGURES else study.n_boot


def fit_blocks_shape(study: Study) -> list[Block]:
    """The first part of 'Parametric fits': interpolation (leave-one-out) and the shared-slope law."""
    study.require_tidy()
    assert study.metric is not None
    points = study.curve_points(study.metric)
    check_sizes(points)
    label = metric_label(study.metric)
    n_boot = fit_replicates(study)
    text = FITS_TEXT.format(n_boot=n_boot)
    if n_boot < study.n_boot:
        text += SCALE_FIT_TEXT.format(families=MAX_FAMILY_FIGURES, n_boot=n_boot, asked=study.n_boot)
    if len(study_families(study)) > 1:
        text += (" Each family is fit on its own, its replicates drawn from the same seed as every other "
                 "family's (common random numbers, as in the paired comparisons).")  # fmt: skip
    blocks = [Block(text=text)]
    blocks += _fit_blocks(
        interpolation_loo(points), label, "Interpolation, leave-one-out", "fit-interpolation"
    )
    shared = fit_families(points, "shared_slope", study_families(study), n_boot, study.seed)
    blocks += _fit_blocks(shared, label, f"Shared slope: {label} = a_k + b·log2(bits)", "fit-shared-slope")
    return blocks


def fit_blocks_effective(study: Study) -> list[Block]:
    """The second part of 'Parametric fits': the effective-parameter law on the loss (the costliest
    part of the report: a bounded least-squares refit per bootstrap replicate and fit)."""
    return effective_blocks(study, effective_fit(study, study_families(study)))


def study_families(study: Study) -> list[str]:
    """The study's model families, sorted (the order of every per-family table and figure)."""
    return sorted(study.require_tidy()["model_family"].dropna().unique())


def effective_fit(study: Study, families: Sequence[str]) -> FitResult | None:
    """The effective-parameter law fit to the loss of `families` (None: the study has no loss). Each
    family is fit on its own (`fit_families`), so parts of the families can be fit in parallel."""
    study.require_tidy()
    if study.loss is None:
        return None
    points = study.curve_points(study.loss)  # a family's points do not depend on the other families'
    loss_points = points[points["model_family"].isin(families)].reset_index(drop=True)
    return fit_families(loss_points, "effective_params", families, fit_replicates(study), study.seed)


def effective_blocks(study: Study, law: FitResult | None) -> list[Block]:
    """The effective-parameter law's text, tables and figure (a gap without a loss)."""
    if study.loss is None or law is None:
        return [Block(gap="effective-parameter law: no perplexity text set, so no loss to fit")]
    title = "Effective parameters: L = A·(N_u + N_q·(1 − e^(−k/γ)))^(−α) + E"
    return [
        Block(text=EFFECTIVE_TEXT),
        *_fit_blocks(law, metric_label(study.loss), title, "fit-effective-params"),
    ]
