"""The VITS prior as a Pyro generative model, and an evaluator."""

from __future__ import annotations

from typing import Any

import pyro
import torch
from torch import Tensor, nn

from .._validate import check_nonnegative_ints
from ..data.batch import Batch, utterance_plate
from ..distributions.flow_prior import FlowPrior
from ..distributions.masked_normal import MaskedNormal
from ..flows import ResidualCouplingBlock, flatten_leading

DECODERS = ("conv1x1", "identity")


class VITSPriorModel(nn.Module):
    """VITS's prior flow as a Pyro model; call it as ``model(batch, subsample_size=None, subsample=None)``.

    Owns ``flow`` (:class:`ResidualCouplingBlock`, so parameter names are VITS's ``flow.flows.…``),
    ``emb_g`` (``nn.Embedding(n_speakers, gin_channels)``, only when ``n_speakers > 0``) and ``dec``:
    ``decoder="conv1x1"`` is a learnable ``Conv1d(C, C, 1)`` initialised to the identity,
    ``decoder="identity"`` a fixed identity (used by the teacher, whose log-likelihood is then exactly
    importance-sampled by :class:`~pyro_vits.models.guides.ObservationGuide`). ``sigma_x`` is fixed.
    Parameters are registered with ``pyro.module(name, self)`` on every call.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        kernel_size: int = 5,
        dilation_rate: int = 1,
        n_layers: int = 4,
        n_flows: int = 4,
        *,
        n_speakers: int = 0,
        gin_channels: int = 0,
        mean_only: bool = True,
        sigma_x: float = 0.1,
        decoder: str = "conv1x1",
        name: str = "model",
    ) -> None:
        super().__init__()
        check_nonnegative_ints(n_speakers=n_speakers)
        if (n_speakers > 0) != (gin_channels > 0):
            raise ValueError(f"n_speakers and gin_channels must be both 0 or both positive, got "
                             f"n_speakers={n_speakers}, gin_channels={gin_channels}")
        if not isinstance(sigma_x, (int, float)) or not sigma_x > 0:
            raise ValueError(f"sigma_x must be a positive float, got {sigma_x!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        self.config: dict[str, Any] = dict(
            channels=channels, hidden_channels=hidden_channels, kernel_size=kernel_size,
            dilation_rate=dilation_rate, n_layers=n_layers, n_flows=n_flows, n_speakers=n_speakers,
            gin_channels=gin_channels, mean_only=mean_only, sigma_x=float(sigma_x), decoder=decoder,
            name=name,
        )
        self.channels = channels
        self.sigma_x = float(sigma_x)
        self.pyro_name = name
        self.flow = ResidualCouplingBlock(
            channels, hidden_channels, kernel_size, dilation_rate, n_layers, n_flows,
            gin_channels=gin_channels, mean_only=mean_only,
        )
        if n_speakers > 0:
            self.emb_g = nn.Embedding(n_speakers, gin_channels)
        if decoder == "conv1x1":
            self.dec: nn.Module = nn.Conv1d(channels, channels, 1)
            with torch.no_grad():
                self.dec.weight.copy_(torch.eye(channels).unsqueeze(-1))
                self.dec.bias.zero_()
        else:
            self.dec = nn.Identity()

    @property
    def n_speakers(self) -> int:
        return self.config["n_speakers"]

    def speaker_embedding(self, batch: Batch) -> Tensor | None:
        """``g (B, gin, 1)`` or None."""
        if self.n_speakers == 0:
            return None
        if batch.speaker is None:
            raise ValueError(f"this model has {self.n_speakers} speakers but batch.speaker is None")
        return self.emb_g(batch.speaker).unsqueeze(-1)

    def prior(self, batch: Batch) -> FlowPrior:
        """``p(z)`` for every utterance of ``batch``; batch shape ``(B,)``, event ``(C, T)``."""
        return FlowPrior(batch.m_p, batch.logs_p, self.flow, batch.mask, self.speaker_embedding(batch),
                         validate_args=False)

    def decode(self, z: Tensor) -> Tensor:
        """``z (..., C, T) -> (..., C, T)``."""
        h, _, _, lead = flatten_leading(z, z.new_ones(z.shape[:-2] + (1, z.shape[-1])), None)
        out = self.dec(h)
        return out.reshape(lead + out.shape[-2:])

    def likelihood(self, z: Tensor, batch: Batch) -> MaskedNormal:
        """``p(x | z) = MaskedNormal(dec(z), sigma_x, mask)`` for ``z (..., B, C, T)``."""
        return MaskedNormal(self.decode(z), z.new_tensor(self.sigma_x), batch.mask, validate_args=False)

    def forward(
        self, batch: Batch, subsample_size: int | None = None, subsample: Tensor | None = None
    ) -> Tensor:
        """Pyro model: sample sites ``"z"`` (latent) and ``"x"`` (observed); returns ``z (B, C, T)``."""
        if batch.channels != self.channels:
            raise ValueError(f"batch has {batch.channels} channels, the model {self.channels}")
        pyro.module(self.pyro_name, self)
        with utterance_plate(batch, subsample_size, subsample) as idx:
            sub = batch.subset(idx)
            z = pyro.sample("z", self.prior(sub))
            pyro.sample("x", self.likelihood(z, sub), obs=sub.x)
        return z
