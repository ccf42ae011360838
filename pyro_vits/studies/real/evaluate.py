"""Held-out measurements of a refitted VITS generator (:class:`~pyro_vits.vits.generator.VITSGenerator` with
``enc_q`` and ``dec``) on held-out utterances (:class:`~pyro_vits.data.refit_corpus.RefitData`).

For each utterance, ``K`` seeded draws ``z ~ q = N(m_q, exp(logs_q))`` (VITS's ``enc_q``), ``z_p = flow(z)``
and each draw's MAS alignment (:class:`~pyro_vits.distributions.aligned.DrawAlignedPrior`) give:

- ``kl_per_frame``: VITS's logged KL (the ``vits`` estimator) summed over utterances and channels, divided by
  the valid frames (VITS's normalisation), averaged over the draws; ``kl_mcse``: its Monte-Carlo standard
  error over the i.i.d. draws (the utterances are fixed);
- ``log_scale_ratio (C,)``: per latent channel, the mean over valid frames and draws of
  ``logs_q - logs_p`` (``logs_p`` of the token each draw aligns the frame to), the per-element log of
  ``sigma_q / sigma_p`` that VITS's loss compares (the flow is volume preserving, so this is the ratio of
  the scales of ``z_p`` and of the prior); ``sigma_ratio = exp(log_scale_ratio)`` (a geometric mean);
- ``alignment_gap``: :func:`~pyro_vits.kl.alignment_gap.alignment_gap` of the same draws: ``log q - log p``
  per frame (mean, MCSE) with the per-draw MAS alignment (VITS's term), the alignment MAS picks on the
  posterior mean, and the uniform mixture over monotonic alignments (``log_count``: its upper bound on the
  mixture's excess over MAS, per frame);
- ``shared_alignment_bias``: per frame, the ``vits`` estimate of draws ``2..K`` scored with draw 1's alignment
  minus with their own (mean, MCSE): the bias of reusing one alignment for extra KL particles;
- ``mel_l1``: VITS's ``F.l1_loss`` of the 80-bin log-mel of ``dec(z)`` (first draw, the whole utterance)
  against the recording's, over the valid frames and bins, averaged over utterances; ``mel_l1_se`` its
  standard error over utterances.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...data.mel import mel_spectrogram
from ...data.refit_corpus import RefitData
from ...distributions.masked_normal import MaskedNormal
from ...kl.alignment_gap import (
    AlignmentLogPriors,
    aligned_log_priors,
    alignment_gap,
    posterior_mean_alignment,
)
from ...kl.estimators import kl_estimate
from ...models.refit import RefitModel

__all__ = ["evaluate_generator", "decode_samples"]


def _draws(m_q: Tensor, logs_q: Tensor, mask: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``(K, B, C, T)`` draws of ``q`` (0 on padding) from ``generator``."""
    eps = torch.randn((k,) + tuple(m_q.shape), generator=generator, dtype=m_q.dtype)
    return (m_q + eps * logs_q.exp()) * mask


def _chunk(model: RefitModel, enc_q: Any, sub: RefitData, k: int, gen: torch.Generator) -> dict[str, Tensor]:
    g = model.speaker_embedding(sub)
    m_q, logs_q = enc_q.encode(sub.spec, sub.mask, g)
    z = _draws(m_q, logs_q, sub.mask, k, gen)
    aligned = model.prior(sub)
    prior = aligned.for_draws(z)
    kl = kl_estimate("vits", z, m_q, logs_q, prior, sub.mask)  # (K, B)
    shared = kl_estimate("vits", z[1:], m_q, logs_q, aligned.for_draws(z[1:], prior.path[0]), sub.mask)
    log_q = MaskedNormal(m_q, logs_q.exp(), sub.mask, validate_args=False).log_prob(z)
    priors = aligned_log_priors(aligned, z, posterior_mean_alignment(aligned, m_q))
    log_ratio = ((logs_q - prior.logs_p) * sub.mask).sum(-1)  # (K, B, C)
    y_hat = model.dec(z[0], g if getattr(model.dec, "cond", None) is not None else None)[:, 0]
    c = model.config
    mel = lambda w: mel_spectrogram(w, c["sampling_rate"], c["n_fft"], model.hop, c["win_length"],  # noqa: E731
                                    c["n_mels"])
    frames = sub.mask.shape[-1]
    diff = (mel(y_hat)[..., :frames] - mel(sub.wav)[..., :frames]).abs() * sub.mask
    l1 = diff.sum((-2, -1)) / (sub.lengths * c["n_mels"])
    return dict(kl=kl, log_ratio=log_ratio.sum((0, 1)), l1=l1, shared_minus_own=shared - kl[1:], log_q=log_q,
                priors=priors)


@torch.no_grad()
def evaluate_generator(model: RefitModel, enc_q: Any, data: RefitData, *, draws: int = 4, seed: int = 0,
                       chunk_size: int = 8) -> dict[str, Any]:
    """The module docstring's measurements (JSON-able) of ``enc_q`` (a
    :class:`~pyro_vits.models.guides.PosteriorEncoder`) with ``model``'s frozen voice on ``data``."""
    if draws < 2:
        raise ValueError(f"draws must be >= 2 (for the MCSE), got {draws}")
    gen = torch.Generator().manual_seed(seed)
    outs = [_chunk(model, enc_q, data.subset(torch.arange(start, min(start + chunk_size, data.n))), draws, gen)
            for start in range(0, data.n, chunk_size)]
    cat = lambda key, dim: torch.cat([o[key] for o in outs], dim).double()  # noqa: E731
    kl_t, l1_t, log_ratio = cat("kl", 1), cat("l1", 0), sum(o["log_ratio"] for o in outs)
    priors = AlignmentLogPriors(*(torch.cat([getattr(o["priors"], f) for o in outs], -1)
                                  for f in AlignmentLogPriors._fields))
    gap = alignment_gap(cat("log_q", 1), priors, data.lengths)
    shared = cat("shared_minus_own", 1)
    frames = float(data.lengths.sum())
    per_draw = kl_t.sum(1) / frames  # (K,) the corpus's per-frame KL of each draw
    ratio = (log_ratio / (frames * draws)).double()
    return dict(
        utterances=data.n, frames=int(frames), draws=draws, seed=seed,
        kl_per_frame=float(per_draw.mean()), kl_mcse=float(kl_t.var(0).sum().sqrt() / frames / math.sqrt(draws)),
        channels=int(ratio.numel()), log_scale_ratio=ratio.tolist(), sigma_ratio=ratio.exp().tolist(),
        sigma_ratio_median=float(ratio.exp().median()),
        channels_sigma_above_1=int((ratio > 0).sum()),
        alignment_gap=gap._asdict(),
        shared_alignment_bias=[float(shared.mean(0).sum() / frames),
                               float(shared.var(0).sum().sqrt() / frames / math.sqrt(draws - 1))],
        mel_l1=float(l1_t.mean()), mel_l1_se=float(l1_t.std() / math.sqrt(len(l1_t))) if len(l1_t) > 1 else 0.0,
    )


@torch.no_grad()
def decode_samples(model: RefitModel, enc_q: Any, data: RefitData, count: int, seed: int = 0) -> list[np.ndarray]:
    """``dec(z)``, ``z ~ q`` (one seeded draw), of the first ``count`` utterances of ``data``: float32
    waveforms ``(samples,)`` in [-1, 1] at the voice's rate, each cut to its utterance's frames."""
    gen = torch.Generator().manual_seed(seed)
    sub = data.subset(torch.arange(min(count, data.n)))
    g = model.speaker_embedding(sub)
    m_q, logs_q = enc_q.encode(sub.spec, sub.mask, g)
    z = _draws(m_q, logs_q, sub.mask, 1, gen)[0]
    y_hat = model.dec(z, g if getattr(model.dec, "cond", None) is not None else None)[:, 0]
    return [y_hat[i, : int(n) * model.hop].clamp(-1, 1).float().numpy() for i, n in enumerate(sub.lengths)]
