"""Shared by the data-parallel tests: a ``MaskedNormal`` with fixed noise and a free loopback port."""

from __future__ import annotations

import socket

import torch

from pyro_vits.distributions import MaskedNormal


class FixedNoiseNormal(MaskedNormal):
    """``MaskedNormal`` whose ``rsample`` is ``loc + scale * eps`` with a given ``eps``."""

    def __init__(self, loc, scale, mask, eps):
        super().__init__(loc, scale, mask, validate_args=False)
        self.eps = eps

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, type(self).__new__(type(self)))
        new.eps = self.eps.expand(torch.Size(batch_shape) + self.event_shape)
        return new

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        return (self.loc + self.scale * self.eps.expand(shape)) * self.mask


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
