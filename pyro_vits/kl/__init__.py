"""VITS's KL term: its estimators (one registry), VITS's loss with any of them, and the truths to judge them by.

Modules: ``estimators`` (the estimator classes, :data:`ESTIMATORS`, :func:`kl_estimate`), ``quadratic``
(Gaussian-prior quadratic forms and variances), ``reference`` (ground truths), ``negative`` (P(loss < 0)),
``loss`` (VITS's ``kl_loss`` and the drop-in :func:`vits_kl_loss`), ``alignment_gap`` (VITS's per-draw MAS
prior against a fixed alignment and the alignment-marginal prior).
"""

from __future__ import annotations

from ._common import LogProb
from .alignment_gap import (
    AlignmentGap,
    AlignmentLogPriors,
    ThreeFrameExample,
    aligned_log_priors,
    alignment_gap,
    alignment_log_priors,
    log_alignment_count,
    log_sum_alignments,
    posterior_mean_alignment,
    three_frame_example,
)
from .estimators import (
    BATCH_REDUCTIONS,
    ESTIMATORS,
    KL_ESTIMATORS,
    QUADRATIC_ESTIMATORS,
    EstimatorInputs,
    KLEstimator,
    PlotStyle,
    batch_kl,
    kl_estimate,
    names,
    sample_kl_estimates,
)
from .loss import draw_posterior, vits_kl, vits_kl_loss
from .negative import (
    format_negative_count,
    prob_negative,
    prob_negative_gaussian,
    prob_negative_normal_approx,
    prob_negative_saddlepoint,
    prob_negative_upper_bound,
)
from .quadratic import analytic_variance, analytic_variances, quadratic_form
from .reference import quadrature_kl_2d, reference_kl

__all__ = ["ESTIMATORS", "KLEstimator", "EstimatorInputs", "PlotStyle", "names", "KL_ESTIMATORS", "QUADRATIC_ESTIMATORS", "BATCH_REDUCTIONS", "LogProb", "vits_kl", "kl_estimate", "sample_kl_estimates", "batch_kl", "quadratic_form", "analytic_variance", "analytic_variances", "reference_kl", "quadrature_kl_2d", "prob_negative", "prob_negative_normal_approx", "prob_negative_gaussian", "prob_negative_saddlepoint", "prob_negative_upper_bound", "format_negative_count", "vits_kl_loss", "draw_posterior", "AlignmentLogPriors", "log_sum_alignments", "log_alignment_count", "alignment_log_priors", "posterior_mean_alignment", "aligned_log_priors", "AlignmentGap", "alignment_gap", "ThreeFrameExample", "three_frame_example"]
