"""VITS's latent model of speech as a Pyro program: text -> aligned flow prior -> spectrogram.

Generative model (utterance ``n`` with symbol ids ``text_n`` (L_n,), ``T_n`` spectrogram frames, speaker
embedding ``g_n``)::

    m_p, logs_p = enc_p(text_n)                             # (C, L_n) per symbol: VITS's TextEncoder
    A(z)        = maximum_path(neg_cent(f(z; g_n), m_p, logs_p))   # (T_n, L_n) hard monotonic alignment
    z_n ~ FlowPrior(m_p A(z)^T, logs_p A(z)^T, f, mask_n, g_n)      # (C, T_n): N(f(z); A m_p, A s_p)|det f'|
    x_n | z_n ~ MaskedNormal(dec(z_n), exp(log_sigma_x), mask_n)   # x = log |STFT| (F, T_n), nats

Guide: VITS's posterior encoder (:class:`~pyro_vits.guide.PosteriorEncoder`) on the linear magnitude
spectrogram, ``q(z_n | spec_n) = N(m_q, exp(logs_q))``, sharing the model's speaker embedding ``emb_g``
as VITS's ``enc_q`` does.

**The alignment.** As in VITS, the alignment is not a random variable but a function of the latent: for each
value of ``z`` it is the monotonic path that maximises ``log N(f(z); A m_p, A s_p)`` (Viterbi, computed
without gradients by :func:`~pyro_vits.data.align.maximum_path` on the ``neg_cent`` of ``z_p = f(z)``). The
prior density at ``z`` is therefore ``max_A p(z | A)`` (unnormalised over alignments, exactly VITS's
objective), and :meth:`AlignedFlowPrior.log_prob` evaluates it at whatever ``z`` it is given. In an ELBO the
``z`` is the guide's draw: every particle ``k`` gets its own alignment ``A(z_k)`` from its own ``z_p``. At
``K = 1`` this is VITS's training forward step for step: ``z ~ enc_q``, ``z_p = flow(z)``, ``neg_cent`` and
``maximum_path`` on that ``z_p`` under ``no_grad``, ``m_p, logs_p`` expanded by the path, and the KL term
``-H(q) - log p(z)`` equals ``kl_loss(z_p, logs_q, m_p, logs_p, z_mask)`` times the frame count (plus the
flow's ``-log|det|``, zero for VITS's mean-only couplings). There is no duration predictor: it does not
enter the KL term; drawing from the prior (``rsample``, prior predictive checks only) spreads the symbols
evenly over the frames instead.

The observation model replaces VITS's HiFi-GAN decoder and mel-spectrogram L1 loss (no vocoder, no GAN): a
light convolutional decoder of ``z`` to the log-magnitude linear spectrogram with a learned per-bin scale.
The KL term, the object of study, is identical to VITS's.
"""

from __future__ import annotations

from typing import Any

import pyro
import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor, nn

from ._validate import check_positive_ints
from .data.align import attention_mask, expand_prior, maximum_path, neg_cent
from .data.speech_data import SpeechData
from .flows import ResidualCouplingBlock
from .guide import PosteriorEncoder
from .prior import FlowPrior, MaskedNormal
from .text_encoder import TextEncoder

__all__ = ["AlignedFlowPrior", "SpectrogramDecoder", "SpeechModel", "even_alignment", "log_spectrogram",
           "speech_model_and_guide"]

LOG_FLOOR = 1e-5
"""Magnitudes are floored here before the log (VITS's spectrogram is already >= 1e-3)."""


def log_spectrogram(spec: Tensor) -> Tensor:
    """The observation: ``log(max(spec, 1e-5))``, same shape; padded frames are masked by the caller."""
    return torch.log(spec.clamp(min=LOG_FLOOR))


def even_alignment(mask: Tensor, text_mask: Tensor) -> Tensor:
    """The monotonic path that spreads each utterance's ``L`` symbols evenly over its ``T`` frames: frame
    ``t`` -> symbol ``floor(t L / T)``. ``mask (..., 1, T)``, ``text_mask (..., 1, L)`` -> ``(..., T, L)``."""
    frames, symbols = mask.sum(-1, keepdim=True), text_mask.sum(-1, keepdim=True)  # (..., 1, 1)
    t = torch.arange(mask.shape[-1], device=mask.device, dtype=mask.dtype)
    token = torch.floor(t * symbols[..., 0] / frames[..., 0].clamp(min=1))  # (..., T)
    path = token.unsqueeze(-1) == torch.arange(text_mask.shape[-1], device=mask.device, dtype=mask.dtype)
    return path.to(mask.dtype) * mask.transpose(-1, -2) * text_mask


def _flat(value: Tensor, lead: torch.Size) -> Tensor:
    """``value (..., A, B)`` broadcast to ``lead + (A, B)`` and flattened to ``(-1, A, B)``."""
    return value.expand(lead + value.shape[-2:]).reshape((-1,) + value.shape[-2:])


class AlignedFlowPrior(TorchDistribution):
    """VITS's text-conditioned prior over ``z (..., C, T)``, event ``(C, T)``: the flow prior of the
    per-symbol statistics expanded by the alignment that ``z`` itself selects (see the module docstring).

    ``m_p, logs_p (..., C, L)`` per symbol with ``text_mask (..., 1, L)``; ``mask (..., 1, T)`` frames;
    ``g (..., gin, 1)`` or None. ``log_prob(z)`` runs the flow once: ``z_p = f(z)`` feeds both the alignment
    (detached) and ``log N(z_p; A m_p, A s_p) + log|det df/dz|`` (nats per utterance, padded frames 0).
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, m_p: Tensor, logs_p: Tensor, text_mask: Tensor, flow: ResidualCouplingBlock,
                 mask: Tensor, g: Tensor | None = None, validate_args: bool | None = None) -> None:
        if not isinstance(flow, ResidualCouplingBlock):
            raise TypeError(f"flow must be a ResidualCouplingBlock, got {type(flow).__name__}")
        if m_p.dim() < 2 or m_p.shape[-2] != flow.channels or logs_p.shape != m_p.shape:
            raise ValueError(f"m_p and logs_p must both have shape (..., C={flow.channels}, L), got "
                             f"{tuple(m_p.shape)} and {tuple(logs_p.shape)}")
        if text_mask.shape[-2:] != (1, m_p.shape[-1]) or mask.dim() < 2 or mask.shape[-2] != 1:
            raise ValueError(f"text_mask must be (..., 1, L={m_p.shape[-1]}) and mask (..., 1, T), got "
                             f"{tuple(text_mask.shape)} and {tuple(mask.shape)}")
        shapes = [m_p.shape[:-2], text_mask.shape[:-2], mask.shape[:-2]]
        shapes += [] if g is None else [g.shape[:-2]]
        batch_shape = torch.broadcast_shapes(*shapes)
        self.m_p, self.logs_p, self.text_mask, self.flow, self.mask, self.g = (
            m_p, logs_p, text_mask.to(m_p.dtype), flow, mask.to(m_p.dtype), g)
        event_shape = torch.Size((flow.channels, mask.shape[-1]))
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: AlignedFlowPrior | None = None) -> AlignedFlowPrior:
        new = self._get_checked_instance(AlignedFlowPrior, _instance)
        batch_shape = torch.Size(batch_shape)
        for name in ("m_p", "logs_p", "text_mask", "mask"):
            value = getattr(self, name)
            setattr(new, name, value.expand(batch_shape + value.shape[-2:]))
        new.g = None if self.g is None else self.g.expand(batch_shape + self.g.shape[-2:])
        new.flow = self.flow
        super(AlignedFlowPrior, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def alignment(self, z_p: Tensor) -> Tensor:
        """VITS's hard alignment for ``z_p (..., C, T)``: ``maximum_path(neg_cent(z_p, m_p, logs_p))`` under
        ``no_grad``, a 0/1 ``(..., T, L)`` tensor (leading dims broadcast with the batch shape)."""
        lead = torch.broadcast_shapes(z_p.shape[:-2], self.batch_shape)
        with torch.no_grad():
            cent = neg_cent(_flat(z_p.detach(), lead), _flat(self.m_p, lead), _flat(self.logs_p, lead))
            path = maximum_path(cent, attention_mask(_flat(self.text_mask, lead), _flat(self.mask, lead)))
        return path.reshape(lead + path.shape[-2:])

    def expanded(self, path: Tensor) -> tuple[Tensor, Tensor]:
        """Per-frame ``(m_p, logs_p)``, each ``(..., C, T)``, along ``path (..., T, L)``."""
        lead = torch.broadcast_shapes(path.shape[:-2], self.batch_shape)
        m, logs = expand_prior(_flat(path, lead), _flat(self.m_p, lead), _flat(self.logs_p, lead))
        return m.reshape(lead + m.shape[-2:]), logs.reshape(lead + logs.shape[-2:])

    def aligned(self, path: Tensor) -> FlowPrior:
        """The :class:`~pyro_vits.prior.FlowPrior` of the statistics expanded by ``path (..., T, L)``."""
        return FlowPrior(*self.expanded(path), self.flow, self.mask, self.g, validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        if value.shape[-2:] != self.event_shape:
            raise ValueError(f"z must have shape (..., {self.event_shape[0]}, {self.event_shape[1]}), got "
                             f"{tuple(value.shape)}")
        z_p, logdet = self.flow.forward_and_logdet(value, self.mask, self.g)
        m, logs = self.expanded(self.alignment(z_p))
        return MaskedNormal(m, torch.exp(logs), self.mask, validate_args=False).log_prob(z_p) + logdet

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """A prior draw with the symbols spread evenly over the frames (:func:`even_alignment`)."""
        return self.aligned(even_alignment(self.mask, self.text_mask)).rsample(sample_shape)


class SpectrogramDecoder(nn.Module):
    """``z (N, C, T) -> (N, F, T)``: ``Conv1d(C, H, k)`` -> LeakyReLU -> ``Conv1d(H, H, k)`` -> LeakyReLU
    -> ``Conv1d(H, F, 1)``, masked after every layer (a light stand-in for VITS's waveform decoder)."""

    def __init__(self, channels: int, out_channels: int, hidden_channels: int, kernel_size: int = 5) -> None:
        super().__init__()
        check_positive_ints(channels=channels, out_channels=out_channels, hidden_channels=hidden_channels,
                            kernel_size=kernel_size)
        pad = kernel_size // 2
        self.pre = nn.Conv1d(channels, hidden_channels, kernel_size, padding=pad)
        self.mid = nn.Conv1d(hidden_channels, hidden_channels, kernel_size, padding=pad)
        self.proj = nn.Conv1d(hidden_channels, out_channels, 1)

    def forward(self, z: Tensor, mask: Tensor) -> Tensor:
        h = nn.functional.leaky_relu(self.pre(z * mask), 0.1) * mask
        h = nn.functional.leaky_relu(self.mid(h), 0.1) * mask
        return self.proj(h) * mask


class SpeechModel(nn.Module):
    """The module docstring's model; call it as ``model(batch, subsample_size=None, subsample=None)`` on a
    :class:`~pyro_vits.data.speech_data.SpeechData`. Sample sites ``"z"`` ``(B, C, T)`` and ``"x"``
    (observed log-magnitude spectrogram ``(B, F, T)``) inside the ``"utterances"`` plate.

    Parts, with VITS's names: ``enc_p`` (:class:`~pyro_vits.text_encoder.TextEncoder`), ``flow``
    (:class:`~pyro_vits.flows.ResidualCouplingBlock`, kernel 5, dilation 1 as VITS), ``emb_g`` (when
    ``n_speakers > 0``); then ``dec`` (:class:`SpectrogramDecoder`) and ``log_sigma_x (F,)``.
    ``p_dropout`` is the text encoder's dropout (default 0: the model is then a deterministic function of
    its sample sites, which the estimator comparisons assume).
    """

    def __init__(
        self,
        n_vocab: int,
        spec_channels: int,
        inter_channels: int = 192,
        hidden_channels: int = 192,
        filter_channels: int = 768,
        n_heads: int = 2,
        n_layers: int = 6,
        kernel_size: int = 3,
        p_dropout: float = 0.0,
        *,
        flow_n_layers: int = 4,
        n_flows: int = 4,
        mean_only: bool = True,
        n_speakers: int = 0,
        gin_channels: int = 0,
        decoder_channels: int = 128,
        name: str = "model",
    ) -> None:
        super().__init__()
        check_positive_ints(n_vocab=n_vocab, spec_channels=spec_channels, decoder_channels=decoder_channels)
        if not isinstance(n_speakers, int) or n_speakers < 0 or (n_speakers > 0) != (gin_channels > 0):
            raise ValueError("n_speakers and gin_channels must be non-negative ints, both 0 or both "
                             f"positive, got n_speakers={n_speakers!r}, gin_channels={gin_channels!r}")
        self.config: dict[str, Any] = dict(
            n_vocab=n_vocab, spec_channels=spec_channels, inter_channels=inter_channels,
            hidden_channels=hidden_channels, filter_channels=filter_channels, n_heads=n_heads,
            n_layers=n_layers, kernel_size=kernel_size, p_dropout=p_dropout, flow_n_layers=flow_n_layers,
            n_flows=n_flows, mean_only=mean_only, n_speakers=n_speakers, gin_channels=gin_channels,
            decoder_channels=decoder_channels, name=name,
        )
        self.pyro_name = name
        self.enc_p = TextEncoder(n_vocab, inter_channels, hidden_channels, filter_channels, n_heads, n_layers,
                                 kernel_size, p_dropout)
        self.flow = ResidualCouplingBlock(inter_channels, hidden_channels, 5, 1, flow_n_layers, n_flows,
                                          gin_channels=gin_channels, mean_only=mean_only)
        if n_speakers > 0:
            self.emb_g = nn.Embedding(n_speakers, gin_channels)
        self.dec = SpectrogramDecoder(inter_channels, spec_channels, decoder_channels)
        self.log_sigma_x = nn.Parameter(torch.zeros(spec_channels))

    @property
    def n_speakers(self) -> int:
        return self.config["n_speakers"]

    def speaker_embedding(self, batch: SpeechData) -> Tensor | None:
        """``g (B, gin, 1)`` or None."""
        if self.n_speakers == 0:
            return None
        if batch.speaker is None:
            raise ValueError(f"this model has {self.n_speakers} speakers but batch.speaker is None")
        return self.emb_g(batch.speaker).unsqueeze(-1)

    def prior(self, batch: SpeechData) -> AlignedFlowPrior:
        """``p(z | text)`` for every utterance of ``batch``: batch shape ``(B,)``, event ``(C, T)``."""
        _, m_p, logs_p, text_mask = self.enc_p(batch.text, batch.text_lengths)
        return AlignedFlowPrior(m_p, logs_p, text_mask, self.flow, batch.mask, self.speaker_embedding(batch))

    def likelihood(self, z: Tensor, batch: SpeechData) -> MaskedNormal:
        """``p(x | z)`` for ``z (..., B, C, T)``: Gaussian on the log-magnitude spectrogram."""
        lead = z.shape[:-2]
        mask = batch.mask.expand(lead + batch.mask.shape[-2:]).reshape((-1, 1, z.shape[-1]))
        loc = self.dec(z.reshape((-1,) + z.shape[-2:]), mask)
        loc = loc.reshape(lead + loc.shape[-2:])
        return MaskedNormal(loc, torch.exp(self.log_sigma_x)[:, None], batch.mask, validate_args=False)

    def forward(self, batch: SpeechData, subsample_size: int | None = None,
                subsample: Tensor | None = None) -> Tensor:
        """Pyro model; returns ``z (B, C, T)``."""
        if not isinstance(batch, SpeechData):
            raise TypeError(f"batch must be a SpeechData, got {type(batch).__name__}")
        if batch.channels != self.config["spec_channels"]:
            raise ValueError(f"batch has {batch.channels} frequency bins, the model "
                             f"{self.config['spec_channels']}")
        pyro.module(self.pyro_name, self)
        with pyro.plate("utterances", batch.n, subsample_size=subsample_size, subsample=subsample, dim=-1,
                        device=batch.device) as idx:
            sub = batch.subset(idx)
            z = pyro.sample("z", self.prior(sub))
            pyro.sample("x", self.likelihood(z, sub), obs=log_spectrogram(sub.spec) * sub.mask)
        return z


def speech_model_and_guide(
    n_vocab: int, spec_channels: int, *, guide_layers: int = 16, **model_kwargs: Any
) -> tuple[SpeechModel, PosteriorEncoder]:
    """A :class:`SpeechModel` and VITS's posterior encoder as its guide (``spec_channels -> inter_channels``,
    ``hidden_channels``, kernel 5, dilation 1, ``guide_layers`` WN layers, as VITS's ``enc_q``), the guide
    sharing the model's ``emb_g`` (so the pair exports as one VITS generator)."""
    model = SpeechModel(n_vocab, spec_channels, **model_kwargs)
    cfg = model.config
    guide = PosteriorEncoder(spec_channels, cfg["inter_channels"], cfg["hidden_channels"], 5, 1, guide_layers,
                             n_speakers=cfg["n_speakers"], gin_channels=cfg["gin_channels"])
    if cfg["n_speakers"] > 0:
        guide.emb_g = model.emb_g
    return model, guide

