"""Refit VITS's posterior encoder against a trained voice: the frozen prior (``enc_p``, ``flow``) and decoder
(``dec``), VITS's generator loss without the adversarial terms, as a Pyro model.

For a minibatch of ``B`` utterances (linear spectrogram ``spec`` for ``enc_q``, text ids in the voice's symbol
table, the waveform ``y``)::

    z ~ AlignedFlowPrior(enc_p(text), flow, g)            # VITS's prior, MAS on z_p = flow(z) per draw
    ids ~ rand_slice_segments(lengths, segment_frames)     # VITS's commons.rand_slice_segments
    factor("recon", -c_mel * mean|mel(dec(z[ids])) - mel(y)[ids]| * F_b)   # VITS: y_hat_mel vs sliced y_mel

Guide: :class:`~pyro_vits.models.guides.PosteriorEncoder` on ``spec`` (VITS's ``enc_q``).

**Normalisation.** VITS's generator loss (without GAN, feature matching and duration terms) is
``L = c_mel * l1 + kl`` with ``l1`` the mean of ``|mel(y_hat) - mel(y)|`` over all ``B x n_mels x S``
segment elements (``F.l1_loss``), ``kl = KL_sum / F_b`` (``losses.kl_loss``: summed over utterances,
channels and valid frames, divided by the minibatch's valid frame count ``F_b``), ``c_mel = 45``, ``c_kl = 1``.
In the ELBO the KL part is ``-log p(z) - H(q)`` (``vits`` ELBO) summed over the minibatch, i.e. ``KL_sum``,
and Pyro scales every site in the subsampled ``"utterances"`` plate by ``N / B``. The factor adds, split evenly
over the ``B`` utterances, ``c_mel * l1 * F_b``. So the ELBO loss of a step is exactly
``(N / B) * F_b * L`` and its gradient ``(N / B) * F_b`` times VITS's: the same direction every step, with the
known factor ``N / B * F_b`` (``F_b`` = the minibatch's valid spectrogram frames, which changes from step to
step with the utterances drawn; Adam is invariant to a constant factor, not to that per-step one). All
logged losses and ``*_per_frame`` values are in these nats (``loss / F`` is VITS's ``L`` per utterance set).

``enc_p``, ``flow``, ``dec`` and ``emb_g`` are frozen: ``requires_grad=False``, kept in eval mode, never
registered in Pyro's parameter store."""

from __future__ import annotations

from typing import Any

import pyro
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..data.mel import mel_spectrogram
from ..data.refit_corpus import RefitData
from ..distributions.aligned import AlignedFlowPrior
from .guides import PosteriorEncoder

__all__ = ["C_MEL", "RefitModel", "rand_slice_segments", "refit_guide"]

C_MEL = 45.0
"""VITS's ``c_mel``."""


def rand_slice_segments(lengths: Tensor, segment_frames: int) -> Tensor:
    """VITS's ``commons.rand_slice_segments`` start frames ``(M,)``: uniform in
    ``[0, max(lengths - segment_frames, 0)]`` (from the global torch RNG)."""
    high = (lengths - segment_frames + 1).clamp(min=1)
    return (torch.rand(lengths.shape, device=lengths.device) * high).long()


def _slice(x: Tensor, starts: Tensor, size: int) -> Tensor:
    """``x (M, C, T)`` -> ``(M, C, size)`` from ``starts (M,)`` (zero-padded past the end)."""
    if x.shape[-1] < int(starts.max()) + size:
        x = F.pad(x, (0, int(starts.max()) + size - x.shape[-1]))
    index = starts[:, None] + torch.arange(size, device=x.device)
    return torch.gather(x, 2, index[:, None, :].expand(x.shape[0], x.shape[1], size))


class RefitModel(nn.Module):
    """The module docstring's model: ``model(batch, subsample_size=None, subsample=None)`` on a
    :class:`~pyro_vits.data.refit_corpus.RefitData`; sample site ``"z" (B, C, T)``, factor ``"recon" (B,)``.

    ``enc_p`` (text encoder returning ``(x, m_p, logs_p, mask)``), ``flow``
    (:class:`~pyro_vits.flows.ResidualCouplingBlock`), ``dec`` (:class:`~pyro_vits.nn.hifigan.Generator`),
    ``emb_g`` (multi-speaker) or None; mel settings as VITS's ``data`` section; ``segment_frames`` (VITS:
    ``segment_size / hop = 8192 / 256 = 32``); ``c_mel`` (45)."""

    def __init__(self, enc_p: nn.Module, flow: nn.Module, dec: nn.Module, emb_g: nn.Embedding | None = None,
                 *, sampling_rate: int = 22050, n_fft: int = 1024, win_length: int = 1024, n_mels: int = 80,
                 segment_frames: int = 32, c_mel: float = C_MEL, name: str = "refit") -> None:
        super().__init__()
        if dec is None:
            raise ValueError("the refit needs the voice's decoder (dec)")
        self.enc_p, self.flow, self.dec, self.emb_g = enc_p, flow, dec, emb_g
        self.hop = int(dec.hop_length)
        for module in self.frozen():
            module.requires_grad_(False)
        self.config: dict[str, Any] = dict(
            sampling_rate=sampling_rate, n_fft=n_fft, hop_length=self.hop, win_length=win_length, n_mels=n_mels,
            segment_frames=segment_frames, c_mel=c_mel, inter_channels=flow.channels,
            n_speakers=0 if emb_g is None else emb_g.num_embeddings, name=name)
        self.train(False)

    def frozen(self) -> list[nn.Module]:
        return [m for m in (self.enc_p, self.flow, self.dec, self.emb_g) if m is not None]

    def train(self, mode: bool = True) -> RefitModel:
        super().train(mode)
        for module in self.frozen():  # frozen parts: deterministic (no dropout)
            module.eval()
        return self

    def speaker_embedding(self, batch: RefitData) -> Tensor | None:
        if self.emb_g is None:
            return None
        if batch.speaker is None:
            raise ValueError("the voice is multi-speaker but the batch has no speaker ids")
        return self.emb_g(batch.speaker).unsqueeze(-1)

    def prior(self, batch: RefitData) -> AlignedFlowPrior:
        _, m_p, logs_p, text_mask = self.enc_p(batch.text, batch.text_lengths)
        return AlignedFlowPrior(m_p, logs_p, text_mask, self.flow, batch.mask, self.speaker_embedding(batch))

    def mel(self, wav: Tensor) -> Tensor:
        c = self.config
        return mel_spectrogram(wav, c["sampling_rate"], c["n_fft"], self.hop, c["win_length"], c["n_mels"])

    def l1(self, z: Tensor, batch: RefitData) -> Tensor:
        """Per utterance ``mean |mel(dec(z_seg)) - mel(y)_seg|`` over ``n_mels x segment_frames``, ``(..., B)``
        for ``z (..., B, C, T)``; one random segment per utterance and particle."""
        lead, seg = z.shape[:-2], self.config["segment_frames"]
        flat = z.reshape((-1,) + z.shape[-2:])
        reps = flat.shape[0] // batch.n
        starts = rand_slice_segments(batch.lengths.repeat(reps), seg)
        z_seg = _slice(flat, starts, seg)
        with torch.no_grad():  # VITS: y_mel = slice_segments(spec_to_mel(spec)): the target's full-context mel
            y_mel = _slice(self.mel(batch.wav).repeat(reps, 1, 1), starts, seg)
        g = self.speaker_embedding(batch)
        if g is not None and getattr(self.dec, "cond", None) is not None:
            g = g.repeat(reps, 1, 1)
        else:
            g = None
        y_hat = self.dec(z_seg, g)[:, 0]
        diff = (self.mel(y_hat) - y_mel).abs().mean(dim=(-2, -1))
        return diff.reshape(lead)

    def forward(self, batch: RefitData, subsample_size: int | None = None,
                subsample: Tensor | None = None) -> Tensor:
        if not isinstance(batch, RefitData):
            raise TypeError(f"batch must be a RefitData, got {type(batch).__name__}")
        with pyro.plate("utterances", batch.n, subsample_size=subsample_size, subsample=subsample, dim=-1,
                        device=batch.device) as idx:
            sub = batch.subset(idx)
            z = pyro.sample("z", self.prior(sub))
            frames = sub.lengths.sum().to(z.dtype)
            # sum over the B utterances = c_mel * (mean over B x n_mels x S) * F_b (see the module docstring)
            pyro.factor("recon", -self.config["c_mel"] * self.l1(z, sub) * frames / sub.n)
        return z


def refit_guide(spec_channels: int, inter_channels: int = 192, hidden_channels: int = 192, *,
                n_layers: int = 16, emb_g: nn.Embedding | None = None, seed: int | None = None) -> PosteriorEncoder:
    """VITS's ``enc_q`` as the guide: ``PosteriorEncoder(spec_channels, inter, hidden, 5, 1, n_layers)``,
    speaker-conditioned (sharing the voice's frozen ``emb_g``, as VITS's ``enc_q`` shares ``emb_g``) when
    ``emb_g`` is given; initialised from ``seed`` (global RNG left as it was) when given."""
    n_speakers, gin = (0, 0) if emb_g is None else (emb_g.num_embeddings, emb_g.embedding_dim)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        guide = PosteriorEncoder(spec_channels, inter_channels, hidden_channels, 5, 1, n_layers,
                                 n_speakers=n_speakers, gin_channels=gin, name="enc_q")
    if emb_g is not None:
        guide.emb_g = emb_g
    return guide
