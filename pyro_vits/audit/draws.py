"""The audit's latent draws: ``z ~ q`` from a trained generator's ``enc_q``, the aligned prior, every estimator."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .._masks import sequence_mask
from ..data.speech_batches import SpeechBatch
from ..distributions.flow_prior import FlowPrior
from ..flows import ResidualCouplingBlock
from ..kl import ESTIMATORS, kl_estimate
from ..nn.alignment import attention_mask, expand_prior, maximum_path, neg_cent
from ..vits import VITSGenerator

COLLAPSE_THRESHOLD = 0.01
"""Nats per frame below which a channel's contribution to VITS's KL term in ``z_p`` coordinates is counted
(``collapsed_fraction``). The flow mixes the channels of ``z``, so a contribution is not a per-channel KL (it
can be negative) and a small one does not show that a channel of ``z`` carries no information."""

BATCH_SIZES = (1, 4, 16, 64)
"""Batch sizes (utterances) at which P(batch KL loss < 0) is reported, besides the user's."""

REFERENCE = "mc"
"""The unbiased estimator the Gaussian closed form is compared with (the report's ``flow_displacement``)."""


class NonFiniteResult(FloatingPointError):
    """A quantity of the audit is NaN or inf (or a posterior scale underflows to 0): nothing is reported.
    A ``FloatingPointError``, like :class:`pyro_vits.train.NonFiniteError`, so that the applications' error
    boundary (:func:`pyro_vits.apps.run_main`) prints its one line and exits with 1. ``part`` is the
    generator part (``enc_p``, ``enc_q``, ``flow``) or ``"estimator <name>"`` / ``"summary"``, ``source`` the
    utterance (``file:line``) or None."""

    def __init__(self, message: str, part: str = "", source: str | None = None) -> None:
        super().__init__(message)
        self.part, self.source = part, source


def check_finite(x: Tensor, quantity: str, part: str, sources: tuple[str, ...], batch_dim: int = 0) -> None:
    """Raise :class:`NonFiniteResult` naming ``quantity``, ``part`` and the first utterance of ``sources``
    (indexed along ``batch_dim`` of ``x``) where ``x`` is not finite."""
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    bad = (~finite).movedim(batch_dim, 0).reshape(x.shape[batch_dim], -1).any(1).nonzero()
    source = sources[int(bad[0, 0])]
    value = x.movedim(batch_dim, 0)[int(bad[0, 0])]
    value = value[~torch.isfinite(value)][0].item()
    raise NonFiniteResult(f"{source}: {part} gives a non-finite {quantity} ({value}); the audit stops, no "
                          "report is written", part, source)


def estimator_names() -> tuple[str, ...]:
    """Every name of the estimator registry :data:`~pyro_vits.kl.estimators.ESTIMATORS`, in its order (new
    estimators appear in the audit automatically)."""
    return tuple(ESTIMATORS)



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
    src = batch.sources
    _, m_tok, logs_tok, x_mask = generator.enc_p(batch.text, batch.text_lengths)
    check_finite(m_tok * x_mask, "prior mean m_p", "enc_p", src)
    check_finite(logs_tok * x_mask, "prior log-scale logs_p", "enc_p", src)
    g = generator.speaker_embedding(batch.speakers)
    mask = sequence_mask(batch.spec_lengths, batch.spec.shape[-1]).to(batch.spec.dtype)
    m_q, logs_q = generator.enc_q.guide.encode(batch.spec, mask, g)
    check_finite(m_q * mask, "posterior mean m_q", "enc_q", src)
    check_finite(logs_q * mask, "posterior log-scale logs_q", "enc_q", src)
    scale = torch.exp(logs_q)
    check_finite(torch.where(mask > 0, scale, 1.0), "posterior scale exp(logs_q)", "enc_q", src)
    underflow = ((scale == 0) & (mask > 0)).flatten(1).any(1).nonzero()
    if underflow.numel():
        b = int(underflow[0, 0])
        low = float(logs_q[b][(mask[b] > 0).expand_as(logs_q[b])].min())
        raise NonFiniteResult(f"{src[b]}: enc_q's posterior scale exp(logs_q) underflows to 0 (logs_q down to "
                              f"{low:.4g}): log q(z) is infinite; the audit stops, no report is written",
                              "enc_q", src[b])
    eps = utterance_noise(batch, particles, m_q.shape[1], seed).to(device=m_q.device, dtype=m_q.dtype)
    z = (m_q + eps * scale) * mask
    check_finite(z, "draw z", "enc_q", src, 1)
    z_p, logdet = generator.flow.forward_and_logdet(z, mask, g=g)
    check_finite(z_p * mask, "z_p = flow(z)", "flow", src, 1)
    check_finite(logdet, "log-determinant", "flow", src, 1)
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
    :class:`~pyro_vits.distributions.flow_prior.FlowPrior`. Attributes ``m_p, logs_p, mask, g`` as FlowPrior's."""

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
    ``c`` of ``z_p`` ``(C,)`` the sums over utterances and frames (mean over draws) of VITS's KL term's
    channel-``c`` part (in ``z_p`` coordinates, not a per-channel KL) and of ``logs_q - logs_p``, and the
    summed variance over draws of each utterance's channel part; how many (frame, draw) pairs of draws 1..K-1
    share draw 0's token, out of how many."""

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
        for name, value in values.items():
            check_finite(value, "KL estimate", f"estimator {name}", batch.sources, 1)
        draws.add(batch, latents, values)
    if not draws.frames:
        raise ValueError("no utterances to audit")
    return draws
