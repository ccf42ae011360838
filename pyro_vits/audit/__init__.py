"""Audit a trained VITS generator's KL term on real speech: draws, summary and report."""

from __future__ import annotations

from .draws import (
    BATCH_SIZES,
    COLLAPSE_THRESHOLD,
    REFERENCE,
    AlignedPrior,
    AuditDraws,
    LatentDraws,
    collect,
    draw_latents,
    estimator_names,
    utterance_noise,
)
from .measure import audit, summarize
from .report import REPORT_FILES, SIGNED, write_report

__all__ = ["COLLAPSE_THRESHOLD", "BATCH_SIZES", "REFERENCE", "estimator_names", "LatentDraws", "utterance_noise", "draw_latents", "AlignedPrior", "AuditDraws", "collect", "summarize", "audit", "REPORT_FILES", "SIGNED", "write_report"]
