"""Audit a trained VITS generator's KL term on real speech: draws, summary and report."""

from __future__ import annotations

from .draws import (
    BATCH_SIZES,
    COLLAPSE_THRESHOLD,
    REFERENCE,
    AlignedPrior,
    AuditDraws,
    LatentDraws,
    NonFiniteResult,
    check_finite,
    collect,
    draw_latents,
    estimator_names,
    utterance_noise,
)
from .measure import audit, first_non_finite, summarize
from .report import REPORT_FILES, SIGNED, write_report

__all__ = ["COLLAPSE_THRESHOLD", "BATCH_SIZES", "REFERENCE", "estimator_names", "LatentDraws", "NonFiniteResult", "check_finite", "utterance_noise", "draw_latents", "AlignedPrior", "AuditDraws", "collect", "summarize", "first_non_finite", "audit", "REPORT_FILES", "SIGNED", "write_report"]
