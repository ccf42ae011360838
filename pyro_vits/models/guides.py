"""Gaussian guides ``q(z | x) = MaskedNormal(m_q, exp(logs_q), mask)`` for
:class:`~pyro_vits.models.prior_model.VITSPriorModel`.

Every guide is an ``nn.Module`` called like the model, ``guide(batch, subsample_size=None, subsample=None)``:
it registers its parameters with ``pyro.module(name, self)`` and samples site ``"z"`` ``(B, C, T)`` inside the
shared ``"utterances"`` plate. ``posterior(batch) -> (m_q, logs_q)``, each ``(N, C, T)`` and exactly 0 on
padded frames, gives the Gaussian itself for estimators.
"""

from __future__ import annotations

import math
from typing import Any

import pyro
import torch
from torch import Tensor, nn

from .._validate import check_nonnegative_ints, check_positive_ints
from ..data.batch import Batch, utterance_plate
from ..distributions.masked_normal import MaskedNormal
from ..flows import WN

__all__ = ["GaussianGuide", "PosteriorEncoder", "LocalGuide", "ObservationGuide"]


class GaussianGuide(nn.Module):
    """Base class: subclasses set ``self.config`` and implement :meth:`posterior`."""

    config: dict[str, Any]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.pyro_name = name

    def posterior(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(m_q, logs_q)``, each ``(N, C, T)``, masked."""
        raise NotImplementedError

    def forward(
        self, batch: Batch, subsample_size: int | None = None, subsample: Tensor | None = None
    ) -> Tensor:
        """Pyro guide: samples ``"z" (B, C, T)`` (exactly 0 on padded frames) and returns it."""
        pyro.module(self.pyro_name, self)
        with utterance_plate(batch, subsample_size, subsample) as idx:
            sub = batch.subset(idx)
            m_q, logs_q = self.posterior(sub)
            return pyro.sample("z", MaskedNormal(m_q, torch.exp(logs_q), sub.mask, validate_args=False))


class PosteriorEncoder(GaussianGuide):
    """Amortised guide, VITS's ``PosteriorEncoder`` (parameter names ``pre``, ``enc``, ``proj``).

    ``x (N, x_channels, T)``: ``pre`` 1x1 conv -> mask -> :class:`WN` (conditioned on a speaker embedding
    ``emb_g`` when ``n_speakers > 0``) -> ``proj`` 1x1 conv to ``2 * channels`` -> mask -> ``m_q, logs_q``.
    Unlike VITS, which shares the generator's ``emb_g``, the guide owns its speaker embedding, so model and
    guide parameters stay disjoint.
    """

    def __init__(
        self,
        x_channels: int,
        channels: int,
        hidden_channels: int,
        kernel_size: int = 5,
        dilation_rate: int = 1,
        n_layers: int = 16,
        *,
        n_speakers: int = 0,
        gin_channels: int = 0,
        name: str = "guide",
    ) -> None:
        super().__init__(name)
        check_positive_ints(x_channels=x_channels, channels=channels, hidden_channels=hidden_channels,
                            kernel_size=kernel_size, dilation_rate=dilation_rate, n_layers=n_layers)
        check_nonnegative_ints(n_speakers=n_speakers, gin_channels=gin_channels)
        if (n_speakers > 0) != (gin_channels > 0):
            raise ValueError(f"n_speakers and gin_channels must be both 0 or both positive, got "
                             f"n_speakers={n_speakers}, gin_channels={gin_channels}")
        self.config = dict(
            x_channels=x_channels, channels=channels, hidden_channels=hidden_channels,
            kernel_size=kernel_size, dilation_rate=dilation_rate, n_layers=n_layers, n_speakers=n_speakers,
            gin_channels=gin_channels, name=name,
        )
        self.channels = channels
        self.pre = nn.Conv1d(x_channels, hidden_channels, 1)
        self.enc = WN(hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels=gin_channels)
        self.proj = nn.Conv1d(hidden_channels, 2 * channels, 1)
        if n_speakers > 0:
            self.emb_g = nn.Embedding(n_speakers, gin_channels)

    def posterior(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(m_q, logs_q)``, each ``(N, channels, T)``, 0 on padded frames, from
        ``batch.x (N, x_channels, T)`` (and ``batch.speaker (N,)`` when speaker-conditioned)."""
        if batch.channels != self.config["x_channels"]:
            raise ValueError(f"batch.x has {batch.channels} channels, the encoder expects "
                             f"{self.config['x_channels']}")
        g = None
        if self.config["n_speakers"] > 0:
            if batch.speaker is None:
                raise ValueError("this guide is speaker-conditioned but batch.speaker is None")
            g = self.emb_g(batch.speaker).unsqueeze(-1)
        return self.encode(batch.x, batch.mask, g)

    def encode(self, x: Tensor, x_mask: Tensor, g: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """VITS's encoder computation: ``x (N, x_channels, T)``, ``x_mask (N, 1, T)``, speaker embedding
        ``g (N, gin_channels, 1)`` or None -> ``(m_q, logs_q)``, each ``(N, channels, T)``, 0 on padding."""
        h = self.pre(x) * x_mask
        h = self.enc(h, x_mask, g=g)
        stats = self.proj(h) * x_mask
        m_q, logs_q = torch.split(stats, self.channels, dim=1)
        return m_q, logs_q


class LocalGuide(GaussianGuide):
    """Non-amortised guide: free ``m_q, logs_q`` parameters ``(num_data, C, T)``, indexed by ``batch.index``.

    ``init_loc`` ``(num_data, C, T)`` (default zeros) and ``init_scale`` set the starting Gaussian.
    """

    def __init__(
        self,
        num_data: int,
        channels: int,
        frames: int,
        *,
        init_loc: Tensor | None = None,
        init_scale: float = 0.1,
        name: str = "guide",
    ) -> None:
        super().__init__(name)
        check_positive_ints(num_data=num_data, channels=channels, frames=frames)
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale!r}")
        shape = (num_data, channels, frames)
        if init_loc is None:
            init_loc = torch.zeros(shape)
        elif not isinstance(init_loc, Tensor) or init_loc.shape != shape:
            raise ValueError(f"init_loc must be a tensor of shape {shape}, got {init_loc!r}")
        self.config = dict(num_data=num_data, channels=channels, frames=frames, init_scale=init_scale,
                           name=name)
        self.m_q = nn.Parameter(init_loc.detach().clone())
        self.logs_q = nn.Parameter(torch.full(shape, math.log(init_scale), dtype=init_loc.dtype))

    def posterior(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The parameters of utterances ``batch.index``: ``(m_q, logs_q)``, each ``(N, C, T)``, 0 on padded
        frames."""
        if batch.x.shape[1:] != self.m_q.shape[1:]:
            raise ValueError(f"batch.x has (C, T) = {tuple(batch.x.shape[1:])}, the guide "
                             f"{tuple(self.m_q.shape[1:])}")
        return self.m_q[batch.index] * batch.mask, self.logs_q[batch.index] * batch.mask


class ObservationGuide(GaussianGuide):
    """Fixed proposal ``q(z | x) = N(x, sigma_x^2)``: no parameters.

    For a model with an identity decoder, ``p(x | z) = q(z | x)`` pointwise, so the importance weight is
    ``p(z)`` alone and :func:`~pyro_vits.infer.evaluate.evaluate` estimates the model's exact ``log p(x)``.
    """

    def __init__(self, sigma_x: float, name: str = "observation_guide") -> None:
        super().__init__(name)
        if not isinstance(sigma_x, (int, float)) or not sigma_x > 0:
            raise ValueError(f"sigma_x must be a positive float, got {sigma_x!r}")
        self.config = dict(sigma_x=float(sigma_x), name=name)
        self.log_sigma = math.log(sigma_x)

    @classmethod
    def for_teacher(cls, teacher: nn.Module) -> ObservationGuide:
        """The proposal matching ``teacher`` (a :class:`~pyro_vits.models.prior_model.VITSPriorModel` with
        ``decoder="identity"``)."""
        config = getattr(teacher, "config", None)
        if (not isinstance(config, dict) or config.get("decoder") != "identity"
                or not hasattr(teacher, "sigma_x")):
            raise ValueError("teacher must be a VITSPriorModel with decoder='identity'")
        return cls(teacher.sigma_x)

    def posterior(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(m_q, logs_q) = (x, log sigma_x)``, each ``(N, C, T)``, 0 on padded frames."""
        return batch.x * batch.mask, torch.full_like(batch.x, self.log_sigma) * batch.mask
