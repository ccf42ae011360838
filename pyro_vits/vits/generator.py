"""A trained VITS generator's latent path from its checkpoint: ``enc_p``, ``enc_q``, ``flow``, ``emb_g``.

:func:`load_vits_generator` reads original VITS (``SynthesizerTrn``: ``enc_p.``, ``enc_q.``, ``flow.``,
``emb_g.``) and coqui-TTS (``text_encoder.``, ``posterior_encoder.``, ``flow.``, ``emb_g.``) generators,
either weight-norm layout, with or without a ``module.`` prefix. The decoder and the duration predictor are
not part of the latent path and are skipped. Sizes come from the weights; a VITS ``config.json`` (its
``model`` and ``data`` sections), when given, must agree with them."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.batch import sequence_mask
from ..flows import ResidualCouplingBlock
from ..models.guides import PosteriorEncoder
from ..nn.text_encoder import WINDOW_SIZE, TextEncoder
from .flow_checkpoint import flow_from_tensors
from .layouts import CANONICAL_PARTS, Layout, canonical, layout_for_keys
from .reader import Checkpoint, check_sizes, fail, module_state, read_checkpoint, weight_shape

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
    """The latent path of a VITS ``SynthesizerTrn``: ``enc_p`` (:class:`~pyro_vits.nn.text_encoder.TextEncoder`),
    ``enc_q`` (:class:`VITSPosteriorEncoder`), ``flow`` (:class:`~pyro_vits.flows.ResidualCouplingBlock`,
    ``z -> z_p``) and ``emb_g`` (speaker ``nn.Embedding`` or None, shared with ``enc_q.guide``).
    ``config``: the sizes (``n_vocab``, ``spec_channels``, ``inter_channels``, ``hidden_channels``, ...).
    """

    def __init__(
        self,
        enc_p: TextEncoder,
        enc_q: VITSPosteriorEncoder,
        flow: ResidualCouplingBlock,
        config: dict[str, Any],
    ) -> None:
        super().__init__()
        self.enc_p, self.enc_q, self.flow = enc_p, enc_q, flow
        self.emb_g: nn.Embedding | None = getattr(enc_q.guide, "emb_g", None)
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


CONFIG_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "object": ("a JSON object", lambda v: isinstance(v, Mapping)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "int>0": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "int>=0": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "prob": ("a number in [0, 1)", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
             and 0 <= v < 1),
    "str": ("a string", lambda v: isinstance(v, str)),
    "str list": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
}
"""The value types of :data:`VITS_CONFIG_SCHEMA`: name -> (what the message says, the check)."""

VITS_CONFIG_SCHEMA: dict[str, str] = {
    "train": "object",
    "train.batch_size": "int>0",
    "data": "object",
    **dict.fromkeys(("data.sampling_rate", "data.filter_length", "data.hop_length", "data.win_length"),
                    "int>0"),
    "data.n_speakers": "int>=0",
    "data.add_blank": "bool",
    "data.cleaned_text": "bool",
    "data.text_cleaners": "str list",
    "model": "object",
    **dict.fromkeys(("model.inter_channels", "model.hidden_channels", "model.filter_channels", "model.n_heads",
                     "model.n_layers", "model.kernel_size", "model.dilation_rate_flow"), "int>0"),
    "model.gin_channels": "int>=0",
    "model.p_dropout": "prob",
    "model.use_transformer_flows": "bool",
    "model.transformer_flow_type": "str",
    "symbols": "str list",
}
"""The keys of a VITS ``config.json`` the library reads (``section.key``) and their types
(:data:`CONFIG_TYPES`: JSON booleans only for flags, integers neither booleans nor strings); other keys are ignored. A key's section
must be an object for the key to be checked (the section's own entry refuses anything else)."""


def check_vits_config(config: Mapping[str, Any], label: str = "config") -> None:
    """Refuse (one-line ``ValueError`` naming ``label`` and the key) a value of :data:`VITS_CONFIG_SCHEMA`'s
    keys with the wrong type; absent keys are not checked."""
    for dotted, type_name in VITS_CONFIG_SCHEMA.items():
        section: Any = config
        *parents, key = dotted.split(".")
        for parent in parents:
            section = section.get(parent) if isinstance(section, Mapping) else None
        if not isinstance(section, Mapping) or key not in section:
            continue
        what, check = CONFIG_TYPES[type_name]
        if not check(section[key]):
            raise fail(f"{label}: {dotted} must be {what}, got {json.dumps(section[key], default=repr)[:60]}")


def read_vits_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A VITS ``config.json`` as a dict (a path or an already-loaded mapping), its keys' types checked
    (:func:`check_vits_config`). Errors are one line naming the file and the key."""
    if isinstance(config, Mapping):
        check_vits_config(config)
        return dict(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        loaded = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 JSON (byte 0x{err.object[err.start]:02x} at offset "
                         f"{err.start})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a JSON object")
    check_vits_config(loaded, str(path))
    return loaded


def _split_parts(checkpoint: Checkpoint, layout: Layout) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """``({part: {sub_key: tensor}}, the canonical tensors)`` of the latent path, through ``layout``."""
    label = checkpoint.label
    tensors, other = canonical(checkpoint.tensors, layout)
    if "emb_l" in other:
        raise ValueError(f"{label}: multilingual generators (emb_l) are not supported")
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in CANONICAL_PARTS}
    for key, value in tensors.items():
        part, sub_key = key.split(".", 1)
        parts[part][sub_key] = value
    missing = [name for name in ("enc_p", "enc_q", "flow") if not parts[name]]
    if missing:
        stored = next(s for s, c in layout.prefixes if c == missing[0] + ".")
        raise ValueError(
            f"{label}: no {'/'.join(missing)} weights (expected keys such as "
            f"'{stored}…'; found top-level parts {sorted({k.split('.')[0] for k in checkpoint.tensors})})"
        )
    if other:
        logger.info("%s: ignoring %s (not part of the latent path)", label, ", ".join(sorted(other)))
    return parts, tensors


def _count(entries: Mapping[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in entries if k.startswith(prefix)})


def _weight(entries: Mapping[str, Tensor], key: str, label: str) -> torch.Size:
    """The shape of ``key`` (a ``….weight`` in any weight-norm form, or any other tensor)."""
    found = weight_shape(entries, key.removesuffix(".weight")) if key.endswith(".weight") else None
    if found is None and key in entries:
        found = entries[key].shape
    if found is None:
        raise ValueError(f"{label}: missing {key}")
    return found


def _text_encoder_sizes(enc_p: Mapping[str, Tensor], label: str) -> dict[str, int]:
    emb = _weight(enc_p, "emb.weight", f"{label} enc_p")
    rel = _weight(enc_p, "encoder.attn_layers.0.emb_rel_k", f"{label} enc_p")
    conv_1 = _weight(enc_p, "encoder.ffn_layers.0.conv_1.weight", f"{label} enc_p")
    if rel[1] != 2 * WINDOW_SIZE + 1 or rel[0] != 1 or rel[-1] == 0:
        raise ValueError(
            f"{label}: enc_p relative-position table {tuple(rel)} is not VITS's "
            f"(1, {2 * WINDOW_SIZE + 1}, d_k)"
        )
    return dict(
        n_vocab=emb[0],
        hidden_channels=emb[1],
        inter_channels=_weight(enc_p, "proj.weight", f"{label} enc_p")[0] // 2,
        n_heads=emb[1] // rel[-1],
        n_layers=_count(enc_p, "encoder.attn_layers."),
        filter_channels=conv_1[0],
        kernel_size=conv_1[-1],
    )


def _posterior_sizes(enc_q: Mapping[str, Tensor], label: str) -> dict[str, int]:
    pre = _weight(enc_q, "pre.weight", f"{label} enc_q")
    cond = weight_shape(enc_q, "enc.cond_layer")
    return dict(
        spec_channels=pre[1],
        enc_q_hidden=pre[0],
        enc_q_inter=_weight(enc_q, "proj.weight", f"{label} enc_q")[0] // 2,
        enc_q_layers=_count(enc_q, "enc.in_layers."),
        enc_q_kernel=_weight(enc_q, "enc.in_layers.0.weight", f"{label} enc_q")[-1],
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


def _generator_sizes(parts: Mapping[str, Mapping[str, Tensor]], label: str) -> dict[str, int]:
    """Every size of the latent path read from the weights; ``enc_p``, ``enc_q`` and ``emb_g`` must agree."""
    sizes = {**_text_encoder_sizes(parts["enc_p"], label), **_posterior_sizes(parts["enc_q"], label)}
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


def _check_config(sizes: Mapping[str, int], config: Mapping[str, Any], label: str) -> None:
    """Every size the config states must equal the one read from the weights."""
    model, data = config.get("model"), config.get("data", {})
    if not isinstance(model, Mapping):
        raise ValueError("config has no 'model' section (expected a VITS config.json)")
    stated = {
        key: model[key]
        for key in (
            "inter_channels",
            "hidden_channels",
            "filter_channels",
            "n_heads",
            "n_layers",
            "kernel_size",
            "gin_channels",
        )
        if key in model
    }
    if "filter_length" in data:
        stated["spec_channels"] = data["filter_length"] // 2 + 1
    if data.get("n_speakers", 0) > 1:
        stated["n_speakers"] = data["n_speakers"]
    if "symbols" in config:
        stated["n_vocab"] = len(config["symbols"])
    for key, value in stated.items():
        if sizes.get(key, 0) != value:
            raise ValueError(
                f"config says {key}={value} but the weights in {label} have {key}={sizes.get(key, 0)}"
            )


def _load(module: nn.Module, entries: Mapping[str, Tensor], part: str, label: str) -> None:
    try:
        module.load_state_dict(module_state(module, entries), strict=True)
    except RuntimeError as err:
        raise fail(f"{label}: {part} weights do not match VITS's layout: {err}") from err


def load_vits_generator(
    checkpoint: str | Path | Mapping[str, Any],
    config: str | Path | Mapping[str, Any] | None = None,
    *,
    layout: str | None = None,
) -> VITSGenerator:
    """Load a VITS generator's latent path from a checkpoint path, a checkpoint dict (``{"model": ...}``,
    as VITS's ``utils.save_checkpoint`` writes) or a state dict; returns a :class:`VITSGenerator` in eval
    mode.

    ``config``: VITS ``config.json`` (path or dict); its ``model`` sizes, ``data.filter_length`` and
    ``data.n_speakers`` (and a top-level ``symbols`` list) must match the weights, and its
    ``model.p_dropout`` is kept (and the flow's settings, e.g. ``dilation_rate_flow``, are read from it by
    :func:`~pyro_vits.flows.load_vits_flow`). ``layout``: a name in :data:`~pyro_vits.vits.layouts.LAYOUTS`
    (None: detected from the keys). Raises ``ValueError`` for missing parts or disagreeing sizes.
    """
    found = read_checkpoint(checkpoint)
    label = found.label
    keys_layout = layout_for_keys(found.tensors, layout)
    parts, tensors = _split_parts(found, keys_layout)
    sizes = _generator_sizes(parts, label)
    p_dropout = 0.0
    if config is not None:
        config = read_vits_config(config)
        _check_config(sizes, config, label)
        p_dropout = float(config["model"].get("p_dropout", 0.0))
    try:
        flow, holder = flow_from_tensors(tensors, keys_layout, named=layout is not None, config=config)
    except ValueError as err:
        raise ValueError(f"{label}: {err}") from err
    if "enc_p" not in holder.parts:
        raise ValueError(f"{label}: the {holder.label} layout's enc_p/enc_q are not VITS's: load its flow "
                         "with load_vits_flow")
    if flow.channels != sizes["inter_channels"] or flow.gin_channels != sizes["gin_channels"]:
        raise ValueError(
            f"{label}: flow has {flow.channels} channels and gin {flow.gin_channels}, enc_p "
            f"{sizes['inter_channels']} and gin {sizes['gin_channels']}"
        )
    enc_p = TextEncoder(
        *(sizes[k] for k in ("n_vocab", "inter_channels", "hidden_channels", "filter_channels", "n_heads")),
        *(sizes[k] for k in ("n_layers", "kernel_size")),
        p_dropout,
    )
    _load(enc_p, parts["enc_p"], "enc_p", label)
    guide = PosteriorEncoder(
        *(sizes[k] for k in ("spec_channels", "inter_channels", "hidden_channels", "enc_q_kernel")),
        ENC_Q_DILATION,
        sizes["enc_q_layers"],
        n_speakers=sizes["n_speakers"],
        gin_channels=sizes["gin_channels"],
        name="enc_q",
    )
    _load(guide, {**parts["enc_q"], **{"emb_g." + k: v for k, v in parts["emb_g"].items()}}, "enc_q", label)
    config_out = {key: sizes[key] for key in _REPORTED_SIZES}
    config_out.update(p_dropout=p_dropout, n_flows=flow.config["n_flows"])
    return VITSGenerator(enc_p, VITSPosteriorEncoder(guide), flow, config_out).eval()
