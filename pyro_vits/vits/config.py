"""A checkpoint's settings: VITS ``config.json`` read and type-checked (one schema), and a layout's own config
translated into VITS's names."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .layouts import Layout
from .reader import (
    Checkpoint,
    fail,
)

logger = logging.getLogger(__name__)


MODEL_SIZES = ("inter_channels", "hidden_channels", "filter_channels", "n_heads", "n_layers", "kernel_size",
               "gin_channels")
"""The sizes of VITS's ``model`` config section that the weights determine (checked against them on reading,
written on export)."""


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


def check_config_sizes(sizes: Mapping[str, int], config: Mapping[str, Any], label: str) -> None:
    """Every size the config states must equal the one read from the weights."""
    model, data = config.get("model"), config.get("data", {})
    if not isinstance(model, Mapping):
        raise ValueError("config has no 'model' section (expected a VITS config.json)")
    stated = {key: model[key] for key in MODEL_SIZES if key in model}
    if "filter_length" in data and sizes.get("spec_channels"):  # 0: no enc_q
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


def config_beside(found: Checkpoint, layout: Layout) -> dict[str, Any] | None:
    """The config the layout keeps with its weights: the checkpoint's ``config`` entry, or a ``config.json``
    beside the file."""
    if layout.config == "checkpoint" or found.config is not None:
        return None if found.config is None else dict(found.config)
    beside = None if found.path is None else found.path.parent / "config.json"
    if beside is None or not beside.is_file():
        return None
    try:
        return read_vits_config(beside)
    except ValueError as err:
        raise fail(f"{found.label}: cannot read {beside} beside the checkpoint: {err}") from err


def layout_config(config: Mapping[str, Any] | None, layout: Layout) -> dict[str, Any] | None:
    """``config`` with the layout's ``config_names`` copied into VITS's ``model``/``data`` sections (values
    already there win)."""
    if config is None:
        return None
    out = {key: dict(value) if isinstance(value, Mapping) else value for key, value in config.items()}
    for stored, target in layout.config_names:
        value = config_value(config, stored)
        section, name = target.split(".", 1)
        if value is not None and isinstance(out.setdefault(section, {}), dict):
            out[section].setdefault(name, value)
    return out


def config_value(config: Mapping[str, Any] | None, name: str) -> Any:
    """``config[name]``, or under its ``model`` (VITS ``config.json``) or ``model_args`` (coqui) section; None
    when absent."""
    if not isinstance(config, Mapping):
        return None
    for section in (config, config.get("model"), config.get("model_args")):
        if isinstance(section, Mapping) and section.get(name) is not None:
            return section[name]
    return None
