"""The KL-estimator study behind ``docs/kl_estimators.md``: every number quoted there is computed here.

Each ``*_study(config, ...)`` returns a :class:`Sweep`: ``results``, a JSON-able dict of numbers with their
Monte-Carlo standard errors (ArviZ's, seeds as chains) and normalisations, plus the sweep's InferenceData
(draws ``(seed, draw, ...)``) and ``az.summary`` tables; :func:`run_study` runs them all and writes them,
:func:`publish_docs` renders the write-up (:func:`refresh_docs` re-renders it after rerunning only the cheap
parts). Modules: ``config`` (sizes, presets, TOML), ``common``,
one per question's sweep (``quality``, ``negative``, ``variance``, ``fixes``, ``flowfacts``, ``training``,
``snr``), ``report`` (run, figures, publishing), ``template`` and ``app`` (the ``pyro-vits study`` command).

Normalisations used in every result: *per utterance* = nats summed over an utterance's valid ``(C, T)``
elements; *per frame* = nats per valid frame, channels summed (VITS's ``kl_loss``); *per element*.
The 2-D settings have one frame of two channels per utterance, so per utterance = per frame there.
"""

from __future__ import annotations

from .common import Sweep
from .config import PRESETS, StudyConfig, load_config
from .fixes import (
    FIXES,
    fix_gradient_study,
    gradient_geometry,
    gradient_identity,
    locate_crossing,
    near_convergence_gradients,
    sigma_optimum_study,
)
from .flowfacts import cos_density_grid, logdet_study
from .negative import (
    exact_tail,
    negative_batch_study,
    one_utterance_tail,
    refresh_exact_tails,
    regime_profile,
    regime_study,
    skew_example,
)
from .quality import QUALITY_ESTIMATORS, estimator_quality_study
from .report import DOCS_TABLES, FIGURES, REFRESHED, publish_docs, redraw_figures, refresh_docs, run_study
from .snr import PARAM_GROUPS, SNR_ELBOS, SNR_NOISE, dreg_linear_gaussian_study, snr_study
from .template import render_markdown
from .training import prior_kl_to_teacher, student, timing_study, training_data, training_study
from .variance import variance_ratio_study

__all__ = [
    "StudyConfig", "PRESETS", "load_config", "Sweep", "QUALITY_ESTIMATORS", "estimator_quality_study",
    "negative_batch_study", "exact_tail", "regime_profile", "regime_study", "variance_ratio_study", "FIXES",
    "fix_gradient_study", "sigma_optimum_study", "gradient_identity", "logdet_study", "cos_density_grid",
    "training_data", "student", "prior_kl_to_teacher", "training_study", "timing_study", "SNR_ELBOS",
    "PARAM_GROUPS", "SNR_NOISE", "snr_study", "dreg_linear_gaussian_study", "FIGURES", "run_study",
    "render_markdown", "DOCS_TABLES", "publish_docs", "redraw_figures", "one_utterance_tail", "skew_example",
    "refresh_exact_tails", "gradient_geometry", "near_convergence_gradients", "locate_crossing", "REFRESHED",
    "refresh_docs",
]
