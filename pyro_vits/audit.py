"""Audit a trained VITS generator's KL term on real speech.

For every utterance the audit runs VITS's training forward on the latent path: ``enc_p`` on the text,
``enc_q`` on the linear spectrogram, ``K`` draws ``z ~ q``, ``z_p = flow(z)``, monotonic alignment search
per draw and the frame-aligned prior ``N(m_p, exp(logs_p))``; then it evaluates every KL estimator of
:mod:`pyro_vits.estimators` on the same draws. Each draw is a replica of the KL that one VITS training
step logs for that utterance (its own alignment included).

Units: ``*_per_frame`` values are nats per valid spectrogram frame with the latent channels summed (VITS's
normalisation: summed KL over summed frames); per-utterance values are nats. MCSE is the Monte-Carlo
standard error over the ``K`` i.i.d. draws per utterance (the corpus is fixed).

Memory: utterances stream through in batches; per utterance only ``K`` scalars per estimator are kept.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _arviz_compat as azc
from . import estimators as _estimators
from ._validate import check_positive_ints
from .data.align import attention_mask, expand_prior, maximum_path, neg_cent
from .data.speech import SpeechBatch, SpeechConfig, Utterance, open_corpus, speech_batches
from .estimators import kl_estimate, prob_negative, prob_negative_normal_approx
from .flows import ResidualCouplingBlock
from .data.batch import sequence_mask
from .prior import FlowPrior
from .vits import VITSGenerator

__all__ = [
    "LatentDraws",
    "AlignedPrior",
    "AuditDraws",
    "estimator_names",
    "draw_latents",
    "collect",
    "summarize",
    "audit",
    "write_report",
    "COLLAPSE_THRESHOLD",
    "BATCH_SIZES",
]

COLLAPSE_THRESHOLD = 0.01
"""A channel whose KL is below this many nats per frame counts as collapsed (posterior = prior)."""

BATCH_SIZES = (1, 4, 16, 64)
"""Batch sizes (utterances) at which P(batch KL loss < 0) is reported, besides the user's."""

REFERENCE = "mc"
"""The unbiased estimator taken as the truth for the Gaussian closed form's error."""


def estimator_names() -> tuple[str, ...]:
    """Every name of the estimator registry, in its order (new estimators appear automatically)."""
    return tuple(getattr(_estimators, "KL_ESTIMATORS", None) or getattr(_estimators, "ESTIMATORS"))


@dataclass
class LatentDraws:
    """One batch of ``B`` utterances with ``K`` draws each (VITS shapes, ``T`` = spectrogram frames).

    ``z, z_p, m_p, logs_p``: ``(K, B, C, T)`` (the prior aligned per draw); ``logdet``: ``(K, B)``
    ``log|det dz_p/dz|``; ``m_q, logs_q``: ``(B, C, T)``; ``mask``: ``(B, 1, T)``; ``g``: ``(B, gin, 1)`` or
    None; ``tokens``: ``(K, B, T)`` aligned token index.
    """

    z: Tensor
    z_p: Tensor
    logdet: Tensor
    m_q: Tensor
    logs_q: Tensor
    m_p: Tensor
    logs_p: Tensor
    mask: Tensor
    g: Tensor | None
    tokens: Tensor


def _check_batch(generator: VITSGenerator, batch: SpeechBatch) -> None:
    spec_channels, n_vocab = generator.config["spec_channels"], generator.config["n_vocab"]
    if batch.spec.shape[1] != spec_channels:
        raise ValueError(
            f"the spectrograms have {batch.spec.shape[1]} channels (filter_length // 2 + 1), the "
            f"generator's enc_q expects {spec_channels}: the audio config does not match the model"
        )
    too_long = (batch.text_lengths > batch.spec_lengths).nonzero()
    if too_long.numel():
        b = int(too_long[0, 0])
        raise ValueError(
            f"{batch.sources[b]}: {int(batch.text_lengths[b])} text tokens for "
            f"{int(batch.spec_lengths[b])} spectrogram frames (too short to align)"
        )
    bad = (batch.text >= n_vocab).any(1).nonzero()
    if bad.numel():
        raise ValueError(
            f"{batch.sources[int(bad[0, 0])]}: token ids beyond the generator's {n_vocab} symbols "
            "(the symbol table does not match the model)"
        )
    _check_speakers(generator.n_speakers, batch)


def _check_speakers(n_speakers: int, batch: SpeechBatch) -> None:
    if (batch.speakers is None) != (n_speakers == 0):
        raise ValueError(
            f"{batch.sources[0]}: the generator has {n_speakers} speakers but the corpus "
            f"{'has no' if batch.speakers is None else 'has'} speaker ids (a multi-speaker model needs "
            "'wav_path|speaker_id|text' lines, a single-speaker one 'wav_path|text')"
        )
    if batch.speakers is not None:
        bad = (batch.speakers >= n_speakers).nonzero()
        if bad.numel():
            b = int(bad[0, 0])
            raise ValueError(
                f"{batch.sources[b]}: speaker id {int(batch.speakers[b])}, the generator has {n_speakers}"
            )


def utterance_noise(batch: SpeechBatch, particles: int, channels: int, seed: int) -> Tensor:
    """``N(0, 1)`` noise ``(K, B, C, T_spec)`` (0 on padded frames); utterance ``b``'s comes from a generator
    seeded by ``seed`` and its ``source`` (``file:line``)."""
    lengths = batch.spec_lengths.tolist()
    eps = torch.zeros(particles, len(lengths), channels, batch.spec.shape[-1])
    for b, (source, length) in enumerate(zip(batch.sources, lengths)):
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{source}".encode()))
        eps[:, b, :, :length] = torch.randn(particles, channels, length, generator=gen)
    return eps


@torch.no_grad()
def draw_latents(generator: VITSGenerator, batch: SpeechBatch, particles: int, seed: int) -> LatentDraws:
    """VITS's training forward on the latent path for ``particles`` draws of ``z``. ``batch`` must be on the
    generator's device. The noise is drawn on the CPU per utterance (:func:`utterance_noise`), so the draws do
    not depend on the device, the batching or the position of an utterance in the corpus."""
    _check_batch(generator, batch)
    _, m_tok, logs_tok, x_mask = generator.enc_p(batch.text, batch.text_lengths)
    g = generator.speaker_embedding(batch.speakers)
    mask = sequence_mask(batch.spec_lengths, batch.spec.shape[-1]).to(batch.spec.dtype)
    m_q, logs_q = generator.enc_q.guide.encode(batch.spec, mask, g)
    eps = utterance_noise(batch, particles, m_q.shape[1], seed).to(device=m_q.device, dtype=m_q.dtype)
    z = (m_q + eps * torch.exp(logs_q)) * mask
    z_p, logdet = generator.flow.forward_and_logdet(z, mask, g=g)
    k, (b, c, t) = particles, m_q.shape

    def flat(x: Tensor) -> Tensor:
        return x.expand((k,) + x.shape[-3:]).reshape((k * b,) + x.shape[-2:])

    m_tok_k, logs_tok_k = flat(m_tok), flat(logs_tok)
    path = maximum_path(neg_cent(flat(z_p), m_tok_k, logs_tok_k), flat(attention_mask(x_mask, mask)))
    m_p, logs_p = expand_prior(path, m_tok_k, logs_tok_k)
    tokens = path.argmax(-1).reshape(k, b, t)
    return LatentDraws(
        z, z_p, logdet, m_q, logs_q, m_p.reshape(k, b, c, t), logs_p.reshape(k, b, c, t), mask, g, tokens
    )


class AlignedPrior:
    """The aligned flow prior of a :class:`LatentDraws`, ``p(z) = N(z_p; m_p, exp(logs_p)) |det dz_p/dz|``
    (batch ``(K, B)``, event ``(C, T)``): ``log_prob(latents.z)`` reuses the ``z_p`` and log-determinant the
    alignment already computed (one flow pass per draw instead of two); any other ``z`` goes through
    :class:`~pyro_vits.prior.FlowPrior`. Attributes ``m_p, logs_p, mask, g`` as FlowPrior's."""

    def __init__(self, latents: LatentDraws, flow: ResidualCouplingBlock) -> None:
        self.m_p, self.logs_p, self.mask, self.g = latents.m_p, latents.logs_p, latents.mask, latents.g
        self._prior = FlowPrior(latents.m_p, latents.logs_p, flow, latents.mask, latents.g)
        self._z = latents.z
        self._log_prob = self._prior.base_dist.log_prob(latents.z_p) + latents.logdet

    def log_prob(self, value: Tensor) -> Tensor:
        return self._log_prob if value is self._z else self._prior.log_prob(value)


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    values, mask = torch.broadcast_tensors(values, mask)
    return torch.where(mask > 0, values, 0.0)


@dataclass
class AuditDraws:
    """What the stream keeps: per utterance ``frames (N,)`` and ``estimates[name] (N, K)`` nats; per channel
    ``(C,)`` the sums over utterances and frames (mean over draws) of VITS's KL term and of ``logs_q -
    logs_p``, and the summed variance over draws of each utterance's KL term; how many (frame, draw) pairs of
    draws 1..K-1 share draw 0's token, out of how many."""

    particles: int
    batch_size: int
    frames: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    estimates: dict[str, list[np.ndarray]] = field(default_factory=dict)
    channel_kl: np.ndarray | float = 0.0
    channel_kl_var: np.ndarray | float = 0.0
    channel_log_ratio: np.ndarray | float = 0.0
    same_token: float = 0.0
    compared: float = 0.0

    def add(self, batch: SpeechBatch, latents: LatentDraws, values: Mapping[str, Tensor]) -> None:
        self.frames.extend(batch.spec_lengths.tolist())
        self.sources.extend(batch.sources)
        for name, value in values.items():
            self.estimates.setdefault(name, []).append(value.double().cpu().numpy().T)
        elem = (
            latents.logs_p
            - latents.logs_q
            - 0.5
            + 0.5 * (latents.z_p - latents.m_p) ** 2 * torch.exp(-2 * latents.logs_p)
        )
        kl_c = _masked(elem, latents.mask).double().sum(3)  # (K, B, C) per utterance and draw
        self.channel_kl = self.channel_kl + kl_c.sum(1).mean(0).cpu().numpy()
        self.channel_kl_var = self.channel_kl_var + kl_c.var(0).sum(0).cpu().numpy()
        ratio = _masked(latents.logs_q - latents.logs_p, latents.mask).double()
        self.channel_log_ratio = self.channel_log_ratio + ratio.sum((1, 3)).mean(0).cpu().numpy()
        same = (latents.tokens[1:] == latents.tokens[:1]).double() * latents.mask[:, 0]
        self.same_token += float(same.sum())
        self.compared += float(latents.mask.sum()) * (self.particles - 1)

    def arrays(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(frames (N,), {name: (N, K)})``."""
        return np.asarray(self.frames, dtype=np.float64), {
            k: np.concatenate(v) for k, v in self.estimates.items()
        }


def _check_particles(particles: int) -> None:
    if not isinstance(particles, int) or isinstance(particles, bool) or particles < 2:
        raise ValueError(f"particles must be an int >= 2 (the MCSE needs two draws), got {particles!r}")


def collect(
    generator: VITSGenerator,
    batches: Iterable[SpeechBatch],
    *,
    batch_size: int,
    particles: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> AuditDraws:
    """Stream ``batches`` through :func:`draw_latents` and every estimator; keep only per-utterance scalars.
    ``batch_size`` is VITS's training batch size, for the batch-level statistics of :func:`summarize`."""
    _check_particles(particles)
    names = estimator_names()
    draws = AuditDraws(particles, batch_size)
    for batch in batches:
        batch = batch.to(device)
        latents = draw_latents(generator, batch, particles, seed)
        with torch.no_grad():
            prior = AlignedPrior(latents, generator.flow)
            values = {
                name: kl_estimate(name, latents.z, latents.m_q, latents.logs_q, prior) for name in names
            }
        draws.add(batch, latents, values)
    if not draws.frames:
        raise ValueError("no utterances to audit")
    return draws


# ---------------------------------------------------------------------------------------------------------
# Summaries (numpy on the kept scalars)
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------------


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
    :class:`~pyro_vits.data.speech.Utterance`); returns the report dict (see :func:`summarize`).

    ``batch_size``: VITS's training batch size (``sd_batch`` and P(negative) refer to it; consecutive
    utterances form the batches); ``particles``: draws of ``z`` per utterance (>= 2, for the MCSE); ``seed``
    fixes every draw; ``speech_config``: the audio/text settings (VITS ``data`` section; required);
    ``chunk_size``: utterances processed at once (memory grows with ``chunk_size * particles`` and the longest
    utterance; results do not depend on it);
    ``out``: also write report.json, report.md, figures and audit.nc there (:func:`write_report`);
    ``extra``: more JSON-able fields for the report (e.g. the inputs' paths).
    """
    if not isinstance(generator, VITSGenerator):
        raise TypeError(
            f"generator must be a VITSGenerator (load_vits_generator), got {type(generator).__name__}"
        )
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
    finally:
        generator.train(training)
    report = summarize(draws, batch_sizes, seed)
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


def _peak_memory_mb(device: torch.device | str) -> dict[str, float]:
    """The process's peak resident memory (POSIX) and, on CUDA, the peak allocated by torch, in MiB."""
    peak = {}
    try:
        import resource
    except ImportError:  # not on Windows
        pass
    else:
        peak["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device = torch.device(device)
    if device.type == "cuda":
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------

REPORT_FILES = ("figures", "audit.nc", "report.md", "report.json")
"""What :func:`write_report` puts in ``out``, in the order it moves them in (``report.json``, last, marks
completion)."""


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    if out.is_dir() and not overwrite and any((out / name).exists() for name in REPORT_FILES):
        raise FileExistsError(f"{out} already holds an audit report (pass overwrite=True / --overwrite)")


def _markdown(report: Mapping[str, Any]) -> str:
    lines = [
        f"# VITS KL audit: {report['utterances']} utterances, {report['frames']} frames, "
        f"{report['particles']} draws each",
        "",
        "KL per frame (nats; channels summed; summed KL / summed frames, VITS's normalisation).",
        "",
        "| estimator | mean | MCSE | sd (one draw, one utterance) | sd (batch of "
        f"{report['batch_size']}) | P(< 0), one utterance |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report["kl_per_frame"].items():
        neg = report["prob_negative_by_estimator"].get(name, {}).get("1", {}).get("measured")
        lines.append(
            f"| {name} | {s['mean']:.5g} | {s['mcse']:.2g} | {s['sd']:.4g} | {s['sd_batch']:.4g} | "
            f"{'' if neg is None else f'{neg:.4g}'} |"
        )
    ratio, kl_c = (
        np.asarray(report["channels"]["log_scale_ratio"]),
        np.asarray(report["channels"]["kl_per_frame"]),
    )
    lines += [
        "",
        f"Channels: C = {ratio.size}; collapsed (KL < {COLLAPSE_THRESHOLD} nats/frame): "
        f"{report['collapsed_fraction']:.3f}; mean log(sigma_q / sigma_p) {ratio.mean():.4g} "
        f"(min {ratio.min():.4g}, max {ratio.max():.4g}); KL per channel: median {np.median(kl_c):.4g}, "
        f"max {kl_c.max():.4g} nats/frame.",
        "",
        "| batch size | P(VITS batch KL < 0) measured | ± SE | normal approx. |",
        "|---|---|---|---|",
    ]
    for size, row in report["prob_negative"].items():
        measured = f"{row['measured']:.4g}" if row["measured"] > 0 else f"0 (< {row['upper_95']:.2g})"
        lines.append(f"| {size} | {measured} | {row['measured_se']:.2g} | {row['predicted']:.4g} |")
    error = report.get("gaussian_closed_form_error")
    if error:
        lines += [
            "",
            f"Gaussian closed form (ignoring the flow) minus `{error['reference']}`: {error['mean']:.5g} "
            f"± {error['mcse']:.2g} nats/frame.",
        ]
    lines += ["", f"Alignment agreement between draws: {report['alignment_agreement']:.4f} of frames."]
    return "\n".join(lines) + "\n"


def _inference_data(report: Mapping[str, Any], draws: AuditDraws) -> Any:
    frames, estimates = draws.arrays()
    return azc.make_inference_data(
        {"posterior": {f"kl_{name}": x.T[None] for name, x in estimates.items()}},
        observed_data={
            "frames": frames,
            "channel_kl_per_frame": np.asarray(report["channels"]["kl_per_frame"]),
            "channel_log_scale_ratio": np.asarray(report["channels"]["log_scale_ratio"]),
        },
        dims={
            **{f"kl_{name}": ["utterance"] for name in estimates},
            "frames": ["utterance"],
            "channel_kl_per_frame": ["channel"],
            "channel_log_scale_ratio": ["channel"],
        },
        coords={"utterance": np.arange(frames.size)},
        attrs={"units": "nats per utterance (kl_*), frames per utterance", "sources": draws.sources},
    )


def _figures(report: Mapping[str, Any], draws: AuditDraws, folder: Path) -> None:
    from .plots import plot_estimator_histograms, plot_negative_vs_batch_size

    frames, estimates = draws.arrays()
    per_frame = {name: x / frames[:, None] for name, x in estimates.items()}
    truth = report["kl_per_frame"][REFERENCE]["mean"]
    closed = report["kl_per_frame"].get("gaussian_closed_form", {}).get("mean", float("nan"))
    plot_estimator_histograms(
        {"corpus": per_frame}, {"corpus": truth}, {"corpus": closed}, folder / "kl_per_frame.png"
    )
    rows = report["prob_negative"]
    sizes = np.unique(np.geomspace(1, max(int(s) for s in rows), 50).round().astype(int)).tolist()
    mu, sigma = float(estimates["vits"].mean()), float(estimates["vits"].std(ddof=1))
    curve = [float(prob_negative_normal_approx(mu, sigma, s)) if sigma > 0 else float(mu < 0) for s in sizes]
    plot_negative_vs_batch_size(
        {
            "by_batch_size": {
                s: {
                    "p_negative": r["measured"],
                    "p_negative_se": r["measured_se"],
                    "p_upper_95": r["upper_95"],
                }
                for s, r in rows.items()
            },
            "normal_approx_curve": {"batch_size": sizes, "p_negative": curve},
            "skewness": report["skewness_per_utterance"],
        },
        folder / "prob_negative.png",
    )
    _plot_channels(report, folder / "channels.png")


def _plot_channels(report: Mapping[str, Any], path: Path) -> None:
    """Histogram of the per-channel sigma_q / sigma_p and the per-channel KL (sorted), to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ratio = np.exp(np.asarray(report["channels"]["log_scale_ratio"]))
    kl_c = np.sort(np.asarray(report["channels"]["kl_per_frame"]))[::-1]
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.hist(ratio, bins=min(40, max(5, ratio.size // 2)), color="C0")
    left.axvline(1.0, color="k", lw=0.8)
    left.set_xlabel(r"per-channel $\exp(\overline{\log\sigma_q - \log\sigma_p})$")
    left.set_ylabel("channels")
    right.bar(np.arange(kl_c.size), kl_c, width=1.0, color="C1")
    right.axhline(
        COLLAPSE_THRESHOLD, color="k", ls="--", lw=0.8, label=f"collapse threshold {COLLAPSE_THRESHOLD}"
    )
    right.set_yscale("symlog", linthresh=COLLAPSE_THRESHOLD)
    right.set_xlabel("channel (sorted by KL)")
    right.set_ylabel("KL (nats / frame)")
    right.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def write_report(
    report: Mapping[str, Any], draws: AuditDraws, out: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write ``report.json``, ``report.md``, ``figures/*.png`` and ``audit.nc`` into ``out``: everything is
    built in a temporary folder next to it and moved in at the end, ``report.json`` last."""
    out = Path(out)
    _check_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".audit-", dir=out))
    try:
        (tmp / "figures").mkdir()
        _figures(report, draws, tmp / "figures")
        azc.save(_inference_data(report, draws), tmp / "audit.nc")
        (tmp / "report.md").write_text(_markdown(report), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
        if (out / "figures").exists():
            shutil.rmtree(out / "figures")
        for name in REPORT_FILES:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
