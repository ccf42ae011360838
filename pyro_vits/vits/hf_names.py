"""HuggingFace transformers ``VitsModel`` key names -> VITS's (``SynthesizerTrn``) names: the ``convert`` of the
``hf-vits`` layout. The modules are VITS's under other names; attention projections are ``nn.Linear``
(``(C, C)``), stored as VITS's 1x1 convolutions (``(C, C, 1)``). HF's flow drops the parameter-free ``Flip``
modules (its coupling ``i`` is VITS's ``flows.<2 i>``). The duration predictor is left out."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

__all__ = ["hf_vits_to_vits", "HF_VITS_CONFIG_NAMES"]

_LAYER = re.compile(r"text_encoder\.encoder\.layers\.(\d+)\.(.+)")
_ENCODER_LAYER = {
    "attention.q_proj.": "attn_layers.{i}.conv_q.",
    "attention.k_proj.": "attn_layers.{i}.conv_k.",
    "attention.v_proj.": "attn_layers.{i}.conv_v.",
    "attention.out_proj.": "attn_layers.{i}.conv_o.",
    "attention.emb_rel_k": "attn_layers.{i}.emb_rel_k",
    "attention.emb_rel_v": "attn_layers.{i}.emb_rel_v",
    "layer_norm.weight": "norm_layers_1.{i}.gamma",
    "layer_norm.bias": "norm_layers_1.{i}.beta",
    "feed_forward.": "ffn_layers.{i}.",
    "final_layer_norm.weight": "norm_layers_2.{i}.gamma",
    "final_layer_norm.bias": "norm_layers_2.{i}.beta",
}
_COUPLING = re.compile(r"flow\.flows\.(\d+)\.(conv_pre|wavenet|conv_post)(\..+)")
_PREFIXES = (
    ("text_encoder.embed_tokens.", "enc_p.emb."),
    ("text_encoder.project.", "enc_p.proj."),
    ("posterior_encoder.conv_pre.", "enc_q.pre."),
    ("posterior_encoder.wavenet.", "enc_q.enc."),
    ("posterior_encoder.conv_proj.", "enc_q.proj."),
    ("embed_speaker.", "emb_g."),
    ("decoder.upsampler.", "dec.ups."),
    ("decoder.", "dec."),
    ("duration_predictor.", "dp."),
)
_COUPLING_PARTS = {"conv_pre": "pre", "wavenet": "enc", "conv_post": "post"}

HF_VITS_CONFIG_NAMES: tuple[tuple[str, str], ...] = (
    ("vocab_size", "model.n_vocab"),
    ("hidden_size", "model.hidden_channels"),
    ("flow_size", "model.inter_channels"),
    ("ffn_dim", "model.filter_channels"),
    ("num_attention_heads", "model.n_heads"),
    ("num_hidden_layers", "model.n_layers"),
    ("ffn_kernel_size", "model.kernel_size"),
    ("window_size", "model.window_size"),
    ("speaker_embedding_size", "model.gin_channels"),
    ("num_speakers", "data.n_speakers"),
    ("spectrogram_bins", "model.spec_channels"),
    ("wavenet_dilation_rate", "model.dilation_rate_flow"),
    ("upsample_initial_channel", "model.upsample_initial_channel"),
    ("upsample_rates", "model.upsample_rates"),
    ("upsample_kernel_sizes", "model.upsample_kernel_sizes"),
    ("resblock_kernel_sizes", "model.resblock_kernel_sizes"),
    ("resblock_dilation_sizes", "model.resblock_dilation_sizes"),
    ("sampling_rate", "data.sampling_rate"),
)
"""HF ``VitsConfig`` names -> ``section.name`` of a VITS ``config.json`` (HF has only ResBlock1)."""


def _rename(key: str) -> str:
    layer = _LAYER.fullmatch(key)
    if layer:
        index, rest = layer.groups()
        for old, new in _ENCODER_LAYER.items():
            if rest.startswith(old):
                return "enc_p.encoder." + new.format(i=index) + rest[len(old):]
        return key
    coupling = _COUPLING.fullmatch(key)
    if coupling:
        index, part, rest = coupling.groups()
        return f"flow.flows.{2 * int(index)}.{_COUPLING_PARTS[part]}{rest}"
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def hf_vits_to_vits(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF ``VitsModel`` tensors under VITS's names (Linear attention weights as ``(C, C, 1)`` convolutions)."""
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        name = _rename(key)
        if re.fullmatch(r"enc_p\.encoder\.attn_layers\.\d+\.conv_[qkvo]\.weight", name) and value.dim() == 2:
            value = value.unsqueeze(-1)
        out[name] = value
    return out
