"""The one module that knows which ArviZ version is installed (0.2x on Python 3.11, 1.x on >= 3.12).

Only the portable core is used: ``convert_to_dataset``, ``ess``/``rhat``/``mcse`` with an explicit
``method``, ``summary(round_to="none")``, PSIS smoothing, and netCDF round trips (``h5netcdf``).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

with warnings.catch_warnings():
    # arviz 0.2x announces its 1.x refactor with a FutureWarning at import; nothing to act on here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="arviz")
    import arviz as az

__all__ = [
    "ARVIZ_MAJOR",
    "make_inference_data",
    "save",
    "load",
    "group",
    "group_names",
    "ess",
    "rhat",
    "mcse",
    "summary",
    "psis",
    "psis_khat",
]

ARVIZ_MAJOR = int(az.__version__.split(".")[0])


def _float64(values: Any) -> np.ndarray:
    arr = np.asarray(values)
    return arr.astype(np.float64) if np.issubdtype(arr.dtype, np.floating) else arr


def _json_attrs(attrs: Mapping[str, Any] | None) -> dict[str, str]:
    return {key: json.dumps(value, default=str, sort_keys=True) for key, value in (attrs or {}).items()}


def make_inference_data(
    sampled: Mapping[str, Mapping[str, Any]],
    observed_data: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
    dims: Mapping[str, list[str]] | None = None,
    coords: Mapping[str, Any] | None = None,
) -> Any:
    """Build an InferenceData (0.x) / DataTree (1.x).

    ``sampled`` maps a group name (``posterior``, ``sample_stats``, ...) to ``{var: array (chain, draw, ...)}``;
    ``observed_data`` maps a variable to an array without chain/draw dims (dims from ``dims`` or
    ``<var>_dim_i``). Floats are stored as float64; ``attrs`` values are stored as JSON strings.
    """
    if not isinstance(sampled, Mapping):
        raise TypeError(f"sampled must be a mapping of group -> variables, got {type(sampled).__name__}")
    json_attrs = _json_attrs(attrs)
    groups: dict[str, xr.Dataset] = {}
    for name, variables in sampled.items():
        data = {key: _float64(value) for key, value in variables.items()}
        groups[name] = az.convert_to_dataset(data, coords=coords, dims=dims)
    if observed_data:
        obs = {}
        for key, value in observed_data.items():
            arr = _float64(value)
            var_dims = list((dims or {}).get(key, [f"{key}_dim_{i}" for i in range(arr.ndim)]))
            obs[key] = (var_dims, arr)
        groups["observed_data"] = xr.Dataset(obs, coords={k: v for k, v in (coords or {}).items()})
    for ds in groups.values():
        ds.attrs.update(json_attrs)
    if ARVIZ_MAJOR < 1:
        return az.InferenceData(**groups)
    return xr.DataTree.from_dict({f"/{name}": ds for name, ds in groups.items()})


def save(idata: Any, path: str | Path) -> Path:
    """Write to netCDF with the h5netcdf engine; returns the path.

    Written to a temporary file beside ``path`` and renamed, so a failed write leaves no half-written file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        idata.to_netcdf(str(tmp), engine="h5netcdf")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(path: str | Path) -> Any:
    """Read an InferenceData / DataTree written by :func:`save`."""
    if not Path(path).exists():
        raise ValueError(f"path does not exist: {path}")
    return az.from_netcdf(str(path), engine="h5netcdf")


def group_names(idata: Any) -> list[str]:
    """Names of the groups present."""
    return list(idata.groups()) if ARVIZ_MAJOR < 1 else [str(k) for k in idata.children]


def group(idata: Any, name: str) -> xr.Dataset:
    """One group as an ``xarray.Dataset``."""
    names = [n.strip("/") for n in group_names(idata)]
    if name not in names:
        raise ValueError(f"no group {name!r}; groups are {names}")
    node = idata[name]
    return node if isinstance(node, xr.Dataset) else node.to_dataset()


class _DropShapeWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Shape validation failed")


@contextmanager
def _quiet_shape_check() -> Iterator[None]:
    """ArviZ logs "Shape validation failed" for one chain or < 4 draws: R-hat is then undefined (NaN)."""
    # arviz 0.2x logs on its own ``arviz._log`` Logger instance, which logging.getLogger("arviz") does not return
    logger, flt = getattr(az, "_log", logging.getLogger("arviz")), _DropShapeWarning()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def ess(data: xr.Dataset, method: str = "bulk") -> xr.Dataset:
    """Effective sample size over (chain, draw)."""
    with _quiet_shape_check():
        return az.ess(data, method=method)


def rhat(data: xr.Dataset, method: str = "rank") -> xr.Dataset:
    """Rank-normalised split R-hat over (chain, draw)."""
    with _quiet_shape_check():
        return az.rhat(data, method=method)


def mcse(data: xr.Dataset, method: str = "mean") -> xr.Dataset:
    """Monte-Carlo standard error over (chain, draw)."""
    with _quiet_shape_check():
        return az.mcse(data, method=method)


def summary(data: xr.Dataset) -> pd.DataFrame:
    """``az.summary`` unrounded (mean, sd, ESS, R-hat, MCSE columns); R-hat is NaN for a single chain."""
    with _quiet_shape_check():
        return az.summary(data, round_to="none")


MIN_PSIS_SAMPLES = 30
"""Fewest importance samples for which both ArviZ versions fit the Pareto tail (6 tail draws = S/5; with 5,
ArviZ 1.x's tail fit returns NaN because its first-quartile draw is the tail minimum)."""


def _log_normalise(log_weights: np.ndarray) -> np.ndarray:
    top = log_weights.max(axis=-1, keepdims=True)
    return log_weights - (top + np.log(np.exp(log_weights - top).sum(axis=-1, keepdims=True)))


def psis(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed importance sampling of log-weights ``(..., S)`` (last dim = samples).

    Returns ``(smoothed log-weights (..., S) normalised to logsumexp 0 over S, Pareto k-hat (...))``.
    ArviZ 0.2x: ``arviz.psislw(log_weights)``. ArviZ 1.x: ``arviz_stats.base.array_stats.psislw``, whose
    argument is a log-likelihood (it smooths the ratios ``exp(-ary)``, the PSIS-LOO convention), so it is given
    ``-log_weights``. Both fit a generalised Pareto tail to the largest ~``min(S/5, 3 sqrt(S))`` weights (0.2x
    rounds that count up, 1.x down) with different tail-fit priors: on S = 2000 draws their k-hat agree within
    0.025 (tests/test_arviz_compat.py); at small S (tens of draws) they can differ by ~0.1.
    With fewer than :data:`MIN_PSIS_SAMPLES` samples the tail has < 6 weights and cannot be fitted: the weights
    come back normalised but unsmoothed and k-hat is ``inf`` (ArviZ 0.2x's convention for a too-short tail; 1.x raises or gives NaN).
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    if log_weights.ndim < 1 or log_weights.shape[-1] < 5:
        raise ValueError(f"log_weights must have shape (..., S) with S >= 5, got {log_weights.shape}")
    if not np.all(np.isfinite(log_weights)):
        raise ValueError("log_weights must be finite")
    if log_weights.shape[-1] < MIN_PSIS_SAMPLES:  # too few weights to fit a tail
        return _log_normalise(log_weights), np.full(log_weights.shape[:-1], np.inf)
    if ARVIZ_MAJOR < 1:
        smoothed, khat = az.psislw(log_weights)
    else:
        from arviz_stats.base import array_stats  # type: ignore[import-not-found]

        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            smoothed, khat = array_stats.psislw(-log_weights, r_eff=1, axis=-1)
        # 1.x's tail fit gives NaN when the tail weights, divided by the largest, collapse onto their minimum
        # (first quartile == minimum): one weight dominates, the worst case, reported as inf (k-hat > 0.7 "bad")
        khat = np.where(np.isnan(khat), np.inf, khat)
    return _log_normalise(np.asarray(smoothed, dtype=np.float64)), np.asarray(khat, dtype=np.float64)


def psis_khat(log_weights: np.ndarray) -> np.ndarray:
    """Pareto k-hat of importance log-weights ``(..., S)`` (last dim = samples) -> ``(...)``."""
    return psis(log_weights)[1]
