"""One declarative entry per checkpoint family: how to recognise it, how its keys map to VITS's names.

Canonical names are VITS's ``SynthesizerTrn`` ones: ``enc_p.``, ``enc_q.``, ``flow.flows.<i>.`` and
``emb_g.``. A layout is found from the checkpoint (its ``markers``, else the kind of prior flow it holds, see
:func:`~pyro_vits.vits.flow_checkpoint.flow_family`) or named with ``layout=``. Adding a family: one
:class:`Layout` in :data:`LAYOUTS` (and one case in ``tests/vits/test_layout_contract.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from .espnet import ESPNET_PREFIX, espnet_to_vits
from .hf_names import HF_VITS_CONFIG_NAMES, hf_vits_to_vits
from .reader import fail

__all__ = ["Layout", "LAYOUTS", "get_layout", "layout_for_keys", "canonical", "CANONICAL_PARTS"]

CANONICAL_PARTS = ("enc_p", "enc_q", "flow", "emb_g")
_VITS_NAMES = (("enc_p.", "enc_p."), ("enc_q.", "enc_q."), ("flow.", "flow."), ("emb_g.", "emb_g."))


@dataclass(frozen=True)
class Layout:
    """A checkpoint family.

    ``prefixes``: ``(stored prefix, canonical prefix)`` pairs; keys under no prefix are not part of the latent
    path (decoder, duration predictor, …). ``markers``: stored prefixes only this family uses (they pick it
    before the flow does). ``flow_families``: the prior-flow kinds it holds (coqui's ``"coqui"`` numbering
    ``flows.0, 1, 2, …`` for VITS's ``0, 2, 4, …``). ``weight_norm``: the stored weight-norm forms read.
    ``config``: where the values the weights do not store come from (``"config.json"`` beside the file, or
    the checkpoint's own ``"config"`` entry) and ``config_values`` which they are (sizes always come from the
    tensor shapes). ``parts``: which canonical parts :func:`~pyro_vits.vits.load_vits_generator` loads from it.

    ``decoder_prefix``: the stored prefix of the HiFi-GAN decoder (canonical ``dec.``; None: not read).
    ``convert``: a function from the stored tensors to tensors under VITS's names (renamed, reshaped), applied
    before ``prefixes``, for families whose modules differ from VITS's only in names and shapes.
    ``config_names``: ``(stored config name, "section.vits_name")`` pairs translating the family's config
    into a VITS ``config.json`` (``model``/``data`` sections); a stored name is looked up at the top level, under
    ``model`` and under ``model_args``. ``files``: the weights file names in a model folder (a folder path
    loads the first present). ``requires``: the modules the family needs (else one line naming
    ``pip install pyro_vits[layouts]``).
    ``fold``: a weight transform applied after ``prefixes`` to the canonically named tensors (ESPnet's WaveNet
    folded into VITS's WN), or None. ``text_encoder``: ``"vits"`` (VITS's transformer) or ``"conformer"``
    (ESPnet's).
    """

    name: str
    label: str
    prefixes: tuple[tuple[str, str], ...]
    flow_families: tuple[str, ...]
    markers: tuple[str, ...] = ()
    weight_norm: tuple[str, ...] = ("weight_g", "parametrizations", "plain")
    config: str = "config.json"
    config_values: tuple[str, ...] = ("dilation_rate_flow",)
    parts: tuple[str, ...] = CANONICAL_PARTS
    decoder_prefix: str | None = "dec."
    convert: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None
    config_names: tuple[tuple[str, str], ...] = ()
    files: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    fold: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None
    text_encoder: str = "vits"


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("vits", "VITS (jaywalnut310)", _VITS_NAMES, ("wn",)),
        Layout(
            "coqui", "coqui-TTS",
            (("text_encoder.", "enc_p."), ("posterior_encoder.", "enc_q."), ("flow.", "flow."),
             ("emb_g.", "emb_g.")),
            ("coqui", "wn"), markers=("text_encoder.", "posterior_encoder."), config="checkpoint",
        ),
        Layout("vits2", "VITS2", _VITS_NAMES, ("pre_conv", "pre_conv2", "fft", "mono"),
               config_values=("dilation_rate_flow", "transformer_flow_type", "use_transformer_flows")),
        Layout("bert-vits2", "Bert-VITS2", _VITS_NAMES, ("bert",),
               config_values=("dilation_rate_flow", "n_heads"), parts=("flow", "emb_g")),
        Layout(
            "espnet2", "ESPnet2 VITS",
            tuple((ESPNET_PREFIX + stored, canonical) for stored, canonical in (
                ("text_encoder.", "enc_p."), ("posterior_encoder.", "enc_q."), ("flow.", "flow."),
                ("global_emb.", "emb_g."))),
            ("wn",), markers=(ESPNET_PREFIX,), weight_norm=("weight_g", "plain"), config="config.yaml",
            config_values=("dilation_rate_flow",), fold=espnet_to_vits, text_encoder="conformer",
        ),
        # HuggingFace ``VitsModel.save_pretrained`` folders (``model.safetensors`` or ``pytorch_model.bin``
        # and a flat ``config.json``); its markers are longer than coqui's (``text_encoder.``), so they win.
        Layout(
            "hf-vits", "HuggingFace transformers VitsModel", _VITS_NAMES, ("wn",),
            markers=("text_encoder.embed_tokens.", "posterior_encoder.wavenet."), config="config.json",
            convert=hf_vits_to_vits, config_names=HF_VITS_CONFIG_NAMES,
            files=("model.safetensors", "pytorch_model.bin"), requires=("safetensors",),
        ),
        # Piper (rhasspy/piper): a released voice (``voice.onnx`` + ``voice.onnx.json``, read by
        # :func:`~pyro_vits.vits.piper.read_piper_onnx` into VITS's names; no enc_q; named by the reader's
        # config) and a Lightning training checkpoint (``model_g.`` generator / ``model_d.`` discriminator,
        # sizes in ``hyper_parameters``).
        Layout("piper-onnx", "Piper ONNX voice", _VITS_NAMES, ("wn",), weight_norm=("plain",),
               config="voice.onnx.json", config_values=(), parts=("enc_p", "flow", "emb_g")),
        Layout("piper-ckpt", "Piper Lightning checkpoint",
               tuple(("model_g." + stored, name) for stored, name in _VITS_NAMES), ("wn",),
               markers=("model_g.", "model_d."), weight_norm=("weight_g",), config="checkpoint",
               config_values=(), decoder_prefix="model_g.dec."),
    )
}
"""Every supported family, in detection order."""


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)} or None, got {name!r}")
    return LAYOUTS[name]


def layout_for_keys(tensors: Mapping[str, Tensor], name: str | None = None) -> Layout:
    """The layout named, else the one whose markers the keys show (the longest marker wins), else VITS's names
    (the flow then tells VITS, VITS2 and Bert-VITS2 apart: :func:`resolve`)."""
    if name is not None:
        return get_layout(name)
    best, length = LAYOUTS["vits"], 0
    for layout in LAYOUTS.values():  # the layout with the longest marker the keys show (first on ties)
        shown = [len(m) for m in layout.markers if any(k.startswith(m) for k in tensors)]
        if shown and max(shown) > length:
            best, length = layout, max(shown)
    return best


def resolve(found: Layout, flow_family: str, named: bool, kind: str) -> Layout:
    """The layout holding a ``flow_family`` flow: ``found`` when it does, else (not ``named``) the first
    layout that does, those with ``found``'s key names first."""
    if flow_family in found.flow_families:
        return found
    if not named:
        holders = [layout for layout in LAYOUTS.values() if flow_family in layout.flow_families]
        holders.sort(key=lambda layout: layout.prefixes != found.prefixes)
        if holders:
            return holders[0]
    raise fail(f"flow.flows.0 is a {kind}, which the {found.label} layout does not hold "
               f"(its flows: {', '.join(found.flow_families)})")


def canonical(tensors: Mapping[str, Tensor], layout: Layout) -> tuple[dict[str, Tensor], set[str]]:
    """``(the tensors under canonical names, the top-level names of the keys outside the layout)``."""
    out: dict[str, Tensor] = {}
    other: set[str] = set()
    if layout.convert is not None:
        tensors = layout.convert(tensors)
    prefixes = layout.prefixes + ((layout.decoder_prefix, "dec."),) * (layout.decoder_prefix is not None)
    for key, value in tensors.items():
        stored = next((pair for pair in prefixes if key.startswith(pair[0])), None)
        if stored is None:
            other.add(key.split(".")[0])
        else:
            out[stored[1] + key[len(stored[0]):]] = value
    return (out if layout.fold is None else layout.fold(out)), other
