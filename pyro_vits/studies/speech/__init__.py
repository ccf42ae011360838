"""The KL-loss variants of the VITS threads trained on speech, and the page that reports them."""

from __future__ import annotations

from .report import KEYS, LABELS, comparisons, render
from .variants import (
    RECONSTRUCTION,
    VARIANTS,
    KLVariantELBO,
    cost_ratios,
    equal_compute_steps,
    mel_l1_error,
    negative_kl_fraction,
    paired_difference,
    reconstruction_error_db,
    summarise,
    t_interval,
    unequal_cost,
    variant_elbo,
)

__all__ = ["LABELS", "KEYS", "comparisons", "render", "VARIANTS", "KLVariantELBO", "variant_elbo", "RECONSTRUCTION", "reconstruction_error_db", "mel_l1_error", "negative_kl_fraction", "t_interval", "summarise", "paired_difference", "cost_ratios", "unequal_cost", "equal_compute_steps"]
