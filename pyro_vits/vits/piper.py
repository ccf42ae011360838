"""Piper voices (rhasspy/piper, a VITS ``SynthesizerTrn`` with HiFi-GAN ``resblock "2"``) in VITS's names.

Two files: a released voice, ``voice.onnx`` + ``voice.onnx.json`` (:func:`read_piper_onnx`), and a Piper
Lightning training checkpoint, ``.ckpt`` (its ``state_dict`` under ``model_g.`` (generator) and ``model_d.``
(discriminator, ignored), its sizes in ``hyper_parameters``: :func:`lightning_generator_config`).

A released voice is Piper's ``export_onnx.py`` output: the inference graph of ``SynthesizerTrn.infer`` traced
with weight norm removed and constants folded. Named initializers keep VITS's names (``enc_p.proj.weight``);
folded ones are anonymous (``onnx::Conv_8168``, or an input's name such as ``sid`` for ``enc_p.emb``) and take
the name of the node that uses them: ``/flow/flows.6/enc/in_layers.0/Conv`` input 1 ->
``flow.flows.6.enc.in_layers.0.weight`` (input 2 -> ``….bias``), ``/enc_p/emb/Gather`` input 0 ->
``enc_p.emb.weight``. A voice has no posterior encoder (``enc_q``): it holds the prior path (``enc_p``,
``flow``, ``emb_g``) and the decoder (``dec``); the duration predictor (``dp``) is read but not used. What the
weights do not store comes from the graph (the decoder's upsampling strides and resblock dilations) and from
the ``.onnx.json`` (sample rate, inference scales, speakers, ``phoneme_id_map``: the voice's symbol table).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["LAYOUT_KEY", "read_piper_onnx", "onnx_names", "lightning_generator_config", "PIPER_PARTS"]

LAYOUT_KEY = "pyro_vits_layout"
"""The config entry a reader sets to name the layout its file is in (a released voice: ``"piper-onnx"``)."""
PIPER_PARTS = ("enc_p.", "enc_q.", "flow.", "emb_g.", "dec.", "dp.")
_WEIGHT_INPUTS = {"Conv": {1: "weight", 2: "bias"}, "ConvTranspose": {1: "weight", 2: "bias"},
                  "Gather": {0: "weight"}}
INSTALL = "pip install pyro_vits[layouts]"


def fail(message: str, limit: int = 300) -> ValueError:
    """A one-line ``ValueError`` of at most ``limit`` (the reader's ``MAX_MESSAGE``) characters; not the
    reader's own ``fail``, which imports this module lazily."""
    message = " ".join(message.split())
    return ValueError(message if len(message) <= limit else message[: limit - 1] + "…")


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise ImportError(f"reading a Piper .onnx voice needs the 'onnx' package ({INSTALL})") from err
    return onnx, numpy_helper


def _scope(node_name: str) -> str | None:
    """``/flow/flows.6/enc/in_layers.0/Conv`` -> ``flow.flows.6.enc.in_layers.0`` (None: not a module's)."""
    parts = node_name.strip("/").split("/")
    if not node_name.startswith("/") or len(parts) < 2:
        return None
    return ".".join(parts[:-1])


def onnx_names(graph: Any) -> dict[str, str]:
    """``{initializer name: VITS state key}`` for the initializers of a traced VITS graph (module docstring):
    through the node that uses them (Conv / ConvTranspose / Gather), else their own name where it is already
    one of VITS's (``enc_p.…``, ``flow.…``, ``dec.…``, ``dp.…``, ``emb_g.…``)."""
    initializers = {init.name for init in graph.initializer}
    names: dict[str, str] = {}
    for node in graph.node:
        roles = _WEIGHT_INPUTS.get(node.op_type)
        scope = _scope(node.name)
        if roles is None or scope is None or not (scope + ".").startswith(PIPER_PARTS):
            continue
        for index, role in roles.items():
            if index < len(node.input) and node.input[index] in initializers:
                names.setdefault(node.input[index], f"{scope}.{role}")
    for name in initializers:
        if name not in names and name.startswith(PIPER_PARTS):
            names[name] = name
    return names


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _decoder_config(graph: Any, tensors: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """The HiFi-GAN ``Generator`` arguments of ``dec``: shapes give the channels and kernels, the graph's
    ConvTranspose strides the upsample rates and the resblock Conv dilations their dilations."""
    if "dec.conv_pre.weight" not in tensors:
        return None
    strides: dict[int, int] = {}
    dilations: dict[int, dict[tuple[str, int], int]] = {}
    for node in graph.node:
        scope = _scope(node.name) or ""
        parts = scope.split(".")
        if node.op_type == "ConvTranspose" and scope.startswith("dec.ups."):
            strides[int(parts[2])] = int(_attribute(node, "strides", [1])[0])
        elif node.op_type == "Conv" and scope.startswith("dec.resblocks."):
            # dec.resblocks.<j>.convs1.<k> (resblock "1") or dec.resblocks.<j>.convs.<k> (resblock "2")
            dilations.setdefault(int(parts[2]), {})[(parts[3], int(parts[4]))] = int(
                _attribute(node, "dilations", [1])[0])
    n_up, n_blocks = len(strides), len(dilations)
    if n_up == 0 or n_blocks % n_up:
        raise fail(f"the decoder has {n_up} upsampling layers and {n_blocks} resblocks (expected a multiple)")
    per_up = n_blocks // n_up
    resblock = "1" if any(kind == "convs1" for kind, _ in dilations[0]) else "2"
    first = "convs1" if resblock == "1" else "convs"
    up_weights = [tensors[f"dec.ups.{i}.weight"] for i in range(n_up)]
    cond = tensors.get("dec.cond.weight")
    return dict(
        initial_channel=int(tensors["dec.conv_pre.weight"].shape[1]),
        resblock=resblock,
        resblock_kernel_sizes=[int(tensors[f"dec.resblocks.{j}.{first}.0.weight"].shape[-1])
                               for j in range(per_up)],
        resblock_dilation_sizes=[[d for (kind, _), d in sorted(dilations[j].items()) if kind == first]
                                 for j in range(per_up)],
        upsample_rates=[strides[i] for i in range(n_up)],
        upsample_initial_channel=int(tensors["dec.conv_pre.weight"].shape[0]),
        upsample_kernel_sizes=[int(w.shape[-1]) for w in up_weights],
        gin_channels=0 if cond is None else int(cond.shape[1]),
    )


def _voice_json(path: Path) -> dict[str, Any]:
    json_path = path.with_name(path.name + ".json")
    if not json_path.is_file():
        logger.info("%s: no %s beside it; sample rate, scales and phoneme_id_map unknown", path, json_path.name)
        return {}
    try:
        loaded = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise fail(f"{json_path}: not valid JSON ({err})") from err
    if not isinstance(loaded, dict):
        raise fail(f"{json_path}: expected a JSON object (Piper's voice config)")
    return loaded


def read_piper_onnx(path: str | Path) -> dict[str, Any]:
    """A Piper voice as a checkpoint dict ``{"model": {VITS key: Tensor}, "config": {...}}``: the config holds
    ``pyro_vits_layout`` (``"piper-onnx"``), ``piper`` (the ``.onnx.json``, ``{}`` without one),
    ``sample_rate``, ``inference`` (noise_scale, length_scale, noise_w), ``num_speakers``,
    ``phoneme_id_map`` and ``dec`` (the decoder's HiFi-GAN arguments). Raises a one-line ``ValueError`` for an
    ONNX file that is not a traced VITS, ``ImportError`` without the ``onnx`` package."""
    onnx, numpy_helper = _onnx()
    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as err:  # not protobuf / truncated
        raise fail(f"{path}: cannot load as an ONNX model ({' '.join(str(err).split())[:120]})") from err
    graph = model.graph
    names = onnx_names(graph)
    tensors: dict[str, Tensor] = {}
    for init in graph.initializer:
        if init.name in names:
            tensors[names[init.name]] = torch.from_numpy(numpy_helper.to_array(init).copy())
    found = {key.split(".")[0] for key in tensors}
    if not {"enc_p", "flow"} <= found:
        ops = sorted({node.op_type for node in graph.node})[:6]
        raise fail(f"{path}: not a VITS/Piper voice: the ONNX graph has no "
                   f"{' or '.join(sorted({'enc_p', 'flow'} - found))} weights (nodes such as "
                   f"'/enc_p/emb/Gather', '/flow/flows.0/pre/Conv'; found {len(graph.node)} nodes, ops {ops})")
    voice = _voice_json(path)
    audio, inference = voice.get("audio", {}), voice.get("inference", {})
    config = {
        LAYOUT_KEY: "piper-onnx",
        "piper": voice,
        "sample_rate": audio.get("sample_rate"),
        "inference": {k: inference[k] for k in ("noise_scale", "length_scale", "noise_w") if k in inference},
        "num_speakers": voice.get("num_speakers", 1),
        "phoneme_id_map": voice.get("phoneme_id_map"),
        "model": _decoder_config(graph, tensors),  # the HiFi-GAN arguments, in VITS's config section
    }
    logger.info("%s: Piper voice, %d weights in VITS names; no enc_q (a released voice holds the prior path "
                "and decoder only); the duration predictor (dp) is not used", path, len(tensors))
    return {"model": tensors, "config": config}


_HPARAM_DEFAULTS = dict(  # Piper's VitsModel defaults (piper_train/vits/lightning.py)
    resblock="2",
    resblock_kernel_sizes=(3, 5, 7),
    resblock_dilation_sizes=((1, 2), (2, 6), (3, 12)),
    upsample_rates=(8, 8, 4),
    upsample_initial_channel=256,
    upsample_kernel_sizes=(16, 16, 8),
)


def lightning_generator_config(hparams: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """The config of a Piper Lightning checkpoint: its ``hyper_parameters`` (sizes, ``sample_rate``,
    ``num_symbols``, ``n_speakers``) and ``model`` (the decoder's HiFi-GAN arguments under VITS's config
    section, Piper's defaults where an hparam is absent; channels from the weights)."""
    config = {LAYOUT_KEY: "piper-ckpt", "hyper_parameters": dict(hparams)}
    if "dec.conv_pre.weight" in tensors:
        dec = {k: hparams.get(k, v) for k, v in _HPARAM_DEFAULTS.items()}
        cond = tensors.get("dec.cond.weight")
        dec.update(initial_channel=int(tensors["dec.conv_pre.weight"].shape[1]),
                   upsample_initial_channel=int(tensors["dec.conv_pre.weight"].shape[0]),
                   gin_channels=0 if cond is None else int(cond.shape[1]), resblock=str(dec["resblock"]))
        config["model"] = {k: (list(map(list, v)) if k == "resblock_dilation_sizes" else
                             list(v) if isinstance(v, (tuple, list)) else v) for k, v in dec.items()}
    config["sample_rate"] = hparams.get("sample_rate")
    config["num_speakers"] = hparams.get("num_speakers", hparams.get("n_speakers", 1))
    return config
