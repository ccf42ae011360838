"""The VITS prior as a Pyro generative model, and an evaluator.

Generative model (one utterance ``n``; latents ``(C, T)``, ``T_n`` valid frames)::

    z_n ~ FlowPrior(m_p[n], logs_p[n], flow, mask[n], g[n])       # VITS: N(f(z); m_p, e^logs_p)|det df/dz|
    x_n ~ MaskedNormal(dec(z_n), sigma_x, mask[n])                 # observation

``m_p, logs_p`` stand for the text encoder's (duration-expanded) outputs and are part of the data.
All ``*_per_frame`` numbers are nats per valid frame with channels summed (VITS's normalisation).
:class:`~pyro_vits.data.batch.Batch` and the synthetic teacher (:mod:`pyro_vits.models.teacher`) live in
:mod:`pyro_vits.data`; their names stay importable from here."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .._validate import check_positive_ints
from ..data.batch import Batch


def _vectorised(fn: Callable[..., Any], num_samples: int) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate("_evaluate_particles", num_samples, dim=-2):
            return fn(*args, **kwargs)

    return wrapped


def _site_sums(trace: poutine.Trace) -> tuple[Tensor, Tensor]:
    """Sum of latent and of observed sites' log-probs, each ``(K, B)``."""
    trace.compute_log_prob(lambda name, site: not site_is_subsample(site))
    latent = observed = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            if site["is_observed"]:
                observed = observed + site["log_prob"]
            else:
                latent = latent + site["log_prob"]
    return torch.as_tensor(latent), torch.as_tensor(observed)


EVAL_CHUNK_ELEMENTS = 2**22
"""Default memory bound of :func:`evaluate`: latent elements (samples x utterances x C x T) per vectorised
call."""


_SAMPLE_BLOCK = 16  # sample chunks smaller than all samples hold a multiple of this many samples


def default_eval_chunk(channels: int, frames: int) -> int:
    """``evaluate``'s default ``eval_chunk`` for latents ``(C, T)``: rows (sample, utterance pairs) of
    :data:`EVAL_CHUNK_ELEMENTS` latent elements in all, at least 1."""
    check_positive_ints(channels=channels, frames=frames)
    return max(1, EVAL_CHUNK_ELEMENTS // (channels * frames))


def _data_device(data: Any) -> torch.device:
    device = getattr(data, "device", None)
    return device if isinstance(device, torch.device) else data.x.device


def _default_rows(data: Any) -> int:
    """:func:`default_eval_chunk` of the data's ``(C, T)``: ``channels``/``frames``, else ``x``'s last two
    dims (a spectrogram for speech data: larger than the latent, so a smaller chunk)."""
    if isinstance(getattr(data, "channels", None), int) and isinstance(getattr(data, "frames", None), int):
        return default_eval_chunk(data.channels, data.frames)
    return default_eval_chunk(*data.x.shape[-2:])


def _chunk_shape(utterances: int, samples: int, rows: int) -> tuple[int, int]:
    """``(utterances, samples)`` per vectorised call with at most ``rows`` pairs where possible: all samples
    of as many utterances as fit, else one utterance and samples in blocks of a multiple of
    ``_SAMPLE_BLOCK`` (at least one block)."""
    if utterances * samples <= rows:
        return utterances, samples
    if samples <= rows:
        return rows // samples, samples
    return 1, min(samples, max(_SAMPLE_BLOCK, rows // _SAMPLE_BLOCK * _SAMPLE_BLOCK))


@dataclass
class _Sums:
    """Running sums of :func:`evaluate`: per-sample ELBO over utterances ``(K,)``, sums over utterances of
    the sample means of the KL and of the log-likelihood, and of the per-utterance IWAE bound."""

    elbo_k: Tensor
    kl: Tensor
    recon: Tensor
    iwae: Tensor

    def add_utterances(self, log_q: list[Tensor], log_prior: list[Tensor], log_lik: list[Tensor]) -> None:
        """Fold in one utterance chunk given its sample chunks (each ``(k_i, B)``, sum of k_i = K)."""
        log_q_all, prior_all, lik_all = (torch.cat(t) for t in (log_q, log_prior, log_lik))
        log_w = lik_all + prior_all - log_q_all  # (K, B)
        k = log_w.shape[0]
        self.elbo_k = self.elbo_k + log_w.sum(-1)
        self.kl = self.kl + (log_q_all - prior_all).mean(0).sum()
        self.recon = self.recon + lik_all.mean(0).sum()
        self.iwae = self.iwae + (torch.logsumexp(log_w, 0) - math.log(k)).sum()


def _evaluate_chunk(model: Callable[..., Any], guide: Callable[..., Any], chunk: Batch,
                    samples: int) -> tuple[Tensor, Tensor, Tensor]:
    """``log q, log p(z), log p(x | z)``, each ``(samples, B)``, for ``samples`` guide draws on ``chunk``."""
    guide_trace = poutine.trace(_vectorised(guide, samples)).get_trace(chunk)
    replayed = poutine.replay(_vectorised(model, samples), trace=guide_trace)
    model_trace = poutine.trace(replayed).get_trace(chunk)
    log_q, _ = _site_sums(guide_trace)
    log_prior, log_lik = _site_sums(model_trace)
    return log_q, log_prior, log_lik


def evaluate(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    data: Batch,
    num_samples: int = 64,
    seed: int = 0,
    batch_size: int | None = None,
    eval_chunk: int | None = None,
) -> dict[str, float]:
    """Monte-Carlo measures of ``model``/``guide`` on ``data`` with ``num_samples`` guide particles.

    Returns nats per valid frame: ``elbo_per_frame`` (and ``elbo_stderr_per_frame``, its MC standard
    error), ``kl_per_frame`` = E_q[log q(z|x) - log p(z)], ``recon_per_frame`` = E_q[log p(x|z)],
    ``loglik_iwae_per_frame`` = sum_n logmeanexp_k w_nk with the guide as proposal (a lower bound on
    log p(x) converging as ``num_samples`` grows); plus ``num_frames``, ``num_utterances``, ``num_samples``.
    ``data``: a :class:`Batch`, or any data with ``n``, ``num_frames``, ``subset(idx)`` (and ``device`` or an
    ``x`` tensor) that model and guide accept. Model and guide take ``(batch)`` and use only the
    ``"utterances"`` plate (dim -1). The teacher's truth:
    ``evaluate(teacher, ObservationGuide.for_teacher(teacher), data)``. Runs without gradients, seeded by
    ``seed`` without touching the global RNG.

    Memory: utterances go in chunks of ``batch_size`` (None: all), and each vectorised call holds at most
    ``eval_chunk`` (sample, utterance) pairs (None: :func:`default_eval_chunk`, about 2^22 latent elements;
    time is then linear in ``num_samples``): all samples of as many utterances as fit, else one utterance
    with its samples split in blocks (a multiple of 16 samples, at least 16). Sample blocks are combined
    exactly (the IWAE bound is a log-sum-exp over all ``num_samples``), and one random stream runs through
    the chunks in order: on CPU the draws of a guide with one latent site do not depend on how the samples
    are split, only on the utterances per call (as with ``batch_size``).
    """
    check_positive_ints(num_samples=num_samples)
    if not all(hasattr(data, name) for name in ("n", "num_frames", "subset")):
        raise TypeError(f"data must be a Batch (or have n, num_frames and subset), got {type(data).__name__}")
    check_positive_ints(batch_size=batch_size, eval_chunk=eval_chunk, allow_none=True)
    rows = _default_rows(data) if eval_chunk is None else eval_chunk
    per_call, per_draw = _chunk_shape(min(data.n if batch_size is None else batch_size, data.n),
                                      num_samples, rows)
    device = _data_device(data)
    zero = torch.zeros((), device=device)
    sums = _Sums(torch.zeros(num_samples, device=device), zero, zero, zero)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, data.n, per_call):
            chunk = data.subset(torch.arange(start, min(start + per_call, data.n), device=device))
            parts = [_evaluate_chunk(model, guide, chunk, min(per_draw, num_samples - first))
                     for first in range(0, num_samples, per_draw)]
            sums.add_utterances(*(list(t) for t in zip(*parts)))
    frames = data.num_frames
    stderr = float(sums.elbo_k.std()) / math.sqrt(num_samples) if num_samples > 1 else float("nan")
    return {
        "elbo_per_frame": float(sums.elbo_k.mean()) / frames,
        "elbo_stderr_per_frame": stderr / frames,
        "kl_per_frame": float(sums.kl) / frames,
        "recon_per_frame": float(sums.recon) / frames,
        "loglik_iwae_per_frame": float(sums.iwae) / frames,
        "num_frames": frames,
        "num_utterances": data.n,
        "num_samples": num_samples,
    }
