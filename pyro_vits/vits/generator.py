"""A trained VITS generator's latent path from its checkpoint: ``enc_p``, ``enc_q``, ``flow``, ``emb_g``.

:func:`load_vits_generator` reads original VITS (``SynthesizerTrn``: ``enc_p.``, ``enc_q.``, ``flow.``,
``emb_g.``) and coqui-TTS (``text_encoder.``, ``posterior_encoder.``, ``flow.``, ``emb_g.``) generators,
either weight-norm layout, with or without a ``module.`` prefix. The decoder and the duration predictor are
not part of the latent path and are skipped. Sizes come from the weights; a VITS ``config.json`` (its
``model`` and ``data`` sections), when given, must agree with them."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._masks import sequence_mask
from ..flows import ResidualCouplingBlock
from ..models.guides import PosteriorEncoder
from ..nn.conformer import ConformerTextEncoder
from ..nn.hifigan import Generator
from ..nn.text_encoder import WINDOW_SIZE, TextEncoder
from .config import check_config_sizes, config_beside, layout_config, read_vits_config
from .decoder import load_decoder
from .espnet import build_conformer, conformer_sizes, espnet_config
from .flow_checkpoint import flow_from_tensors
from .layouts import CANONICAL_PARTS, LAYOUTS, Layout, canonical, layout_for_keys
from .piper import LAYOUT_KEY
from .reader import (
    Checkpoint,
    check_sizes,
    count_modules,
    load_part,
    read_checkpoint,
    required_shape,
    weight_shape,
)

logger = logging.getLogger(__name__)


ENC_Q_DILATION = 1  # VITS's PosteriorEncoder(spec_channels, inter, hidden, 5, 1, 16): not stored in weights


class VITSPosteriorEncoder(nn.Module):
    """VITS's ``enc_q`` call signature around a :class:`~pyro_vits.models.guides.PosteriorEncoder` (``.guide``,
    itself usable as a Pyro guide): ``forward(y (B, spec, T), y_lengths (B,), g (B, gin, 1) | None) ->
    (z, m_q, logs_q, y_mask)``, ``z = (m_q + e exp(logs_q)) y_mask`` with ``e ~ N(0, 1)`` from the global RNG.
    """

    def __init__(self, guide: PosteriorEncoder) -> None:
        super().__init__()
        if not isinstance(guide, PosteriorEncoder):
            raise TypeError(f"guide must be a PosteriorEncoder, got {type(guide).__name__}")
        self.guide = guide

    def forward(
        self, y: Tensor, y_lengths: Tensor, g: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        y_mask = sequence_mask(y_lengths, y.shape[-1]).to(y.dtype)
        m_q, logs_q = self.guide.encode(y, y_mask, g)
        z = (m_q + torch.randn_like(m_q) * torch.exp(logs_q)) * y_mask
        return z, m_q, logs_q, y_mask


class VITSGenerator(nn.Module):
    """The latent path of a VITS ``SynthesizerTrn``: ``enc_p`` (:class:`~pyro_vits.nn.text_encoder.TextEncoder`,
    or ESPnet's :class:`~pyro_vits.nn.conformer.ConformerTextEncoder`: same call contract), ``enc_q``
    (:class:`VITSPosteriorEncoder`, or None for a file without one), ``flow``
    (:class:`~pyro_vits.flows.ResidualCouplingBlock`, ``z -> z_p``), ``emb_g`` (speaker ``nn.Embedding`` or
    None, shared with ``enc_q.guide``) and ``dec`` (the HiFi-GAN decoder
    :class:`~pyro_vits.nn.hifigan.Generator`, or None when not loaded).
    ``config``: the sizes (``n_vocab``, ``spec_channels``, ``inter_channels``, ``hidden_channels``, ...).
    """

    def __init__(
        self,
        enc_p: TextEncoder | ConformerTextEncoder,
        enc_q: VITSPosteriorEncoder | None,
        flow: ResidualCouplingBlock,
        config: dict[str, Any],
        dec: Generator | None = None,
        emb_g: nn.Embedding | None = None,
    ) -> None:
        super().__init__()
        self.enc_p, self.enc_q, self.flow, self.dec = enc_p, enc_q, flow, dec
        self.emb_g: nn.Embedding | None = emb_g if enc_q is None else getattr(enc_q.guide, "emb_g", None)
        self.config = config

    @property
    def n_speakers(self) -> int:
        return 0 if self.emb_g is None else self.emb_g.num_embeddings

    def speaker_embedding(self, sid: Tensor | None) -> Tensor | None:
        """VITS's ``g = emb_g(sid).unsqueeze(-1)`` ``(B, gin, 1)`` for a multi-speaker model, else None."""
        if self.emb_g is None:
            return None
        if sid is None:
            raise ValueError("this generator is multi-speaker: speaker ids are required")
        if bool((sid < 0).any()) or bool((sid >= self.n_speakers).any()):
            raise ValueError(f"speaker ids must be in [0, {self.n_speakers}), got {sid.tolist()}")
        return self.emb_g(sid).unsqueeze(-1)


def _split_parts(checkpoint: Checkpoint, layout: Layout) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """``({part: {sub_key: tensor}}, the canonical tensors)`` of the latent path, through ``layout``."""
    label = checkpoint.label
    tensors, other = canonical(checkpoint.tensors, layout)
    if "emb_l" in other:
        raise ValueError(f"{label}: multilingual generators (emb_l) are not supported")
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in (*CANONICAL_PARTS, "dec")}
    for key, value in tensors.items():
        part, sub_key = key.split(".", 1)
        parts[part][sub_key] = value
    if parts["dec"] and not any(k.startswith("conv_pre.") for k in parts["dec"]):  # not a HiFi-GAN
        other.add(str(layout.decoder_prefix).split(".")[0])
        parts["dec"] = {}
    missing = [name for name in ("enc_p", "flow") if not parts[name]]
    if missing:
        stored = next(s for s, c in layout.prefixes if c == missing[0] + ".")
        raise ValueError(
            f"{label}: no {'/'.join(missing)} weights (expected keys such as "
            f"'{stored}…'; found top-level parts {sorted({k.split('.')[0] for k in checkpoint.tensors})})"
        )
    if other:
        logger.info("%s: ignoring %s (not part of the latent path)", label, ", ".join(sorted(other)))
    return parts, tensors


def _text_encoder_sizes(enc_p: Mapping[str, Tensor], label: str) -> dict[str, int]:
    emb = required_shape(enc_p, "emb.weight", f"{label} enc_p")
    rel = required_shape(enc_p, "encoder.attn_layers.0.emb_rel_k", f"{label} enc_p")
    conv_1 = required_shape(enc_p, "encoder.ffn_layers.0.conv_1.weight", f"{label} enc_p")
    if rel[1] != 2 * WINDOW_SIZE + 1 or rel[0] != 1 or rel[-1] == 0:
        raise ValueError(
            f"{label}: enc_p relative-position table {tuple(rel)} is not VITS's "
            f"(1, {2 * WINDOW_SIZE + 1}, d_k)"
        )
    return dict(
        n_vocab=emb[0],
        hidden_channels=emb[1],
        inter_channels=required_shape(enc_p, "proj.weight", f"{label} enc_p")[0] // 2,
        n_heads=emb[1] // rel[-1],
        n_layers=count_modules(enc_p, "encoder.attn_layers."),
        filter_channels=conv_1[0],
        kernel_size=conv_1[-1],
    )


def _posterior_sizes(enc_q: Mapping[str, Tensor], label: str) -> dict[str, int]:
    pre = required_shape(enc_q, "pre.weight", f"{label} enc_q")
    cond = weight_shape(enc_q, "enc.cond_layer")
    return dict(
        spec_channels=pre[1],
        enc_q_hidden=pre[0],
        enc_q_inter=required_shape(enc_q, "proj.weight", f"{label} enc_q")[0] // 2,
        enc_q_layers=count_modules(enc_q, "enc.in_layers."),
        enc_q_kernel=required_shape(enc_q, "enc.in_layers.0.weight", f"{label} enc_q")[-1],
        gin_channels=0 if cond is None else cond[1],
    )


_REPORTED_SIZES = (
    "n_vocab",
    "spec_channels",
    "inter_channels",
    "hidden_channels",
    "filter_channels",
    "n_heads",
    "n_layers",
    "kernel_size",
    "gin_channels",
    "n_speakers",
    "enc_q_layers",
)


def _generator_sizes(parts: Mapping[str, Mapping[str, Tensor]], label: str, gin: int,
                     text_sizes: Callable[..., dict[str, int]] | None = None) -> dict[str, int]:
    """Every size of the latent path read from the weights; ``enc_p``, ``enc_q`` and ``emb_g`` must agree.
    ``gin``: the flow's speaker width, used when there is no ``enc_q``; ``text_sizes``: the reader of
    ``enc_p``'s sizes (VITS's transformer when None)."""
    sizes = (_text_encoder_sizes if text_sizes is None else text_sizes)(parts["enc_p"], label)
    if parts["enc_q"]:
        sizes.update(_posterior_sizes(parts["enc_q"], label))
    else:
        sizes.update(spec_channels=0, enc_q_layers=0, gin_channels=gin,
                     enc_q_inter=sizes["inter_channels"], enc_q_hidden=sizes["hidden_channels"])
    emb_g = parts["emb_g"].get("weight")
    sizes["n_speakers"] = 0 if emb_g is None else emb_g.shape[0]
    check_sizes(sizes, label)
    if (emb_g is None) != (sizes["gin_channels"] == 0) or (
        emb_g is not None and emb_g.shape[1] != sizes["gin_channels"]
    ):
        raise ValueError(
            f"{label}: speaker conditioning needs emb_g with gin_channels columns "
            f"(emb_g {None if emb_g is None else tuple(emb_g.shape)}, gin_channels {sizes['gin_channels']})"
        )
    if (sizes["enc_q_inter"], sizes["enc_q_hidden"]) != (sizes["inter_channels"], sizes["hidden_channels"]):
        raise ValueError(
            f"{label}: enc_q has (inter, hidden) = ({sizes['enc_q_inter']}, {sizes['enc_q_hidden']}), "
            f"enc_p ({sizes['inter_channels']}, {sizes['hidden_channels']})"
        )
    check_sizes(sizes, label)
    return sizes


def load_vits_generator(
    checkpoint: str | Path | Mapping[str, Any],
    config: str | Path | Mapping[str, Any] | None = None,
    *,
    layout: str | None = None,
    decoder: bool | None = None,
) -> VITSGenerator:
    """Load a VITS generator's latent path from a checkpoint path, a checkpoint dict (``{"model": ...}``,
    as VITS's ``utils.save_checkpoint`` writes) or a state dict; returns a :class:`VITSGenerator` in eval
    mode.

    ``config``: VITS ``config.json`` (path or dict); its ``model`` sizes, ``data.filter_length`` and
    ``data.n_speakers`` (and a top-level ``symbols`` list) must match the weights, and its
    ``model.p_dropout`` is kept (and the flow's settings, e.g. ``dilation_rate_flow``, are read from it by
    :func:`~pyro_vits.vits.load_vits_flow`). ``layout``: a name in :data:`~pyro_vits.vits.layouts.LAYOUTS`
    (None: detected from the keys). Raises ``ValueError`` for missing parts or disagreeing sizes.

    A model folder (e.g. a HuggingFace ``save_pretrained`` one) loads the weights file its layout names.
    Without ``enc_q`` weights, ``enc_q`` is None. ``decoder``: load the HiFi-GAN decoder ``dec`` (True: required;
    None: when the file has one and the config, given or kept with the weights, states its
    ``upsample_rates``; False: never).
    """
    found = read_checkpoint(_weights_path(checkpoint))
    label = found.label
    keys_layout = layout_for_keys(found.tensors, layout or (found.config or {}).get(LAYOUT_KEY))
    _check_requires(keys_layout, label)
    parts, tensors = _split_parts(found, keys_layout)
    conformer = keys_layout.text_encoder == "conformer"
    p_dropout = 0.0
    implicit = layout_config(config_beside(found, keys_layout), keys_layout)
    if config is not None:
        config = espnet_config(config) if keys_layout.config == "config.yaml" else read_vits_config(config)
        config = layout_config(config, keys_layout)
        model = config.get("model")
        p_dropout = float(model.get("p_dropout", 0.0)) if isinstance(model, Mapping) else 0.0
    try:
        flow, holder = flow_from_tensors(tensors, keys_layout, named=layout is not None,
                                         config=config if config is not None else implicit)
    except ValueError as err:
        raise ValueError(f"{label}: {err}") from err
    sizes = _generator_sizes(parts, label, flow.gin_channels, conformer_sizes if conformer else None)
    if config is not None:
        check_config_sizes(sizes, config, label)
    if "enc_p" not in holder.parts:
        raise ValueError(f"{label}: the {holder.label} layout's enc_p/enc_q are not VITS's: load its flow "
                         "with load_vits_flow")
    if flow.channels != sizes["inter_channels"] or flow.gin_channels != sizes["gin_channels"]:
        raise ValueError(
            f"{label}: flow has {flow.channels} channels and gin {flow.gin_channels}, enc_p "
            f"{sizes['inter_channels']} and gin {sizes['gin_channels']}"
        )
    espnet = (config or {}).get("espnet", {})
    if conformer:
        enc_p = build_conformer(sizes, espnet.get("activation", "swish"))
    else:
        enc_p = TextEncoder(
            *(sizes[k] for k in ("n_vocab", "inter_channels", "hidden_channels", "filter_channels", "n_heads")),
            *(sizes[k] for k in ("n_layers", "kernel_size")),
            p_dropout,
        )
    load_part(enc_p, parts["enc_p"], "enc_p", label)
    enc_q, emb_g = None, None
    if parts["enc_q"]:
        guide = PosteriorEncoder(
            *(sizes[k] for k in ("spec_channels", "inter_channels", "hidden_channels", "enc_q_kernel")),
            espnet.get("enc_q_dilation", ENC_Q_DILATION),
            sizes["enc_q_layers"],
            n_speakers=sizes["n_speakers"],
            gin_channels=sizes["gin_channels"],
            name="enc_q",
        )
        load_part(guide, {**parts["enc_q"], **{"emb_g." + k: v for k, v in parts["emb_g"].items()}}, "enc_q",
              label)
        enc_q = VITSPosteriorEncoder(guide)
    elif parts["emb_g"]:
        emb_g = nn.Embedding(sizes["n_speakers"], sizes["gin_channels"])
        load_part(emb_g, parts["emb_g"], "emb_g", label)
    dec = load_decoder(parts["dec"], config if config is not None else implicit, sizes, decoder, label)
    config_out = {key: sizes[key] for key in _REPORTED_SIZES}
    config_out.update(p_dropout=p_dropout, n_flows=flow.config["n_flows"])
    config_out.update(_piper_config(found, keys_layout))
    return VITSGenerator(enc_p, enc_q, flow, config_out, dec=dec, emb_g=emb_g).eval()


def _weights_path(checkpoint: Any) -> Any:
    """A model folder -> the first weights file a layout names in it (``files``); anything else unchanged."""
    if not isinstance(checkpoint, (str, Path)) or not Path(checkpoint).is_dir():
        return checkpoint
    names = [name for layout in LAYOUTS.values() for name in layout.files]
    for name in names:
        if (Path(checkpoint) / name).is_file():
            return Path(checkpoint) / name
    raise FileNotFoundError(f"checkpoint not found: {checkpoint} is a folder without any of {names} "
                            "(no VITS checkpoint at that path)")


def _check_requires(layout: Layout, label: str) -> None:
    missing = [name for name in layout.requires if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{label}: the {layout.label} layout needs {', '.join(missing)}: "
                          "pip install pyro_vits[layouts]")


def _piper_config(found: Checkpoint, layout: Layout) -> dict[str, Any]:
    """What a Piper file states beyond the sizes: ``sample_rate``, and for a released voice its ``inference``
    scales and ``phoneme_id_map`` (the voice's symbol table: phoneme -> ids)."""
    config = found.config or {}
    if layout.name == "piper-onnx":
        return {k: config.get(k) for k in ("sample_rate", "inference", "phoneme_id_map")}
    if layout.name == "piper-ckpt":
        if any(k.startswith("model_d.") for k in found.tensors):
            logger.info("%s: ignoring model_d (Piper's discriminator)", found.label)
        return {"sample_rate": config.get("sample_rate")}
    return {}
