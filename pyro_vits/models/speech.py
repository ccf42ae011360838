"""VITS's latent model of speech as a Pyro program: text -> aligned flow prior -> spectrogram.

Generative model (utterance ``n`` with symbol ids ``text_n`` (L_n,), ``T_n`` spectrogram frames, speaker
embedding ``g_n``)::

    m_p, logs_p = enc_p(text_n)                             # (C, L_n) per symbol: VITS's TextEncoder
    A(z)        = maximum_path(neg_cent(f(z; g_n), m_p, logs_p))   # (T_n, L_n) hard monotonic alignment
    z_n ~ FlowPrior(m_p A(z)^T, logs_p A(z)^T, f, mask_n, g_n)      # (C, T_n): N(f(z); A m_p, A s_p)|det f'|
    x_n | z_n ~ MaskedNormal(dec(z_n), exp(log_sigma_x), mask_n)   # gaussian-linear: x = log |STFT| (F, T_n)
    x_n | z_n ~ MaskedLaplace(dec(z_n), n_mels / c_mel, mask_n)    # laplace-mel: x = log-mel (80, T_n)

Guide: VITS's posterior encoder (:class:`~pyro_vits.models.guides.PosteriorEncoder`) on the linear magnitude
spectrogram, ``q(z_n | spec_n) = N(m_q, exp(logs_q))``, sharing the model's speaker embedding ``emb_g``
as VITS's ``enc_q`` does.

**The alignment.** As in VITS, the alignment is not a random variable but a function of the latent: for each
value of ``z`` it is the monotonic path that maximises ``log N(f(z); A m_p, A s_p)`` (Viterbi, computed
without gradients by :func:`~pyro_vits.nn.alignment.maximum_path` on the ``neg_cent`` of ``z_p = f(z)``). The
prior density at ``z`` is therefore ``max_A p(z | A)`` (unnormalised over alignments, exactly VITS's
objective), and :meth:`AlignedFlowPrior.log_prob` evaluates it at whatever ``z`` it is given. In an ELBO the
``z`` is the guide's draw: every particle ``k`` gets its own alignment ``A(z_k)`` from its own ``z_p``. At
``K = 1`` this is VITS's training forward step for step: ``z ~ enc_q``, ``z_p = flow(z)``, ``neg_cent`` and
``maximum_path`` on that ``z_p`` under ``no_grad``, ``m_p, logs_p`` expanded by the path, and the KL term
``-H(q) - log p(z)`` equals ``kl_loss(z_p, logs_q, m_p, logs_p, z_mask)`` times the frame count (plus the
flow's ``-log|det|``, zero for VITS's mean-only couplings). There is no duration predictor: it does not
enter the KL term; drawing from the prior (``rsample``, prior predictive checks only) spreads the symbols
evenly over the frames instead.

The observation model replaces VITS's HiFi-GAN decoder (no vocoder, no GAN) by a light convolutional decoder
of ``z``, with one of two likelihoods (:data:`LIKELIHOODS`):

- ``"gaussian-linear"`` (default): a Gaussian on the log-magnitude linear spectrogram (``F = n_fft / 2 + 1``
  bins) with a learned per-bin scale ``exp(log_sigma_x)``;
- ``"laplace-mel"``: VITS's loss balance. A Laplace on VITS's 80-bin log-mel spectrogram
  (:func:`~pyro_vits.data.mel.spec_to_mel` of the linear spectrogram, as VITS's ``spec_to_mel_torch``) with
  the fixed scale ``b = n_mels / c_mel`` per bin (``c_mel = 45``, :data:`~pyro_vits.models.refit.C_MEL`), so
  per valid frame ``-log p(x | z) = c_mel * mean_bins |mel - dec(z)| + n_mels * log(2 b)``: VITS's
  ``c_mel * l1`` plus a constant (101.5 nats per frame), against the KL term per frame (VITS's ``c_kl = 1``).

The KL term, the object of study, is identical to VITS's under either."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..data.speech_batches import SpeechConfig
from ..data.speech_data import SpeechData
from ..data.text import VITS_SYMBOLS
from ..distributions.aligned import AlignedFlowPrior

__all__ = ["LIKELIHOODS", "LOG_FLOOR", "N_MELS", "PRESETS", "SIZE_KEYS", "SpectrogramDecoder", "SpeechModel",
           "build_pair", "log_spectrogram", "speech_model_and_guide"]

logger = logging.getLogger("pyro_vits")

import pyro
from torch import Tensor, nn

from .._validate import check_positive_ints
from ..data.mel import spec_to_mel
from ..distributions.masked_laplace import MaskedLaplace
from ..distributions.masked_normal import MaskedNormal
from ..flows import ResidualCouplingBlock
from ..nn.text_encoder import TextEncoder
from .guides import PosteriorEncoder
from .refit import C_MEL

N_MELS = 80
"""Mel bins of the ``"laplace-mel"`` likelihood (VITS's ``n_mel_channels``)."""

LOG_FLOOR = 1e-5
"""Magnitudes are floored here before the log (VITS's spectrogram is already >= 1e-3)."""


LIKELIHOODS = {
    "gaussian-linear": "a Gaussian on the log-magnitude linear spectrogram (n_fft / 2 + 1 bins) with a learned "
                       "per-bin scale",
    "laplace-mel": "VITS's loss balance, a Laplace on VITS's 80-bin log-mel spectrogram with the fixed scale "
                   "b = 80/45 per bin, so that −log p(x | z) per frame = 45 × (mean over bins of |mel − dec(z)|) "
                   "+ 80 log(2b) (101.5 nats): VITS's mel L1 with c_mel = 45 against the KL per frame "
                   "(c_kl = 1)",
}
"""The observation models of ``x | z`` (the module docstring), each with the page's one-line description."""


def log_spectrogram(spec: Tensor) -> Tensor:
    """The observation: ``log(max(spec, 1e-5))``, same shape; padded frames are masked by the caller."""
    return torch.log(spec.clamp(min=LOG_FLOOR))


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
    (observed :meth:`observation` of the spectrogram, ``(B, F_x, T)``) inside the ``"utterances"`` plate.

    Parts, with VITS's names: ``enc_p`` (:class:`~pyro_vits.nn.text_encoder.TextEncoder`), ``flow``
    (:class:`~pyro_vits.flows.ResidualCouplingBlock`, kernel 5, dilation 1 as VITS), ``emb_g`` (when
    ``n_speakers > 0``); then ``dec`` (:class:`SpectrogramDecoder`, ``C -> F_x``) and, for
    ``likelihood="gaussian-linear"``, ``log_sigma_x (F,)``. ``likelihood`` is one of :data:`LIKELIHOODS`:
    ``F_x = spec_channels`` (``"gaussian-linear"``) or :data:`N_MELS` (``"laplace-mel"``, whose mel
    filterbank is that of ``sampling_rate`` Hz and ``n_fft = 2 (spec_channels - 1)``).
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
        likelihood: str = "gaussian-linear",
        sampling_rate: int = 22050,
        name: str = "model",
    ) -> None:
        super().__init__()
        check_positive_ints(n_vocab=n_vocab, spec_channels=spec_channels, decoder_channels=decoder_channels,
                            sampling_rate=sampling_rate)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {tuple(LIKELIHOODS)}, got {likelihood!r}")
        if not isinstance(n_speakers, int) or n_speakers < 0 or (n_speakers > 0) != (gin_channels > 0):
            raise ValueError("n_speakers and gin_channels must be non-negative ints, both 0 or both "
                             f"positive, got n_speakers={n_speakers!r}, gin_channels={gin_channels!r}")
        self.config: dict[str, Any] = dict(
            n_vocab=n_vocab, spec_channels=spec_channels, inter_channels=inter_channels,
            hidden_channels=hidden_channels, filter_channels=filter_channels, n_heads=n_heads,
            n_layers=n_layers, kernel_size=kernel_size, p_dropout=p_dropout, flow_n_layers=flow_n_layers,
            n_flows=n_flows, mean_only=mean_only, n_speakers=n_speakers, gin_channels=gin_channels,
            decoder_channels=decoder_channels, likelihood=likelihood, sampling_rate=sampling_rate, name=name,
        )
        self.pyro_name = name
        self.enc_p = TextEncoder(n_vocab, inter_channels, hidden_channels, filter_channels, n_heads, n_layers,
                                 kernel_size, p_dropout)
        self.flow = ResidualCouplingBlock(inter_channels, hidden_channels, 5, 1, flow_n_layers, n_flows,
                                          gin_channels=gin_channels, mean_only=mean_only)
        if n_speakers > 0:
            self.emb_g = nn.Embedding(n_speakers, gin_channels)
        mel = likelihood == "laplace-mel"
        self.dec = SpectrogramDecoder(inter_channels, N_MELS if mel else spec_channels, decoder_channels)
        if not mel:
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

    def observation(self, spec: Tensor) -> Tensor:
        """The observed ``x (..., F_x, T)`` of linear magnitudes ``spec (..., F, T)``: ``log max(spec, 1e-5)``
        (``"gaussian-linear"``) or VITS's log-mel ``log max(mel_basis @ spec, 1e-5)`` (``"laplace-mel"``),
        natural log; padded frames are masked by the caller."""
        if self.config["likelihood"] == "gaussian-linear":
            return log_spectrogram(spec)
        n_fft = 2 * (self.config["spec_channels"] - 1)
        return spec_to_mel(spec, self.config["sampling_rate"], n_fft, N_MELS)

    def likelihood(self, z: Tensor, batch: SpeechData) -> MaskedNormal | MaskedLaplace:
        """``p(x | z)`` for ``z (..., B, C, T)``, event ``(F_x, T)``:
        ``MaskedNormal(dec(z), exp(log_sigma_x))`` or ``MaskedLaplace(dec(z), N_MELS / C_MEL)`` (the module
        docstring)."""
        lead = z.shape[:-2]
        mask = batch.mask.expand(lead + batch.mask.shape[-2:]).reshape((-1, 1, z.shape[-1]))
        loc = self.dec(z.reshape((-1,) + z.shape[-2:]), mask)
        loc = loc.reshape(lead + loc.shape[-2:])
        if self.config["likelihood"] == "laplace-mel":
            return MaskedLaplace(loc, loc.new_tensor(N_MELS / C_MEL), batch.mask, validate_args=False)
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
            pyro.sample("x", self.likelihood(z, sub), obs=self.observation(sub.spec) * sub.mask)
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


SIZE_KEYS = ("inter_channels", "hidden_channels", "filter_channels", "n_heads", "n_layers", "flow_n_layers",
             "n_flows", "guide_layers", "decoder_channels", "gin_channels")


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(n_fft=512, hop_length=256, inter_channels=16, hidden_channels=64, filter_channels=128,
                n_heads=2, n_layers=2, flow_n_layers=2, n_flows=4, guide_layers=4, decoder_channels=64,
                gin_channels=16, steps=300, batch_size=8, lr=2e-3, max_utterances=300, max_frames=900,
                eval_samples=4, eval_size=32, heldout_size=24),
    "vits": dict(n_fft=1024, hop_length=256, inter_channels=192, hidden_channels=192, filter_channels=768,
                 n_heads=2, n_layers=6, flow_n_layers=4, n_flows=4, guide_layers=16, decoder_channels=256,
                 gin_channels=256, steps=20000, batch_size=32, lr=2e-4, max_utterances=None, max_frames=1000,
                 eval_samples=8, eval_size=64, heldout_size=48),
}
"""Defaults by preset; an explicit option wins."""


def build_pair(sizes: dict[str, Any], speech: SpeechConfig, n_speakers: int, mean_only: bool = True,
               seed: int = 0, likelihood: str = "gaussian-linear") -> tuple[SpeechModel, Any]:
    """Model and guide of the given ``sizes`` (:data:`SIZE_KEYS`) and ``likelihood`` (:data:`LIKELIHOODS`)
    for ``speech``'s spectrogram, initialised from ``seed`` (the global random state is left as it was)."""
    kwargs = {k: sizes[k] for k in SIZE_KEYS if k not in ("guide_layers", "gin_channels")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return speech_model_and_guide(
            len(VITS_SYMBOLS), speech.n_freq, guide_layers=sizes["guide_layers"], mean_only=mean_only,
            n_speakers=n_speakers, gin_channels=sizes["gin_channels"] if n_speakers else 0,
            likelihood=likelihood, sampling_rate=speech.sampling_rate, **kwargs)
