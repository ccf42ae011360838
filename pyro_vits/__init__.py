"""pyro_vits: the VITS prior/posterior as a Pyro probabilistic program.

The main names are importable from here (each loaded from its module on first use, so that
``import pyro_vits`` stays light)::

    from pyro_vits import FlowPrior, VITSPriorModel, PosteriorEncoder, fit, make_teacher, sample_dataset
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("pyro_vits")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

_EXPORTS: dict[str, str] = {
    "ResidualCouplingBlock": "pyro_vits.flows",
    "load_vits_flow": "pyro_vits.flows",
    "FlowPrior": "pyro_vits.prior",
    "MaskedNormal": "pyro_vits.prior",
    "VITSPriorModel": "pyro_vits.model",
    "evaluate": "pyro_vits.model",
    "PosteriorEncoder": "pyro_vits.guide",
    "LocalGuide": "pyro_vits.guide",
    "ObservationGuide": "pyro_vits.guide",
    "ELBOS": "pyro_vits.elbo",
    "HybridEntropyELBO": "pyro_vits.elbo",
    "STL_ELBO": "pyro_vits.elbo",
    "IWAE_DReG": "pyro_vits.elbo",
    "make_elbo": "pyro_vits.elbo",
    "kl_estimate": "pyro_vits.estimators",
    "vits_kl": "pyro_vits.estimators",
    "Batch": "pyro_vits.data.batch",
    "make_teacher": "pyro_vits.data.teacher",
    "sample_dataset": "pyro_vits.data.teacher",
    "FitConfig": "pyro_vits.train",
    "FitResult": "pyro_vits.train",
    "NonFiniteError": "pyro_vits.train",
    "fit": "pyro_vits.train",
    "load_checkpoint": "pyro_vits.train",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pyro_vits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
