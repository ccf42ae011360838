"""An independent functional HiFi-GAN decoder written for the tests from VITS's published models.Generator /
modules.ResBlock1 / ResBlock2 equations (not imported from the package)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _pad(k, d):
    return (k * d - d) // 2


def ref_generator(p, x, g, resblock, kernels, dilations, rates, ups_kernels):
    """VITS models.Generator.forward from its parameters ``p`` (a flat dict of VITS key -> tensor)."""
    x = F.conv1d(x, p["conv_pre.weight"], p["conv_pre.bias"], padding=3)
    if g is not None:
        x = x + F.conv1d(g, p["cond.weight"], p["cond.bias"])
    n = len(kernels)
    for i, (u, k) in enumerate(zip(rates, ups_kernels)):
        x = F.leaky_relu(x, 0.1)
        x = F.conv_transpose1d(x, p[f"ups.{i}.weight"], p[f"ups.{i}.bias"], stride=u, padding=(k - u) // 2)
        total = 0
        for j, (rk, ds) in enumerate(zip(kernels, dilations)):
            b, h = f"resblocks.{i * n + j}.", x
            for m, d in enumerate(ds):
                if resblock == "1":
                    t = F.conv1d(F.leaky_relu(h, 0.1), p[f"{b}convs1.{m}.weight"], p[f"{b}convs1.{m}.bias"],
                                 dilation=d, padding=_pad(rk, d))
                    t = F.conv1d(F.leaky_relu(t, 0.1), p[f"{b}convs2.{m}.weight"], p[f"{b}convs2.{m}.bias"],
                                 padding=_pad(rk, 1))
                else:
                    t = F.conv1d(F.leaky_relu(h, 0.1), p[f"{b}convs.{m}.weight"], p[f"{b}convs.{m}.bias"],
                                 dilation=d, padding=_pad(rk, d))
                h = h + t
            total = total + h
        x = total / n
    return torch.tanh(F.conv1d(F.leaky_relu(x, 0.01), p["conv_post.weight"], padding=3))
