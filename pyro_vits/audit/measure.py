"""Audit a trained VITS generator's KL term on real speech.

For every utterance the audit runs VITS's training forward on the latent path: ``enc_p`` on the text,
``enc_q`` on the linear spectrogram, ``K`` draws ``z ~ q``, ``z_p = flow(z)``, monotonic alignment search
per draw and the frame-aligned prior ``N(m_p, exp(logs_p))``; then it evaluates every KL estimator of
:mod:`pyro_vits.kl.estimators` on the same draws. Each draw is a replica of the KL that one VITS training
step logs for that utterance (its own alignment included).

Units: ``*_per_frame`` values are nats per valid spectrogram frame with the latent channels summed (VITS's
normalisation: summed KL over summed frames); per-utterance values are nats. MCSE is the Monte-Carlo
standard error over the ``K`` i.i.d. draws per utterance (the corpus is fixed). Batch statistics: the sd
of VITS's batch loss split into draw noise and batch composition; P(batch loss < 0) measured on disjoint
batches of distinct utterances (its SE and zero-count bound count only those independent batches) and
predicted by the saddlepoint of the per-utterance values' empirical distribution (docs/audit.md).

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
from ..kl import prob_negative_normal_approx, prob_negative_saddlepoint
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


def _batch_spread(x: np.ndarray, frames: np.ndarray, batches: np.ndarray) -> dict[str, float]:
    """The spread of VITS's per-frame batch loss ``L(B, k) = sum_{b in B} x[b, k] / sum_{b in B} T_b`` (nats
    per frame) from ``x (N, K)`` nats per utterance, ``frames (N,)`` = ``T`` and ``batches (R, size)``
    utterance indices drawn independently from the corpus (the corpus standing in for the training set):

    - ``sd_batch_draw = sqrt(E_B Var_k(L | B))``, ``Var_k(L | B) = sum_b s_b^2 / (sum_b T_b)^2`` with
      ``s_b^2`` the sample variance of utterance ``b``'s ``K`` draws: the draw noise of the value logged for
      one fixed batch;
    - ``sd_batch_composition = sqrt(Var_B E_k(L | B))``, ``E_k(L | B) = sum_b mu_b / sum_b T_b``: how much the
      batch's expected value moves with the utterances that form it; estimated by the variance over the
      batches of ``sum_b mean_k x[b] / sum_b T_b`` less the draw noise of those means,
      ``E_B sum_b s_b^2 / (K (sum_b T_b)^2)`` (clipped at 0);
    - ``sd_batch_total = sqrt(draw^2 + composition^2)``, the sd of ``L(B, k)`` over random batches and draws
      (law of total variance): the per-step value TensorBoard logs when the batches are random.
    """
    k = x.shape[1]
    t = frames[batches].sum(1)
    draw = x.var(1, ddof=1)[batches].sum(1) / t**2  # (R,) Var_k(L | B)
    expected = x.mean(1)[batches].sum(1) / t  # (R,) estimated E_k(L | B)
    draw_var = float(draw.mean())
    composition = max(float(expected.var(ddof=1)) - draw_var / k, 0.0)
    return {
        "sd_batch_draw": math.sqrt(draw_var),
        "sd_batch_composition": math.sqrt(composition),
        "sd_batch_total": math.sqrt(draw_var + composition),
    }


def _per_frame_stats(x: np.ndarray, frames: np.ndarray, batches: np.ndarray) -> dict[str, float]:
    """``x (N, K)`` nats per utterance, ``frames (N,)`` -> corpus mean per frame, its MCSE, the sd of one draw
    of one utterance's per-frame value (pooled over utterances) and the three batch sds of
    :func:`_batch_spread` for the random batches ``batches (R, size)``; all nats per frame."""
    k = x.shape[1]
    total = frames.sum()
    var_draw = x.var(1, ddof=1)
    return {
        "mean": float(x.mean(1).sum() / total),
        "mcse": float(math.sqrt(var_draw.sum() / k) / total),
        "sd": float(math.sqrt(np.mean(var_draw / frames**2))),
        **_batch_spread(x, frames, batches),
    }


def _mean_of_draws(stats: Mapping[str, float], k: int) -> dict[str, float]:
    """The statistics of the average of the ``K`` draws as one estimator: draw noise divided by ``sqrt(K)``,
    the same mean and composition spread."""
    draw = stats["sd_batch_draw"] / math.sqrt(k)
    return {
        **stats,
        "sd": stats["sd"] / math.sqrt(k),
        "sd_batch_draw": draw,
        "sd_batch_total": math.sqrt(draw**2 + stats["sd_batch_composition"] ** 2),
    }


def _size_warning(size: int, utterances: int) -> str | None:
    """The warning for a batch of ``size`` utterances from a corpus of ``utterances``, or None."""
    if size <= utterances:
        return None
    return (f"batch size {size} exceeds the {utterances} utterances of the corpus: no batch of distinct "
            "utterances exists, so P(batch KL < 0) is not measured; its prediction and the sd_batch_* values "
            "treat the corpus as the population the batches are drawn from")


def _partitions(n: int, k: int, size: int, rng: np.random.Generator, replicas: int) -> np.ndarray | None:
    """Disjoint batches of distinct utterances: ``(R, K, floor(N / size), size)`` utterance indices, for each
    of ``R`` repeats and each draw index a random permutation of the ``N`` utterances cut into batches (the
    leftover utterances unused); ``R`` gives about ``replicas`` batches (1 where every partition is the same:
    ``size`` 1 or ``N``). None when ``size > N``."""
    per_draw = n // size
    if per_draw == 0:
        return None
    repeats = 1 if size in (1, n) else -(-replicas // (per_draw * k))
    order = rng.random((repeats, k, n)).argsort(-1)[..., : per_draw * size]
    return order.reshape(repeats, k, per_draw, size)


def _measured_negative(x: np.ndarray, partitions: np.ndarray | None) -> dict[str, Any]:
    """P(batch KL < 0) measured on the disjoint batches of :func:`_partitions`, utterance ``b`` of a batch of
    draw index ``k`` taking its value ``x[b, k]`` (``x (N, K)`` nats per utterance). One partition's
    ``floor(N / size) K`` batches use each of the ``N K`` values at most once, so (corpus fixed) they are
    independent: ``measured_se`` is the binomial SE for that many batches, and when no batch of any partition
    is negative, ``upper_95 = 1 - 0.05^(1 / independent_batches)`` (none of one partition's was). ``negative``
    counts the negative batches among the ``resampled`` ones of all partitions."""
    if partitions is None:
        return {"measured": None, "measured_se": None, "negative": 0, "resampled": 0,
                "independent_batches": 0, "upper_95": None}
    repeats, k, per_draw, _ = partitions.shape
    sums = x.T[np.arange(k)[None, :, None, None], partitions].sum(-1)  # (R, K, floor(N / size))
    negative, independent = int((sums < 0).sum()), per_draw * k
    p = negative / sums.size
    return {
        "measured": p,
        "measured_se": math.sqrt(p * (1 - p) / independent),
        "negative": negative,
        "resampled": int(sums.size),
        "independent_batches": independent,
        "upper_95": 1 - 0.05 ** (1 / independent) if negative == 0 else None,
    }


def _predicted_negative(x: np.ndarray, size: int) -> dict[str, float]:
    """P(sum of ``size`` i.i.d. one-draw utterance values < 0) for the per-utterance distribution measured by
    ``x (N, K)`` (all ``N K`` values equally likely): ``predicted`` by the saddlepoint of its empirical
    cumulant generating function (:func:`~pyro_vits.kl.prob_negative_saddlepoint`; 0 when no value is
    negative), ``predicted_normal`` by the normal approximation with its mean and sd."""
    mu, sigma = float(x.mean()), float(x.std(ddof=1))
    normal = float(prob_negative_normal_approx(mu, sigma, size)) if sigma > 0 else float(mu < 0)
    return {"predicted": prob_negative_saddlepoint(x, n=size), "predicted_normal": normal}


def _prob_negative(
    estimates: Mapping[str, np.ndarray], sizes: Sequence[int], rng: np.random.Generator, replicas: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{estimator: {str(size): row}}``: P(VITS's batch loss < 0) = P(sum of ``size`` one-draw utterance
    values < 0) from ``estimates[name] (N, K)``, measured (:func:`_measured_negative`, the same batches for
    every estimator) and predicted (:func:`_predicted_negative`), with the row's ``warning``
    (:func:`_size_warning`)."""
    n, k = next(iter(estimates.values())).shape
    out: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in estimates}
    for size in sizes:
        partitions = _partitions(n, k, size, rng, replicas)
        for name, x in estimates.items():
            out[name][str(size)] = {
                **_measured_negative(x, partitions),
                **_predicted_negative(x, size),
                "warning": _size_warning(size, n),
            }
    return out


def _skewness(x: np.ndarray) -> float:
    centred = x - x.mean()
    sd = centred.std()
    return float((centred**3).mean() / sd**3) if sd > 0 else 0.0


def _flow_displacement(estimates: Mapping[str, np.ndarray], frames: np.ndarray) -> dict | None:
    """``gaussian_closed_form - REFERENCE`` in nats per frame with its MCSE, and relative to the reference's
    mean (``estimates[name] (N, K)`` nats per utterance, ``frames (N,)``), or None without both estimators.
    The closed form compares ``m_q, logs_q`` (``z`` coordinates) with ``m_p, logs_p`` (``z_p`` coordinates)
    as if the flow were the identity: the difference measures how far the flow moves ``z``, not the error of
    an approximation."""
    if "gaussian_closed_form" not in estimates or REFERENCE not in estimates:
        return None
    diff = estimates["gaussian_closed_form"] - estimates[REFERENCE]
    total, k = frames.sum(), diff.shape[1]
    value, reference = float(diff.mean(1).sum() / total), float(estimates[REFERENCE].mean(1).sum() / total)
    return {
        "mean": value,
        "mcse": float(math.sqrt(diff.var(1, ddof=1).sum() / k) / total),
        "reference": REFERENCE,
        "relative": value / reference if reference else None,
    }


def summarize(
    draws: AuditDraws, batch_sizes: Sequence[int] = BATCH_SIZES, seed: int = 0, replicas: int = 20000
) -> dict[str, Any]:
    """The report dict (JSON-able; see docs/audit.md for every field). ``seed`` fixes the random batches;
    ``replicas``: random batches for the ``sd_batch_*`` values, and about as many disjoint batches per batch
    size for the measured P(batch KL < 0)."""
    frames, estimates = draws.arrays()
    total, k, batch_size, n = frames.sum(), draws.particles, draws.batch_size, frames.size
    rng = np.random.default_rng(seed)
    batches = rng.integers(n, size=(replicas, batch_size))  # the same random batches for every estimator
    kl = {name: _per_frame_stats(x, frames, batches) for name, x in estimates.items()}
    kl[f"vits_mean_of_{k}"] = _mean_of_draws(kl["vits"], k)
    channel_kl = draws.channel_kl / total
    sizes = sorted(set(batch_sizes) | {batch_size})
    negative = _prob_negative(estimates, sizes, rng, replicas)
    report = {
        "utterances": int(n),
        "frames": int(total),
        "particles": k,
        "batch_size": batch_size,
        "warnings": [w for w in (_size_warning(size, n) for size in sizes) if w],
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
    report["sd_batch_by_size"] = {  # VITS's logged value at every batch size (after the draws above)
        str(size): _batch_spread(estimates["vits"], frames, rng.integers(n, size=(replicas, size)))
        for size in sizes}
    displacement = _flow_displacement(estimates, frames)
    if displacement is not None:
        report["flow_displacement"] = displacement
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

    ``batch_size``: VITS's training batch size (the ``sd_batch_*`` values and the report's P(negative) row
    refer to it; batches are drawn at random from the corpus, see :func:`summarize`; a batch larger than the
    corpus adds an entry to ``report["warnings"]``); ``particles``: draws of ``z`` per utterance (>= 2, for
    the MCSE); ``seed`` fixes every draw; ``speech_config``: the audio/text settings (VITS ``data`` section;
    required); ``chunk_size``: utterances processed at once (memory grows with ``chunk_size * particles``
    and the longest utterance; results do not depend on it);
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
