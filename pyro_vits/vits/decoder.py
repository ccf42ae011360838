"""The HiFi-GAN decoder of a checkpoint: its sizes from the weights, its strides and dilations from the config."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..nn.hifigan import Generator
from .config import config_value
from .reader import (
    count_modules,
    fail,
    fold_weight_norm,
    load_part,
    required_shape,
    weight_shape,
)

logger = logging.getLogger(__name__)


_DECODER_SETTINGS = ("resblock", "resblock_dilation_sizes", "upsample_rates")


def decoder_sizes(dec: Mapping[str, Tensor], config: Mapping[str, Any] | None, label: str) -> dict[str, Any]:
    """The :class:`~pyro_vits.nn.hifigan.Generator` arguments of a ``dec.*`` state: sizes from the shapes, the
    resblock kind from the key names; upsample strides and dilations are not stored, so they come from the
    config (``model.upsample_rates``, ``model.resblock_dilation_sizes``)."""
    where = f"{label} dec"
    pre = required_shape(dec, "conv_pre.weight", where)
    n_ups = count_modules(dec, "ups.")
    kind = "1" if any(".convs1." in k for k in dec) else "2"
    n_blocks = count_modules(dec, "resblocks.")
    if not n_ups or n_blocks % n_ups:
        raise fail(f"{where}: {n_blocks} resblocks for {n_ups} upsampling layers (expected a multiple)")
    n_kernels = n_blocks // n_ups
    conv = "convs1" if kind == "1" else "convs"
    kernels = [required_shape(dec, f"resblocks.{j}.{conv}.0.weight", where)[-1] for j in range(n_kernels)]
    n_dilations = [count_modules(dec, f"resblocks.{j}.{conv}.") for j in range(n_kernels)]
    rates = config_value(config, "upsample_rates")
    dilations = config_value(config, "resblock_dilation_sizes")
    if rates is None or dilations is None:
        raise fail(f"{where}: the decoder's upsample_rates and resblock_dilation_sizes are not stored in the "
                   "weights (ConvTranspose strides, dilations): pass config= with model.upsample_rates and "
                   "model.resblock_dilation_sizes, or decoder=False")
    stated = config_value(config, "resblock")
    if stated is not None and str(stated) != kind:
        raise fail(f"{where}: config says resblock={stated!r} but the weights hold ResBlock{kind}")
    if len(rates) != n_ups or [len(d) for d in dilations] != n_dilations:
        raise fail(f"{where}: config upsample_rates {list(rates)} / resblock_dilation_sizes "
                   f"{[list(d) for d in dilations]} do not fit {n_ups} upsampling layers and "
                   f"{n_dilations} convolutions per resblock")
    cond = weight_shape(dec, "cond")
    return dict(
        initial_channel=pre[1], resblock=kind, resblock_kernel_sizes=kernels,
        resblock_dilation_sizes=[list(d) for d in dilations], upsample_rates=list(rates),
        upsample_initial_channel=pre[0],
        upsample_kernel_sizes=[required_shape(dec, f"ups.{i}.weight", where)[-1] for i in range(n_ups)],
        gin_channels=0 if cond is None else cond[1],
    )


def load_decoder(dec: Mapping[str, Tensor], config: Mapping[str, Any] | None, sizes: Mapping[str, int],
             decoder: bool | None, label: str) -> Generator | None:
    """The loaded HiFi-GAN ``dec`` (None: no ``dec.conv_pre`` in the file, ``decoder=False``, or
    ``decoder=None`` and no config giving its upsample rates)."""
    if decoder is False or not any(k.startswith("conv_pre.") for k in dec):
        if decoder:
            raise fail(f"{label}: decoder=True but the file has no HiFi-GAN decoder (dec.conv_pre)")
        return None
    if decoder is None and config_value(config, "upsample_rates") is None:
        logger.info("%s: decoder not loaded (its upsample_rates are not stored: pass config=)", label)
        return None
    args = decoder_sizes(dec, config, label)
    if args["initial_channel"] != sizes["inter_channels"] or args["gin_channels"] not in (0, sizes["gin_channels"]):
        raise fail(f"{label}: dec takes {args['initial_channel']} channels and gin {args['gin_channels']}, "
                   f"the flow {sizes['inter_channels']} and gin {sizes['gin_channels']}")
    module = Generator(**args)
    load_part(module, fold_weight_norm(dec), "dec", label)
    return module
