"""Diagnostics of variational estimators: gradient mean, variance and signal-to-noise ratio; ArviZ
InferenceData of runs and sweeps (via :mod:`pyro_vits._arviz_compat`), summaries and PSIS k-hat."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer import ELBO, Predictive
from pyro.infer.importance import vectorized_importance_weights
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .. import _arviz_compat
from .. import _rundir as rundir
from .._io import atomic_write
from .._validate import check_positive_ints

__all__ = [
    "finish_run",
    "GradientStats",
    "gradient_stats",
    "KHAT_THRESHOLDS",
    "trace_arrays",
    "run_to_inference_data",
    "sweep_to_inference_data",
    "summary_table",
    "markdown_table",
    "write_summary",
    "guide_samples",
    "utterance_log_weights",
    "psis_khat_per_utterance",
    "khat_counts",
    "write_run_inference_data",
]

ParamSelector = str | Callable[[str], bool]


@dataclass(frozen=True)
class GradientStats:
    """Statistics of one parameter group's loss gradient over ``num_repeats`` independent estimates.

    Arrays are over the group's ``P`` flattened coordinates (parameters in ``names`` order, each flattened
    row-major, gradients w.r.t. the param store's *unconstrained* values, of the loss = ``-ELBO``):
    ``mean``, ``variance`` (ddof=1), ``mcse = sqrt(variance / num_repeats)`` and ``snr = |mean| / std``
    (``inf`` where the variance is 0 and the mean is not, ``nan`` where both are). Scalars:
    ``mean_snr``: mean of ``snr`` over coordinates with positive variance (``nan`` if none);
    ``mean_norm = ||mean||``; ``total_variance = sum(variance)`` (trace of the covariance);
    ``norm_snr = mean_norm / sqrt(total_variance)``, the SNR of the gradient as a vector.
    """

    names: tuple[str, ...]
    num_repeats: int
    mean: np.ndarray
    variance: np.ndarray
    mcse: np.ndarray
    snr: np.ndarray
    mean_snr: float
    mean_norm: float
    total_variance: float
    norm_snr: float


def _matcher(selector: ParamSelector, group: str) -> Callable[[str], bool]:
    if isinstance(selector, str):
        return lambda name: name.startswith(selector)
    if callable(selector):
        return selector
    raise TypeError(f"param_groups[{group!r}] must be a name prefix (str) or a predicate, got {selector!r}")


def _flat_grad(param: torch.Tensor) -> np.ndarray:
    grad = torch.zeros_like(param) if param.grad is None else param.grad
    return grad.detach().cpu().double().numpy().ravel()


def _stats(names: tuple[str, ...], grads: np.ndarray) -> GradientStats:
    """``grads (R, P)`` -> :class:`GradientStats`."""
    repeats = grads.shape[0]
    mean, variance = grads.mean(0), grads.var(0, ddof=1)
    std = np.sqrt(variance)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.abs(mean) / std
        mean_norm, total_variance = float(np.linalg.norm(mean)), float(variance.sum())
        norm_snr = mean_norm / np.sqrt(total_variance)
    positive = variance > 0
    mean_snr = float(snr[positive].mean()) if positive.any() else float("nan")
    return GradientStats(
        names, repeats, mean, variance, np.sqrt(variance / repeats), snr, mean_snr, mean_norm, total_variance,
        float(norm_snr),
    )


def gradient_stats(
    model: Callable,
    guide: Callable,
    elbo: ELBO,
    *args: Any,
    num_repeats: int,
    param_groups: Mapping[str, ParamSelector],
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, GradientStats]:
    """Run ``elbo.loss_and_grads(model, guide, *args, **kwargs)`` ``num_repeats`` times (parameters fixed,
    fresh samples each time) and summarise each group's gradient (:class:`GradientStats`).

    ``param_groups`` maps a group name to a Pyro param-store name prefix or a predicate on names (e.g.
    ``{"flow": "flow$$$", "guide": lambda n: n.startswith("m_q")}``); a parameter may be in several groups.
    Comparing ``elbo``s with 1 and K particles measures what K buys. Parameters are created on the first
    call if needed; a parameter that gets no gradient in a repeat counts as 0. The torch RNG is seeded
    with ``seed`` inside a forked RNG state (the global state is left as it was) and the ``.grad`` of
    param-store tensors is reset to None on return.
    """
    if not isinstance(num_repeats, int) or num_repeats < 2:
        raise ValueError(f"num_repeats must be an int >= 2, got {num_repeats!r}")
    if not isinstance(param_groups, Mapping) or not param_groups:
        raise TypeError("param_groups must be a non-empty mapping of group name -> prefix or predicate")
    matchers = {group: _matcher(selector, group) for group, selector in param_groups.items()}
    store = pyro.get_param_store()
    rows: list[dict[str, np.ndarray]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(num_repeats):
            for _, param in store.named_parameters():
                param.grad = None
            elbo.loss_and_grads(model, guide, *args, **kwargs)
            rows.append({name: _flat_grad(p) for name, p in store.named_parameters()})
    for _, param in store.named_parameters():
        param.grad = None
    result = {}
    for group, matches in matchers.items():
        names = tuple(name for name in rows[-1] if matches(name))
        if not names:
            raise ValueError(f"param_groups[{group!r}] matches no parameter of {list(rows[-1])}")
        grads = np.stack(
            [np.concatenate([row.get(n, np.zeros_like(rows[-1][n])) for n in names]) for row in rows]
        )
        result[group] = _stats(names, grads)
    return result


# ---------------------------------------------------------------------------------------------------------
# ArviZ: runs and sweeps as InferenceData, summaries, PSIS k-hat per utterance
# ---------------------------------------------------------------------------------------------------------

KHAT_THRESHOLDS = (0.5, 0.7)
"""PSIS k-hat thresholds (Vehtari et al. 2024): ``< 0.5`` good, ``0.5-0.7`` usable, ``> 0.7`` unreliable."""


def trace_arrays(
    traces: Sequence[Sequence[Mapping[str, float]]], keys: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Logged records per chain (e.g. per seed, each the ``metrics.jsonl`` records of one run) ->
    ``{key: (chain, draw)}``, draws truncated to the shortest chain. ``keys`` defaults to the numeric keys
    present in every record."""
    if not traces or not all(len(chain) for chain in traces):
        raise ValueError("traces must be a non-empty sequence of non-empty sequences of records")
    if keys is None:
        keys = [k for k, v in traces[0][0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    missing = sorted({k for chain in traces for rec in chain for k in keys if k not in rec})
    if missing:
        raise ValueError(f"keys {missing} are missing from some records")
    draws = min(len(chain) for chain in traces)
    return {key: np.array([[rec[key] for rec in chain[:draws]] for chain in traces], dtype=float)
            for key in keys}


def run_to_inference_data(
    traces: Sequence[Sequence[Mapping[str, float]]],
    *,
    keys: Sequence[str] | None = None,
    posterior: Mapping[str, np.ndarray] | None = None,
    observed_data: Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, list[str]] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Any:
    """InferenceData of one training configuration run under several seeds.

    ``sample_stats``: the logged traces (:func:`trace_arrays`; chains = seeds, draws = logged steps, plus a
    ``step`` variable); ``posterior``: e.g. guide samples ``{name: (chain, draw, ...)}`` from
    :func:`guide_samples`; ``observed_data``: arrays without chain/draw dims; ``config``: JSON attributes.
    """
    groups: dict[str, Mapping[str, np.ndarray]] = {"sample_stats": trace_arrays(traces, keys)}
    if posterior:
        groups["posterior"] = posterior
    return _arviz_compat.make_inference_data(groups, observed_data, attrs=config, dims=dims)


def sweep_to_inference_data(
    draws: Mapping[str, np.ndarray],
    *,
    dims: Mapping[str, list[str]] | None = None,
    coords: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Any:
    """InferenceData of a sweep: ``draws`` maps a quantity to ``(seed, draw, ...)`` (chains = seeds, draws =
    independent replicates), stored in ``posterior``; ``config`` (e.g. the truths) as JSON attrs."""
    if not draws:
        raise ValueError("draws must map at least one name to a (seed, draw, ...) array")
    bad = {k: np.shape(v) for k, v in draws.items() if np.ndim(v) < 2}
    if bad:
        raise ValueError(f"every array in draws must have shape (seed, draw, ...), got {bad}")
    return _arviz_compat.make_inference_data({"posterior": draws}, attrs=config, dims=dims, coords=coords)


def summary_table(
    idata: Any, group: str = "posterior", tail_fraction: float = 1.0, var_names: Sequence[str] | None = None
) -> pd.DataFrame:
    """``az.summary`` (mean, sd, MCSE, ESS, R-hat) of one group's ``var_names`` (default all) over its last
    ``tail_fraction`` of draws (e.g. 0.5 for the stationary end of training traces)."""
    if not 0.0 < tail_fraction <= 1.0:
        raise ValueError(f"tail_fraction must be in (0, 1], got {tail_fraction!r}")
    data = _arviz_compat.group(idata, group)
    if var_names is not None:
        missing = sorted(set(var_names) - set(data.data_vars))
        if missing:
            raise ValueError(f"var_names {missing} are not in group {group!r}")
        data = data[list(var_names)]
    draws = data.sizes["draw"]
    tail = data.isel(draw=slice(max(0, draws - max(4, round(tail_fraction * draws))), None))
    with warnings.catch_warnings():
        # a short run (one chain, a few logged steps) has no ESS/R-hat: ArviZ returns NaN, numpy warns
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="numpy")
        return _arviz_compat.summary(tail)


def markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-markdown table of ``frame`` (index as the first column, floats to ``digits`` significant)."""
    check_positive_ints(digits=digits)

    def cell(value: Any) -> str:
        return f"{value:.{digits}g}" if isinstance(value, (float, np.floating)) else str(value)

    header = [str(frame.index.name or "")] + [str(c) for c in frame.columns]
    rows = [[str(idx)] + [cell(v) for v in row]
            for idx, row in zip(frame.index, frame.itertuples(index=False))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def write_summary(frame: pd.DataFrame, stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``frame`` to ``<stem>.csv`` and ``<stem>.md`` (each atomically); returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv, md = stem.with_suffix(".csv"), stem.with_suffix(".md")
    atomic_write(csv, lambda f: frame.to_csv(f))
    atomic_write(md, lambda f: f.write(markdown_table(frame)))
    return csv, md


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's RNG inside a forked CPU RNG state (CUDA generators are seeded, not restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def guide_samples(
    model: Callable, guide: Callable, *args: Any, num_samples: int, seed: int = 0,
    sites: Sequence[str] = ("z",), **kwargs: Any,
) -> dict[str, np.ndarray]:
    """Draws of the guide's latent ``sites`` via ``pyro.infer.Predictive`` (vectorised):
    ``{site: (num_samples, *site_shape)}`` as float64 numpy. Seeded; the global RNG is left untouched."""
    check_positive_ints(num_samples=num_samples)
    predictive = Predictive(model, guide=guide, num_samples=num_samples, return_sites=list(sites),
                            parallel=True)
    with _seeded(seed), torch.no_grad():
        samples = predictive(*args, **kwargs)
    return {name: samples[name].detach().cpu().double().numpy() for name in sites}


def utterance_log_weights(
    model: Callable, guide: Callable, *args: Any, num_samples: int, seed: int = 0, **kwargs: Any
) -> Tensor:
    """Importance log-weights ``log p(x, z_s) - log q(z_s)`` per position of the model's outermost plate
    (dim -1, e.g. utterances), ``z_s ~ guide``: ``(num_samples, N)``. Uses Pyro's
    ``vectorized_importance_weights``; model and guide must use at most one plate (dim -1)."""
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    with _seeded(seed), torch.no_grad():
        _, model_trace, guide_trace = vectorized_importance_weights(
            model, guide, *args, num_samples=num_samples, max_plate_nesting=1, **kwargs
        )
    log_w: Tensor | float = 0.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                log_w = log_w + sign * site["log_prob"]
    log_w = torch.as_tensor(log_w)
    if log_w.dim() != 2 or log_w.shape[0] != num_samples:
        raise ValueError(f"expected log-weights of shape (num_samples, N), got {tuple(log_w.shape)}")
    return log_w


def psis_khat_per_utterance(
    model: Callable, guide: Callable, *args: Any, num_samples: int = 1000, seed: int = 0, **kwargs: Any
) -> np.ndarray:
    """Pareto k-hat (ArviZ's PSIS) of the guide as a proposal for the model's posterior, per utterance:
    ``(N,)``; log-weights from :func:`utterance_log_weights`. Compare with :data:`KHAT_THRESHOLDS`."""
    log_w = utterance_log_weights(model, guide, *args, num_samples=num_samples, seed=seed, **kwargs)
    return _arviz_compat.psis_khat(log_w.T.cpu().double().numpy())


def khat_counts(khat: np.ndarray) -> dict[str, int]:
    """How many k-hats are good (``< 0.5``), ok (``0.5-0.7``), bad (``>= 0.7``)."""
    khat = np.asarray(khat, dtype=float)
    low, high = KHAT_THRESHOLDS
    return {"good": int((khat < low).sum()), "ok": int(((khat >= low) & (khat < high)).sum()),
            "bad": int((khat >= high).sum())}


def write_run_inference_data(
    run_dir: str | os.PathLike,
    model: Callable,
    guide: Callable,
    data: Any,
    *,
    num_samples: int = 200,
    max_utterances: int = 8,
    seed: int = 0,
    log_weights: Tensor | None = None,
) -> Path:
    """Write ``run_dir/inference_data.nc`` and ``run_dir/summary.{csv,md}`` for a finished
    :func:`~pyro_vits.train.fit` run (``config.json`` and ``metrics.jsonl`` in ``run_dir``).

    ``data`` is a :class:`~pyro_vits.data.batch.Batch`; its first ``max_utterances`` utterances get
    ``num_samples`` guide draws of ``z`` in ``posterior`` (one chain; dims ``utterance, channel, frame``),
    their ``x``/``mask`` in ``observed_data`` and their PSIS k-hats in the ``psis_khat`` attribute. The
    logged metrics are ``sample_stats`` (one chain, draws = logged steps); the summary covers the last half
    of the logged steps. ``log_weights``: those utterances' importance log-weights ``(num_samples, N)`` when
    already computed with this ``seed`` (:func:`finish_run`), else computed here. Returns the path of the
    netCDF file.
    """
    run_dir = Path(run_dir)
    metrics_path, config_path = run_dir / rundir.METRICS, run_dir / rundir.CONFIG
    if not metrics_path.exists() or not config_path.exists():
        raise ValueError(f"run_dir must hold {rundir.CONFIG} and {rundir.METRICS} from train.fit, "
                         f"got {run_dir}")
    check_positive_ints(max_utterances=max_utterances)
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{metrics_path} has no records")
    config = json.loads(config_path.read_text())
    subset = data.subset(torch.arange(min(max_utterances, data.n), device=data.x.device))
    z = guide_samples(model, guide, subset, num_samples=num_samples, seed=seed)["z"]
    if log_weights is None:
        log_weights = utterance_log_weights(model, guide, subset, num_samples=num_samples, seed=seed)
    khat = _arviz_compat.psis_khat(log_weights.T.cpu().double().numpy())
    idata = run_to_inference_data(
        [records],
        posterior={"z": z[None]},
        observed_data={"x": subset.x.detach().cpu().numpy(),
                       "mask": subset.mask[:, 0].detach().cpu().numpy()},
        dims={"z": ["utterance", "channel", "frame"], "x": ["utterance", "channel", "frame"],
              "mask": ["utterance", "frame"]},
        config={"config": config, "psis_khat": khat.tolist(), "khat_thresholds": list(KHAT_THRESHOLDS)},
    )
    path = _arviz_compat.save(idata, run_dir / rundir.INFERENCE_DATA)
    keys = [k for k in ("elbo_per_frame", "kl_per_frame", "heldout_elbo_per_frame", "heldout_kl_per_frame")
            if k in records[0]]
    write_summary(summary_table(idata, "sample_stats", 0.5, keys or None), run_dir / rundir.SUMMARY)
    return path


def finish_run(
    run_dir: str | os.PathLike,
    model: Callable,
    guide: Callable,
    data: Any,
    *,
    num_samples: int = 200,
    max_utterances: int = 8,
    seed: int = 0,
) -> Path:
    """Finish a :func:`~pyro_vits.train.fit` run folder the way ``pyro-vits fit`` does: check that the fitted
    model and guide give finite importance weights on ``data`` (a held-out
    :class:`~pyro_vits.data.batch.Batch`), then :func:`write_run_inference_data` (``inference_data.nc``,
    ``summary.{csv,md}``); the figures are :func:`pyro_vits.plots.write_run_figures`'. Pyro's "Encountered
    NaN" warnings are silenced. A diverged run (e.g. ``nan_policy="skip"`` on a run whose every update went
    non-finite) raises ``FloatingPointError`` (one line, exit code 1 behind the error boundary) before
    anything is written: the run folder keeps config, metrics and checkpoint only. Returns the netCDF path.
    """
    run_dir = Path(run_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)
        subset = data.subset(torch.arange(min(max_utterances, data.n), device=data.x.device))
        log_w = utterance_log_weights(model, guide, subset, num_samples=num_samples, seed=seed)
        if not bool(torch.isfinite(log_w).all()):
            skipped = _last_skipped(run_dir / rundir.METRICS)
            raise FloatingPointError(
                f"training diverged: the fitted model gives non-finite log-weights on the held-out data"
                f"{skipped}; {run_dir} keeps {rundir.CONFIG}, {rundir.METRICS} and {rundir.CHECKPOINT}, no "
                f"{rundir.INFERENCE_DATA}, summary or figures (lower the learning rate)")
        return write_run_inference_data(run_dir, model, guide, data, num_samples=num_samples,
                                        max_utterances=max_utterances, seed=seed, log_weights=log_w)


def _last_skipped(metrics_path: Path) -> str:
    try:
        lines = [line for line in metrics_path.read_text().splitlines() if line.strip()]
        record = json.loads(lines[-1])
        return f" ({record['skipped_steps']} of {record['step']} updates skipped)"
    except (OSError, ValueError, KeyError, IndexError):
        return ""
