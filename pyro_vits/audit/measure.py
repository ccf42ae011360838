"""Audit a trained VITS generator's KL term on real speech.

For every utterance the audit runs VITS's training forward on the latent path: ``enc_p`` on the text,
``enc_q`` on the linear spectrogram, ``K`` draws ``z ~ q``, ``z_p = flow(z)``, monotonic alignment search
per draw and the frame-aligned prior ``N(m_p, exp(logs_p))``; then it evaluates every KL estimator of
:mod:`pyro_vits.kl.estimators` on the same draws. Each draw is a replica of the KL that one VITS training
step logs for that utterance (its own alignment included).

Units: ``*_per_frame`` values are nats per valid spectrogram frame with the latent channels summed (VITS's
normalisation: summed KL over summed frames); per-utterance values are nats. MCSE is the Monte-Carlo
standard error over the ``K`` i.i.d. draws per utterance (the corpus is fixed).

Memory: utterances stream through in batches; per utterance only ``K`` scalars per estimator are kept."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._validate import check_positive_ints
from ..data.filelists import Utterance, open_corpus
from ..data.speech_batches import SpeechConfig, speech_batches
from ..kl import prob_negative, prob_negative_normal_approx
from ..vits import VITSGenerator
from .draws import (
    BATCH_SIZES,
    COLLAPSE_THRESHOLD,
    REFERENCE,
    AuditDraws,
    NonFiniteResult,
    _check_particles,
    collect,
)
from .report import _check_out, _peak_memory_mb, write_report


def _per_frame_stats(x: np.ndarray, frames: np.ndarray, batch_size: int) -> dict[str, float]:
    """``x (N, K)`` nats per utterance -> corpus mean per frame, its MCSE, the sd of one draw of one
    utterance's per-frame value (pooled over utterances) and of VITS's batch loss at ``batch_size``."""
    n, k = x.shape
    total = frames.sum()
    var_draw = x.var(1, ddof=1)
    batch_var = [
        (x[start : start + batch_size].sum(0) / frames[start : start + batch_size].sum()).var(ddof=1)
        for start in range(0, n, batch_size)
    ]
    return {
        "mean": float(x.mean(1).sum() / total),
        "mcse": float(math.sqrt(var_draw.sum() / k) / total),
        "sd": float(math.sqrt(np.mean(var_draw / frames**2))),
        "sd_batch": float(math.sqrt(np.mean(batch_var))),
    }


def _prob_negative(x: np.ndarray, sizes: Sequence[int], rng: np.random.Generator, replicas: int) -> dict:
    """P(sum of ``size`` one-draw utterance estimates < 0) = P(VITS's batch loss < 0): measured on random
    batches (utterances drawn with replacement, one of the K draws each) and by the normal approximation."""
    n, k = x.shape
    mu, sigma = float(x.mean()), float(x.std(ddof=1))
    out = {}
    for size in sizes:
        if size == 1:
            p, se, count = *prob_negative(x), x.size
        else:
            rows, cols = rng.integers(n, size=(replicas, size)), rng.integers(k, size=(replicas, size))
            p, se = prob_negative(x[rows, cols].sum(1))
            count = replicas
        predicted = float(prob_negative_normal_approx(mu, sigma, size)) if sigma > 0 else float(mu < 0)
        out[str(size)] = {
            "measured": p,
            "measured_se": se,
            "predicted": predicted,
            "upper_95": 1 - 0.05 ** (1 / count) if p == 0 else None,
            "batches": count,
        }
    return out


def _skewness(x: np.ndarray) -> float:
    centred = x - x.mean()
    sd = centred.std()
    return float((centred**3).mean() / sd**3) if sd > 0 else 0.0


def summarize(
    draws: AuditDraws, batch_sizes: Sequence[int] = BATCH_SIZES, seed: int = 0, replicas: int = 20000
) -> dict[str, Any]:
    """The report dict (JSON-able; see docs/audit.md for every field)."""
    frames, estimates = draws.arrays()
    total, k, batch_size = frames.sum(), draws.particles, draws.batch_size
    kl = {name: _per_frame_stats(x, frames, batch_size) for name, x in estimates.items()}
    vits = kl["vits"]
    kl[f"vits_mean_of_{k}"] = {
        **vits,
        "sd": vits["sd"] / math.sqrt(k),
        "sd_batch": vits["sd_batch"] / math.sqrt(k),
    }
    channel_kl = draws.channel_kl / total
    sizes = sorted(set(batch_sizes) | {batch_size})
    rng = np.random.default_rng(seed)
    negative = {name: _prob_negative(x, sizes, rng, replicas) for name, x in estimates.items()}
    report = {
        "utterances": int(frames.size),
        "frames": int(total),
        "particles": k,
        "batch_size": batch_size,
        "kl_per_frame": kl,
        "channels": {
            "log_scale_ratio": (draws.channel_log_ratio / total).tolist(),
            "kl_per_frame": channel_kl.tolist(),
            "kl_per_frame_mcse": (np.sqrt(draws.channel_kl_var / k) / total).tolist(),
            "collapse_threshold": COLLAPSE_THRESHOLD,
        },
        "collapsed_fraction": float(np.mean(channel_kl < COLLAPSE_THRESHOLD)),
        "prob_negative": negative["vits"],
        "prob_negative_by_estimator": negative,
        "skewness_per_utterance": _skewness(estimates["vits"] / frames[:, None]),
        "alignment_agreement": draws.same_token / draws.compared,
    }
    if "gaussian_closed_form" in estimates and REFERENCE in estimates:
        diff = _per_frame_stats(estimates["gaussian_closed_form"] - estimates[REFERENCE], frames, batch_size)
        reference = kl[REFERENCE]["mean"]
        report["gaussian_closed_form_error"] = {
            "mean": diff["mean"],
            "mcse": diff["mcse"],
            "reference": REFERENCE,
            "relative": diff["mean"] / reference if reference else None,
        }
    return report


def first_non_finite(value: Any, path: str = "") -> str | None:
    """The dotted key of the first NaN/inf float in a JSON-like ``value`` (dicts, lists, numbers), else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, Mapping):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = first_non_finite(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def audit(
    generator: VITSGenerator,
    data: str | os.PathLike | Iterable[Utterance],
    batch_size: int = 16,
    particles: int = 8,
    seed: int = 0,
    *,
    speech_config: SpeechConfig | None = None,
    data_root: str | os.PathLike | None = None,
    max_utterances: int | None = None,
    device: torch.device | str = "cpu",
    batch_sizes: Sequence[int] = BATCH_SIZES,
    chunk_size: int = 8,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Audit ``generator``'s KL on ``data`` (a filelist, an LJSpeech folder or an iterable of
    :class:`~pyro_vits.data.filelists.Utterance`); returns the report dict (see :func:`summarize`).

    ``batch_size``: VITS's training batch size (``sd_batch`` and P(negative) refer to it; consecutive
    utterances form the batches); ``particles``: draws of ``z`` per utterance (>= 2, for the MCSE); ``seed``
    fixes every draw; ``speech_config``: the audio/text settings (VITS ``data`` section; required);
    ``chunk_size``: utterances processed at once (memory grows with ``chunk_size * particles`` and the longest
    utterance; results do not depend on it);
    ``out``: also write report.json, report.md, figures and audit.nc there (:func:`write_report`);
    ``extra``: more JSON-able fields for the report (e.g. the inputs' paths; its ``checkpoint`` names the
    generator in errors). Raises :class:`~pyro_vits.audit.draws.NonFiniteResult` (nothing written) when a
    quantity is NaN/inf or ``enc_q``'s scale underflows to 0, naming it, the part and the utterance.
    """
    if not isinstance(generator, VITSGenerator):
        raise TypeError(
            f"generator must be a VITSGenerator (load_vits_generator), got {type(generator).__name__}"
        )
    if generator.enc_q is None:
        raise ValueError("the generator has no enc_q (posterior encoder): the audit draws z from it")
    if not isinstance(speech_config, SpeechConfig):
        raise ValueError("speech_config is required (SpeechConfig.from_vits_config(config))")
    check_positive_ints(batch_size=batch_size, chunk_size=chunk_size)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _check_particles(particles)
    for size in batch_sizes:
        check_positive_ints(batch_sizes=size)
    if speech_config.n_freq != generator.config["spec_channels"]:
        raise ValueError(
            f"speech_config gives {speech_config.n_freq} spectrogram channels (filter_length // 2 + 1), the "
            f"generator's enc_q expects {generator.config['spec_channels']}"
        )
    if len(speech_config.symbols) > generator.config["n_vocab"]:
        raise ValueError(
            f"the symbol table has {len(speech_config.symbols)} symbols, the generator's enc_p "
            f"{generator.config['n_vocab']}: they do not belong together"
        )
    if out is not None:
        _check_out(Path(out), overwrite)
    utterances = open_corpus(data, data_root) if isinstance(data, (str, os.PathLike)) else data
    start = time.perf_counter()
    training = generator.training
    generator.eval()
    try:
        batches = speech_batches(utterances, speech_config, chunk_size, max_utterances=max_utterances)
        draws = collect(
            generator.to(device),
            batches,
            batch_size=batch_size,
            particles=particles,
            seed=seed,
            device=device,
        )
        report = summarize(draws, batch_sizes, seed)
        bad = first_non_finite(report)
        if bad is not None:
            raise NonFiniteResult(f"the report's {bad} is not finite; the audit stops, no report is written",
                                  "summary")
    except NonFiniteResult as err:
        if extra and "checkpoint" in extra:  # name the file the generator came from
            raise NonFiniteResult(f"{extra['checkpoint']}: {err}", err.part, err.source) from err
        raise
    finally:
        generator.train(training)
    report.update(
        seed=seed,
        device=str(device),
        wall_s=time.perf_counter() - start,
        **_peak_memory_mb(device),
        generator=generator.config,
        **dict(extra or {}),
    )
    if out is not None:
        write_report(report, draws, out, overwrite=overwrite)
    return report
