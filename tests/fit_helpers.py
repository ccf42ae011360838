"""``fit_with(model, guide, data, **keywords)``: :func:`pyro_vits.train.fit` with its settings given as keywords,
the :class:`~pyro_vits.train.FitConfig` fields built into the config and the rest passed to ``fit``."""

from __future__ import annotations

import inspect

from pyro_vits.train import FitConfig, fit

FIT_KEYWORDS = frozenset(p.name for p in inspect.signature(fit).parameters.values()
                         if p.kind is inspect.Parameter.KEYWORD_ONLY)


def fit_with(model, guide, data, **keywords):
    """``fit(model, guide, data, FitConfig(**settings), **fit_keywords)``."""
    fit_keywords = {k: keywords.pop(k) for k in FIT_KEYWORDS & keywords.keys()}
    return fit(model, guide, data, FitConfig(**keywords), **fit_keywords)
