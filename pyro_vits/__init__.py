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
    "load_vits_flow": "pyro_vits.vits",
    "FlowPrior": "pyro_vits.distributions",
    "MaskedNormal": "pyro_vits.distributions",
    "VITSPriorModel": "pyro_vits.models",
    "evaluate": "pyro_vits.infer",
    "PosteriorEncoder": "pyro_vits.models",
    "LocalGuide": "pyro_vits.models",
    "ObservationGuide": "pyro_vits.models",
    "ELBOS": "pyro_vits.infer",
    "HybridEntropyELBO": "pyro_vits.infer",
    "STL_ELBO": "pyro_vits.infer",
    "IWAE_DReG": "pyro_vits.infer",
    "make_elbo": "pyro_vits.infer",
    "kl_estimate": "pyro_vits.kl",
    "vits_kl": "pyro_vits.kl",
    "Batch": "pyro_vits.data.batch",
    "make_teacher": "pyro_vits.models",
    "sample_dataset": "pyro_vits.models",
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
