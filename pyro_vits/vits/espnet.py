"""ESPnet2 VITS (``espnet2.gan_tts.vits``) generators: their weights in VITS's names, their sizes, their config.

An ESPnet model file is a state dict with ``tts.generator.`` keys: ``text_encoder`` (a Conformer, loaded as it
is into :class:`~pyro_vits.nn.conformer.ConformerTextEncoder`), ``posterior_encoder`` and ``flow`` (built on
ESPnet's ``WaveNet``) and ``global_emb``. ESPnet's WaveNet folds exactly into VITS's ``WN``
(:func:`fold_wavenet`, applied at load by :func:`espnet_to_vits`):

* its skip sum is scaled by ``sqrt(1 / L)``: the skip rows (weight and bias) of every ``conv1x1_out`` are
  scaled by it instead (a 1x1 conv is linear, the sum commutes);
* every layer's ``conv1x1_out`` has ``2H`` outputs (residual, skip) and adds the residual as ``x + r * mask``:
  VITS's last ``res_skip_layers`` keeps the skip rows only (the last residual is never read) and
  ``(x + r) * mask`` equals ``x + r * mask`` because ``x`` is masked on entry (``input_conv(x) * mask``);
* the bias-free per-layer ``conv1x1_glo`` ``(2H, gin)`` stack (in layer order) into VITS's one ``cond_layer``
  ``(2 H L, gin)``, bias 0 (VITS adds layer ``i``'s slice ``2H i : 2H (i + 1)``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..nn.conformer import ConformerTextEncoder
from .reader import fail

__all__ = ["ESPNET_PREFIX", "fold_wavenet", "espnet_to_vits", "conformer_sizes", "build_conformer",
           "espnet_config"]

ESPNET_PREFIX = "tts.generator."
_WN_FORMS = ((".weight_g", ".weight_v"), (".parametrizations.weight.original0", ".parametrizations.weight.original1"))


def _conv_weight(entries: Mapping[str, Tensor], base: str, where: str) -> Tensor:
    """The effective weight of conv ``base`` stored plain or weight-normed (either form)."""
    if base + ".weight" in entries:
        return entries[base + ".weight"]
    for g_suffix, v_suffix in _WN_FORMS:
        if base + g_suffix in entries and base + v_suffix in entries:
            return torch._weight_norm(entries[base + v_suffix], entries[base + g_suffix], 0)
    raise fail(f"missing {where}{base}.weight (plain or weight_g/weight_v) in the ESPnet checkpoint")


def _bias(entries: Mapping[str, Tensor], base: str, like: Tensor, where: str, required: bool) -> Tensor:
    """``base``'s bias; 0 for a bias-free WaveNet (``bias=False``), else it must be there."""
    if base + ".bias" in entries:
        return entries[base + ".bias"]
    if required:
        raise fail(f"missing {where}{base}.bias in the ESPnet checkpoint")
    return like.new_zeros(like.shape[0])


def fold_wavenet(entries: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """ESPnet ``WaveNet`` entries (``conv_layers.<i>.{conv, conv1x1_out, conv1x1_glo}``, ``stacks=1``,
    ``scale_skip_connect=True``, residual = skip = H channels) -> VITS ``WN`` entries (``in_layers.<i>``,
    ``res_skip_layers.<i>``, ``cond_layer``) computing the same output (see the module docstring)."""
    n_layers = len({k.split(".")[1] for k in entries if k.startswith("conv_layers.")})
    if n_layers == 0:
        raise fail(f"missing {where}conv_layers.0 (no WaveNet layers) in the ESPnet checkpoint")
    scale = math.sqrt(1.0 / n_layers)
    out: dict[str, Tensor] = {}
    glo = []
    for i in range(n_layers):
        layer = f"conv_layers.{i}."
        if not any(k.startswith(layer + "conv.") for k in entries):
            raise fail(f"missing {where}{layer}conv.weight in the ESPnet checkpoint")
        for key, value in entries.items():
            if key.startswith(layer + "conv."):
                out[f"in_layers.{i}." + key[len(layer + "conv."):]] = value
        w = _conv_weight(entries, layer + "conv1x1_out", where)
        hidden = w.shape[0] // 2
        b = _bias(entries, layer + "conv1x1_out", w, where, required=layer + "conv.bias" in entries)
        skip_w, skip_b = w[hidden:] * scale, b[hidden:] * scale
        if i < n_layers - 1:
            skip_w, skip_b = torch.cat([w[:hidden], skip_w]), torch.cat([b[:hidden], skip_b])
        out[f"res_skip_layers.{i}.weight"], out[f"res_skip_layers.{i}.bias"] = skip_w, skip_b
        if any(k.startswith(layer + "conv1x1_glo.") for k in entries):
            glo.append(_conv_weight(entries, layer + "conv1x1_glo", where))
    if glo:
        if len(glo) != n_layers:
            raise fail(f"missing {where}conv_layers.<i>.conv1x1_glo in some of the {n_layers} layers")
        out["cond_layer.weight"] = torch.cat(glo)
        out["cond_layer.bias"] = glo[0].new_zeros(sum(g.shape[0] for g in glo))
    return out


def _sub(entries: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}


def _renamed(entries: Mapping[str, Tensor], names: Mapping[str, str], where: str) -> dict[str, Tensor]:
    """``input_conv``/``proj`` style modules renamed (``names``: ESPnet -> VITS), the ``encoder`` folded."""
    out = {f"enc.{k}": v for k, v in fold_wavenet(_sub(entries, "encoder."), where + "encoder.").items()}
    for old, new in names.items():
        if f"{old}.weight" not in entries:
            raise fail(f"missing {where}{old}.weight in the ESPnet checkpoint")
        out.update({f"{new}.{k}": v for k, v in _sub(entries, old + ".").items()})
    return out


def espnet_to_vits(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Canonically prefixed ESPnet entries (``enc_p.``, ``enc_q.``, ``flow.``, ``emb_g.``) -> VITS's names:
    ``enc_q.{pre, enc, proj}`` and ``flow.flows.<2k>.{pre, enc, post}`` (WaveNets folded); ``enc_p`` (ESPnet's
    Conformer names, see :class:`~pyro_vits.nn.conformer.ConformerTextEncoder`) and ``emb_g`` as they are."""
    out = {k: v for k, v in tensors.items() if k.startswith(("enc_p.", "emb_g."))}
    enc_q = _sub(tensors, "enc_q.")
    if enc_q:
        q = _renamed(enc_q, {"input_conv": "pre", "proj": "proj"}, "posterior_encoder.")
        out.update({f"enc_q.{k}": v for k, v in q.items()})
    flows = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("flow.flows.")})
    for index in flows:
        sub = _sub(tensors, f"flow.flows.{index}.")
        coupling = _renamed(sub, {"input_conv": "pre", "proj": "post"}, f"flow.flows.{index}.")
        out.update({f"flow.flows.{index}.{k}": v for k, v in coupling.items()})
    return out


def _count(entries: Mapping[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in entries if k.startswith(prefix)})


def conformer_sizes(enc_p: Mapping[str, Tensor], label: str) -> dict[str, Any]:
    """The sizes of an ESPnet Conformer text encoder read from its entries (``emb``, ``encoder.…``)."""
    block = "encoder.encoders.0."
    needed = ("emb.weight", "proj.weight", block + "self_attn.pos_bias_u", block + "feed_forward.w_1.weight")
    missing = [key for key in needed if key not in enc_p]
    if missing:
        if block + "self_attn.linear_q.weight" in enc_p and missing == [block + "self_attn.pos_bias_u"]:
            raise fail(f"{label}: text_encoder uses absolute-position attention; only ESPnet's rel_pos / "
                       "rel_selfattn Conformer is supported")
        raise fail(f"{label}: missing text_encoder.{missing[0]} in the ESPnet checkpoint")
    emb, w_1 = enc_p["emb.weight"], enc_p[block + "feed_forward.w_1.weight"]
    conv = enc_p.get(block + "conv_module.depthwise_conv.weight")
    return dict(
        n_vocab=emb.shape[0], hidden_channels=emb.shape[1], inter_channels=enc_p["proj.weight"].shape[0] // 2,
        n_heads=enc_p[block + "self_attn.pos_bias_u"].shape[0], n_layers=_count(enc_p, "encoder.encoders."),
        filter_channels=w_1.shape[0], kernel_size=w_1.shape[-1],
        macaron=block + "feed_forward_macaron.w_1.weight" in enc_p,
        conv_kernel=0 if conv is None else conv.shape[-1],
        normalize_before="encoder.after_norm.weight" in enc_p,
    )


def build_conformer(sizes: Mapping[str, Any], activation: str = "swish") -> ConformerTextEncoder:
    """An (untrained) :class:`ConformerTextEncoder` of ``sizes`` (:func:`conformer_sizes`)."""
    return ConformerTextEncoder(
        sizes["n_vocab"], sizes["hidden_channels"], sizes["n_heads"], sizes["filter_channels"],
        sizes["n_layers"], ff_kernel=sizes["kernel_size"], macaron=sizes["macaron"],
        conv_kernel=sizes["conv_kernel"], activation=activation, normalize_before=sizes["normalize_before"],
    )


def _read_yaml(path: Path) -> Any:
    try:
        import yaml
    except ImportError as err:
        raise ImportError(f"{path}: reading an ESPnet config.yaml needs PyYAML (pip install pyyaml), or pass "
                          "the config as a dict") from err
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def espnet_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """An ESPnet ``config.yaml`` (path or loaded mapping; ``tts_conf.generator_params``) as a VITS-shaped
    config (``model`` / ``data`` sections, as :func:`~pyro_vits.vits.load_vits_generator` reads it) plus an
    ``espnet`` section with the values VITS has no name for (``activation``, ``enc_q_dilation``)."""
    loaded = config if isinstance(config, Mapping) else _read_yaml(Path(config))
    if not isinstance(loaded, Mapping) or not isinstance(loaded.get("tts_conf", {}).get("generator_params"), Mapping):
        raise fail("ESPnet config has no tts_conf.generator_params (expected an ESPnet VITS config.yaml)")
    gp = loaded["tts_conf"]["generator_params"]
    for key, want in (("text_encoder_positional_encoding_layer_type", "rel_pos"),
                      ("text_encoder_self_attention_layer_type", "rel_selfattn"), ("posterior_encoder_stacks", 1)):
        if gp.get(key, want) != want:
            raise fail(f"ESPnet config: {key}={gp[key]!r} is not supported (only {want!r})")
    hidden = gp.get("hidden_channels", 192)
    model = dict(inter_channels=hidden, hidden_channels=hidden, n_heads=gp.get("text_encoder_attention_heads", 2),
                 filter_channels=hidden * gp.get("text_encoder_ffn_expand", 4),
                 n_layers=gp.get("text_encoder_blocks", 6),
                 kernel_size=gp.get("text_encoder_positionwise_conv_kernel_size", 1),
                 gin_channels=max(gp.get("global_channels", -1), 0), p_dropout=0.0,
                 dilation_rate_flow=gp.get("flow_base_dilation", 1))
    data: dict[str, Any] = {"n_speakers": gp.get("spks") or 0}
    n_fft = (loaded.get("feats_extract_conf") or {}).get("n_fft")
    if n_fft:
        data["filter_length"] = n_fft
    out: dict[str, Any] = {"model": model, "data": data}
    if isinstance(loaded.get("token_list"), list):
        out["symbols"] = loaded["token_list"]
    out["espnet"] = dict(activation=gp.get("text_encoder_activation_type", "swish"),
                         enc_q_dilation=gp.get("posterior_encoder_base_dilation", 1))
    return out
