"""VITS's KL term: its estimators, VITS's loss with any of them, and the truths to judge them by."""

from __future__ import annotations

from .estimators import (
    BATCH_REDUCTIONS,
    KL_ESTIMATORS,
    QUADRATIC_ESTIMATORS,
    LogProb,
    analytic_variance,
    analytic_variances,
    batch_kl,
    kl_estimate,
    prob_negative,
    prob_negative_gaussian,
    prob_negative_normal_approx,
    prob_negative_saddlepoint,
    quadratic_form,
    quadrature_kl_2d,
    reference_kl,
    sample_kl_estimates,
    vits_kl,
)
from .loss import draw_posterior, vits_kl_loss

__all__ = ["KL_ESTIMATORS", "QUADRATIC_ESTIMATORS", "BATCH_REDUCTIONS", "LogProb", "vits_kl", "kl_estimate", "sample_kl_estimates", "batch_kl", "quadratic_form", "analytic_variance", "analytic_variances", "reference_kl", "quadrature_kl_2d", "prob_negative", "prob_negative_normal_approx", "prob_negative_gaussian", "prob_negative_saddlepoint", "vits_kl_loss", "draw_posterior"]
