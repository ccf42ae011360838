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
    ``convert``: a weight transform applied at load to the canonically prefixed tensors (to VITS's module
    names), or None. ``text_encoder``: ``"vits"`` (VITS's transformer) or ``"conformer"`` (ESPnet's).
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
    convert: Callable[[Mapping[str, Tensor]], dict[str, Tensor]] | None = None
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
            config_values=("dilation_rate_flow",), convert=espnet_to_vits, text_encoder="conformer",
        ),
    )
}
"""Every supported family, in detection order."""


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)} or None, got {name!r}")
    return LAYOUTS[name]


def layout_for_keys(tensors: Mapping[str, Tensor], name: str | None = None) -> Layout:
    """The layout named, else the first whose markers the keys show, else VITS's names (the flow then tells
    VITS, VITS2 and Bert-VITS2 apart: :func:`resolve`)."""
    if name is not None:
        return get_layout(name)
    for layout in LAYOUTS.values():
        if layout.markers and any(k.startswith(layout.markers) for k in tensors):
            return layout
    return LAYOUTS["vits"]


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
    for key, value in tensors.items():
        stored = next((pair for pair in layout.prefixes if key.startswith(pair[0])), None)
        if stored is None:
            other.add(key.split(".")[0])
        else:
            out[stored[1] + key[len(stored[0]):]] = value
    return (out if layout.convert is None else layout.convert(out)), other
