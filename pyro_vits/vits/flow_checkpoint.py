"""Recognise and strictly load the prior flow of a VITS-family generator checkpoint.

Supported, each with and without speaker conditioning, from float32/float16/bfloat16/float64 tensors (loaded
into ``dtype``); keys under ``flow.flows.<i>.``:

- VITS residual couplings: ``pre``, ``enc.in_layers/res_skip_layers[/cond_layer]``, ``post`` at 0, 2, 4, …
  (parameter-free ``Flip`` s between); coqui-TTS numbers the same couplings 0, 1, 2, ….
- VITS2 ``pre_conv``: the same plus ``pre_transformer`` (width C/2) and ``post_transformer``; ``pre_conv2``:
  plus ``pre_transformer`` at the hidden width; ``fft``: ``pre``, ``enc.self_attn_layers…``
  ``[, enc.cond_pre/cond_layer]``, ``post``; all at 0, 2, 4, ….
- VITS2 ``mono_layer_*``: residual couplings at 0, 3, 6, … and ``pre_transformer``/``post`` layers at
  2, 5, 8, ….
- Bert-VITS2: ``pre``, ``enc.attn_layers…[, enc.spk_emb_linear]``, ``post`` at 0, 2, 4, ….

Weight-normed convolutions may be stored as ``weight_g/weight_v``, ``parametrizations.weight.original0/1`` or,
after ``remove_weight_norm()``, as a plain ``weight`` (loaded as ``g = ||w||``, ``v = w``: the same weight,
bit for bit on CPU). Sizes come from the tensor shapes. What weights do not store comes from the checkpoint's
config (coqui's ``config`` entry, or a VITS ``config.json`` beside the file, see :func:`read_vits_checkpoint`)
or from the arguments: the WN dilation (``dilation_rate_flow``; default 1, VITS's value), whether a VITS2
mono-layer flow is ``inter`` or ``post`` residual (``transformer_flow_type``), and the attention head count
where no relative-position table shows it (VITS2: 2, its ``fft`` type 4). Anything else is refused with one
short ``ValueError`` (at most 300 characters) naming the first offending key; nothing is loaded partially.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._validate import check_positive_ints
from ..flows.residual import ResidualCouplingBlock
from ..flows.transformer import (
    TRANSFORMER_FLOW_TYPES,
    ResidualCouplingTransformersBlock,
    TransformerCouplingBlock,
)
from .config import config_value
from .layouts import Layout, canonical, layout_for_keys, resolve
from .reader import (
    FLOAT_DTYPES,
    MAX_MESSAGE,
    Checkpoint,
    check_sizes,
    read_checkpoint,
    take_weight,
    weight_shape,
)
from .reader import fail as _fail
from .reader import short as _short

__all__ = ["load_vits_flow", "read_vits_checkpoint", "VITSFlowCheckpoint", "MAX_MESSAGE", "flow_family",
           "flow_from_tensors"]

_DEFAULT_HEADS = {"pre_conv": 2, "pre_conv2": 2, "fft": 4, "mono": 2, "bert": 2}
_KIND = {
    "wn": "VITS residual coupling",
    "pre_conv": "VITS2 pre_conv coupling",
    "pre_conv2": "VITS2 pre_conv2 coupling",
    "fft": "VITS2 fft coupling",
    "mono": "VITS2 mono transformer layer",
    "bert": "Bert-VITS2 transformer coupling",
}
_LABEL = {
    "wn": "VITS",
    "coqui": "coqui-TTS",
    "pre_conv": "VITS2 pre_conv",
    "pre_conv2": "VITS2 pre_conv2",
    "fft": "VITS2 fft",
    "mono": "VITS2 mono_layer",
    "bert": "Bert-VITS2",
}


# --------------------------------------------------------------------------------------------- entries


def _flow_modules(state: Mapping[str, Tensor], dtype: torch.dtype) -> dict[int, dict[str, Tensor]]:
    """``{i: {sub_key: tensor}}`` for the canonical keys ``flow.flows.<i>.<sub_key>``, cast to ``dtype``."""
    modules: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        if not key.startswith("flow."):
            continue
        parts = key.split(".", 3)
        if len(parts) < 4 or parts[1] != "flows" or not parts[2].isdigit():
            raise _fail(
                f"{_short(key)}: unsupported flow layout (expected 'flow.flows.<i>.…'; Bert-VITS2's "
                "share_parameter=True flow is not supported)"
            )
        if value.dtype not in FLOAT_DTYPES:
            raise _fail(
                f"{_short(key)}: dtype {value.dtype} is not a supported weight dtype "
                "(float32, float16, bfloat16 or float64)"
            )
        modules.setdefault(int(parts[2]), {})[parts[3]] = value.to(dtype)
    if not modules:
        keys = list(state)[:3]
        raise _fail(
            f"no flow found: expected keys 'flow.flows.<i>.…' (optionally under 'module.'), got "
            f"{len(state)} entries such as {[_short(k)[:60] for k in keys]}"
        )
    return modules


def _has(sub: Mapping[str, Tensor], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in sub)


def _kind(sub: Mapping[str, Tensor]) -> str:
    if _has(sub, "enc.self_attn_layers."):
        return "fft"
    if _has(sub, "enc.attn_layers."):
        return "bert"
    if _has(sub, "enc.in_layers."):
        if _has(sub, "pre_transformer."):
            return "pre_conv" if _has(sub, "post_transformer.") else "pre_conv2"
        return "wn"
    if _has(sub, "pre_transformer.") and not _has(sub, "pre."):
        return "mono"
    return "unknown"


def flow_family(modules: dict[int, dict[str, Tensor]]) -> str:
    """The family of the flow and a check of its module numbering (coqui's is renumbered in place)."""
    kinds = {i: _kind(sub) for i, sub in modules.items()}
    for i, kind in sorted(kinds.items()):
        if kind == "unknown":
            raise _fail(
                f"flow.flows.{i}.{_short(next(iter(modules[i])))}: not a layer of a VITS, coqui-TTS, "
                "VITS2 or Bert-VITS2 prior flow"
            )
    found = set(kinds.values())
    family = "mono" if found == {"wn", "mono"} else found.pop() if len(found) == 1 else ""
    if not family:
        first = sorted(kinds)[0]
        other = next(i for i in sorted(kinds) if kinds[i] != kinds[first])
        raise _fail(
            f"flow.flows.{other}: a {_KIND[kinds[other]]} after a {_KIND[kinds[first]]} "
            f"(flow.flows.{first}) fits no supported flow"
        )
    indices = sorted(kinds)
    n = sum(k != "mono" for k in kinds.values())
    if family == "wn" and indices == list(range(n)) and n > 1:
        for i in reversed(indices):  # coqui-TTS numbering: coupling i is VITS's flows.<2 i>
            modules[2 * i] = modules.pop(i)
        return "coqui"
    if family == "mono":
        expected = {3 * i: "wn" for i in range(n)} | {3 * i + 2: "mono" for i in range(n)}
    else:
        expected = {2 * i: family for i in range(n)}
    for i in sorted(set(expected) | set(kinds)):
        if expected.get(i) != kinds.get(i):
            want = f"a {_KIND[expected[i]]}" if i in expected else "no layer"
            found_here = f"a {_KIND[kinds[i]]}" if i in kinds else "nothing"
            raise _fail(
                f"flow.flows.{i}: the {_LABEL[family]} numbering expects {want} there "
                f"(found {found_here}; layers at {indices[:12]})"
            )
    return family


# --------------------------------------------------------------------------------------------- sizes


def _weight_shape(sub: Mapping[str, Tensor], base: str, where: str) -> torch.Size:
    """Shape of a (possibly weight-normed) convolution weight ``base`` in any stored form."""
    shape = weight_shape(sub, base)
    if shape is None:
        raise _fail(f"missing {where}.{base}.weight (plain, weight_v or parametrizations.weight.original1) "
                    "in the flow")
    return shape


def _count(sub: Mapping[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".", 1)[0] for k in sub if k.startswith(prefix)})


def _coupling_sizes(sub: Mapping[str, Tensor], where: str) -> dict[str, Any]:
    """Sizes of a coupling with ``pre``/``post`` (and a WN ``enc`` when it has one)."""
    pre = _weight_shape(sub, "pre", where)
    post = _weight_shape(sub, "post", where)
    hidden, half = pre[0], pre[1]
    if post[0] not in (half, 2 * half):
        raise _fail(
            f"{where}.post.weight: {post[0]} output channels, expected {half} (mean-only) or {2 * half}"
        )
    sizes = dict(channels=2 * half, hidden_channels=hidden, mean_only=post[0] == half, gin_channels=0)
    if _has(sub, "enc.in_layers."):
        sizes.update(
            kernel_size=_weight_shape(sub, "enc.in_layers.0", where)[-1],
            n_layers=_count(sub, "enc.in_layers."),
        )
        if _has(sub, "enc.cond_layer."):
            sizes["gin_channels"] = _weight_shape(sub, "enc.cond_layer", where)[1]
    check_sizes(sizes, where)
    return sizes


def _encoder_spec(
    sub: Mapping[str, Tensor], prefix: str, where: str, attn: str = "attn_layers"
) -> dict[str, Any]:
    """Sizes of an :class:`~pyro_vits.nn.Encoder` / ``FFT`` stored under ``prefix``."""
    conv_1 = _weight_shape(sub, f"{prefix}ffn_layers.0.conv_1", where)
    rel = sub.get(f"{prefix}{attn}.0.emb_rel_k")
    spec = dict(
        n_layers=_count(sub, f"{prefix}{attn}."),
        kernel_size=conv_1[-1],
        filter_channels=conv_1[0],
        window_size=None if rel is None else (rel.shape[1] - 1) // 2,
    )
    check_sizes(spec, f"{where}.{prefix.rstrip('.')}")
    return spec


def _heads(sub: Mapping[str, Tensor], prefix: str, where: str, given: int | None, default: int) -> int:
    """Attention heads: from the relative-position tables when there are any (``C / d_k``), else ``given`` or
    ``default``; a ``given`` value contradicting the tables is refused."""
    rel = sub.get(f"{prefix}attn_layers.0.emb_rel_k")
    width = _weight_shape(sub, f"{prefix}ffn_layers.0.conv_1", where)[1]
    stored = None if rel is None or width % rel.shape[-1] else width // rel.shape[-1]
    if stored is not None and given is not None and stored != given:
        raise _fail(
            f"n_heads={given} contradicts {where}.{prefix}attn_layers.0.emb_rel_k of shape "
            f"{tuple(rel.shape)} "
            f"(width {width}: {stored} heads)"
        )
    return stored or given or default


def _resolve(name: str, explicit: Any, from_config: Any, default: Any) -> Any:
    if explicit is not None and from_config is not None and explicit != from_config:
        raise _fail(f"{name}={explicit!r} contradicts the checkpoint config ({from_config!r})")
    return explicit if explicit is not None else from_config if from_config is not None else default


def _mono_type(explicit: str | None, config: Mapping[str, Any] | None) -> str:
    from_config = config_value(config, "transformer_flow_type")
    if from_config is None and config_value(config, "use_transformer_flows"):
        from_config = "mono_layer_post_residual"  # VITS2's default when the type is not configured
    flow_type = _resolve("transformer_flow_type", explicit, from_config, None)
    if flow_type not in ("mono_layer_inter_residual", "mono_layer_post_residual"):
        raise _fail(
            "flow.flows.2: a VITS2 mono-layer flow; inter vs post residual is not stored in weights: pass "
            "transformer_flow_type='mono_layer_inter_residual' or 'mono_layer_post_residual' "
            f"(got {flow_type!r})"
        )
    return flow_type


def _check_flow_type(family: str, kind: str, flow_type: str | None) -> None:
    """An explicit ``transformer_flow_type`` must name the family the weights show."""
    if flow_type is None or flow_type == family or (family == "mono" and flow_type.startswith("mono_layer")):
        return
    raise _fail(f"transformer_flow_type={flow_type!r} but flow.flows.0 is a {_KIND[kind]}")


def _build(family: str, modules: dict[int, dict[str, Tensor]], dilation: int, n_heads: int | None,
           flow_type: str | None, config: Mapping[str, Any] | None) -> ResidualCouplingBlock:
    """An unloaded block of ``family`` sized from the shapes of ``modules``."""
    first = modules[0]
    _check_flow_type(family, _kind(first), flow_type)
    s = _coupling_sizes(first, "flow.flows.0")
    n_flows = sum(_kind(sub) != "mono" for sub in modules.values())
    check_sizes({"n_flows": n_flows, "n_heads": n_heads}, "flow")
    c, h, gin, mean_only = s["channels"], s["hidden_channels"], s["gin_channels"], s["mean_only"]
    if family in ("wn", "coqui"):
        return ResidualCouplingBlock(c, h, s["kernel_size"], dilation, s["n_layers"], n_flows, gin, mean_only)
    if family == "bert":
        spec = _encoder_spec(first, "enc.", "flow.flows.0")
        heads = _heads(first, "enc.", "flow.flows.0", n_heads, _DEFAULT_HEADS[family])
        if _has(first, "enc.spk_emb_linear."):
            gin = first["enc.spk_emb_linear.weight"].shape[1]
            check_sizes({"gin_channels": gin}, "flow.flows.0.enc.spk_emb_linear")
        return TransformerCouplingBlock(c, h, spec["filter_channels"], heads, spec["n_layers"],
                                        spec["kernel_size"], n_flows, gin, mean_only=mean_only,
                                        window_size=spec["window_size"])
    if family == "fft":
        spec = _encoder_spec(first, "enc.", "flow.flows.0", attn="self_attn_layers")
        spec["n_heads"] = n_heads or _DEFAULT_HEADS[family]
        if _has(first, "enc.cond_layer."):
            gin = _weight_shape(first, "enc.cond_layer", "flow.flows.0")[1]
            check_sizes({"gin_channels": gin}, "flow.flows.0.enc.cond_layer")
        # upstream's positional wiring: the block's dilation_rate and n_layers are the FFT's layers and heads
        return ResidualCouplingTransformersBlock(c, h, spec["kernel_size"], spec["n_layers"], spec["n_heads"],
                                                 n_flows, gin, "fft", mean_only=mean_only, transformer=spec)
    flow_type = _vits2_type(family, modules, flow_type, config)
    spec = _pre_transformer_spec(family, modules, n_heads)
    return ResidualCouplingTransformersBlock(c, h, s["kernel_size"], dilation, s["n_layers"], n_flows, gin,
                                             flow_type, mean_only=mean_only, transformer=spec)


def _pre_transformer_spec(family: str, modules: dict[int, dict[str, Tensor]], n_heads: int | None) -> dict:
    """The sizes of the ``pre_transformer`` of a VITS2 ``pre_conv``/``pre_conv2``/mono-layer flow."""
    source, where = (modules[2], "flow.flows.2") if family == "mono" else (modules[0], "flow.flows.0")
    spec = _encoder_spec(source, "pre_transformer.", where)
    spec["n_heads"] = _heads(source, "pre_transformer.", where, n_heads, _DEFAULT_HEADS[family])
    if _weight_shape(source, "pre_transformer.ffn_layers.0.conv_1", where)[1] == spec["filter_channels"]:
        spec["filter_channels"] = None  # upstream: filter width = model width (also for post_transformer)
    return spec


def _vits2_type(family: str, modules: dict[int, dict[str, Tensor]], flow_type: str | None,
                config: Mapping[str, Any] | None) -> str:
    if family != "mono":
        return family
    post = _weight_shape(modules[2], "post", "flow.flows.2")
    if post[0] != post[1]:
        raise _fail(f"flow.flows.2.post.weight: {post[0]} output channels, expected {post[1]} (mean-only)")
    return _mono_type(flow_type, config)


# --------------------------------------------------------------------------------------------- loading


def _load_strict(block: ResidualCouplingBlock, modules: dict[int, dict[str, Tensor]], family: str) -> None:
    """Load ``modules`` into ``block`` exactly; errors name keys as the checkpoint numbers them."""
    label, step = _LABEL[family], 2 if family == "coqui" else 1
    state: dict[str, Tensor] = {}
    used: dict[int, set[str]] = {i: set() for i in modules}
    for key, param in block.state_dict().items():
        _, index, sub_key = key.split(".", 2)
        value = take_weight(modules.get(int(index), {}), sub_key, used.setdefault(int(index), set()))
        name = f"flow.flows.{int(index) // step}.{_short(sub_key)}"
        if value is None:
            raise _fail(f"missing {name} for the {label} flow inferred from flow.flows.0")
        if value.shape != param.shape:
            raise _fail(
                f"{name}: shape {tuple(value.shape)}, but the {label} flow inferred from "
                f"flow.flows.0 expects {tuple(param.shape)}"
            )
        state[key] = value
    for i, sub in sorted(modules.items()):
        extra = sorted(set(sub) - used[i])
        if extra:
            raise _fail(
                f"unexpected key flow.flows.{i // step}.{_short(extra[0])} for the {label} flow "
                "inferred from flow.flows.0"
            )
    block.load_state_dict(state, strict=True)


def _check_arguments(dilation_rate: int | None, flow_type: str | None, n_heads: int | None,
                     dtype: torch.dtype) -> None:
    if flow_type is not None and flow_type not in TRANSFORMER_FLOW_TYPES:
        raise ValueError(f"transformer_flow_type must be one of {TRANSFORMER_FLOW_TYPES} or None, got {flow_type!r}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    check_positive_ints(allow_none=True, dilation_rate=dilation_rate, n_heads=n_heads)


def flow_from_tensors(
    tensors: Mapping[str, Tensor],
    layout: Layout,
    *,
    named: bool = False,
    dilation_rate: int | None = None,
    transformer_flow_type: str | None = None,
    n_heads: int | None = None,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[ResidualCouplingBlock, Layout]:
    """The loaded flow of canonically named ``tensors`` (``flow.flows.<i>.…``) and the layout that holds it
    (``layout`` itself when ``named``, else the layout with its key names holding this flow family)."""
    modules = _flow_modules(tensors, dtype)
    family = flow_family(modules)
    layout = resolve(layout, family, named, _KIND[_kind(modules[0])])
    dilation = _resolve("dilation_rate", dilation_rate, config_value(config, "dilation_rate_flow"), 1)
    heads_config = config_value(config, "n_heads") if "n_heads" in layout.config_values else None
    heads = _resolve("n_heads", n_heads, heads_config, None)
    block = _build(family, modules, dilation, heads, transformer_flow_type, config).to(dtype)
    _load_strict(block, modules, family)
    return block, layout


def _read(checkpoint: Checkpoint, layout: str | None, config: Mapping[str, Any] | None,
          **kwargs: Any) -> tuple[ResidualCouplingBlock, Tensor | None]:
    """The flow and ``emb_g`` of ``checkpoint`` through its layout."""
    found = layout_for_keys(checkpoint.tensors, layout)
    tensors, _ = canonical(checkpoint.tensors, found)
    if config is None:
        config = checkpoint.config
    flow, _ = flow_from_tensors(tensors, found, named=layout is not None, config=config, **kwargs)
    return flow, tensors.get("emb_g.weight")


def load_vits_flow(
    obj: Mapping[str, Any],
    dilation_rate: int | None = None,
    *,
    transformer_flow_type: str | None = None,
    n_heads: int | None = None,
    config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    layout: str | None = None,
) -> ResidualCouplingBlock:
    """Build and strictly load the prior flow of a VITS-family generator state dict (see the module
    docstring).

    ``obj``: a state dict or a checkpoint dict with ``model`` (keys optionally under ``module.``), read by
    :func:`~pyro_vits.vits.reader.read_checkpoint`; its ``config`` entry (coqui) is used when ``config`` is
    None. ``dilation_rate``: the WN dilation (None: the config's ``dilation_rate_flow``, else 1).
    ``transformer_flow_type``: needed for VITS2 mono-layer flows without a config. ``n_heads``: attention heads
    (None: the family's upstream value). ``layout``: a name in :data:`~pyro_vits.vits.layouts.LAYOUTS` (None:
    detected). Returns a :class:`ResidualCouplingBlock` (or subclass) of ``dtype``. Raises ``ValueError``
    (≤ 300 characters, naming the first offending key) for anything it cannot load exactly, ``TypeError`` for
    a non-mapping.
    """
    _check_arguments(dilation_rate, transformer_flow_type, n_heads, dtype)
    checkpoint = read_checkpoint(obj)
    return _read(checkpoint, layout, config, dilation_rate=dilation_rate,
                 transformer_flow_type=transformer_flow_type, n_heads=n_heads, dtype=dtype)[0]


@dataclass(frozen=True)
class VITSFlowCheckpoint:
    """What :func:`read_vits_checkpoint` found: the loaded ``flow``, the speaker table ``emb_g``
    ``(n_speakers, gin)`` (None when absent) and where its config came from (None, ``"checkpoint"`` or a
    path)."""

    flow: ResidualCouplingBlock
    emb_g: Tensor | None
    config_source: str | None

    @property
    def n_speakers(self) -> int:
        return 0 if self.emb_g is None else int(self.emb_g.shape[0])


def _config_beside(path: Path) -> dict[str, Any] | None:
    if not (path.parent / "config.json").is_file():
        return None
    try:
        return json.loads((path.parent / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path.parent / 'config.json'} beside the checkpoint: "
                         f"{str(err)[:120]}") from err


def read_vits_checkpoint(
    path: str | os.PathLike,
    dilation_rate: int | None = None,
    *,
    transformer_flow_type: str | None = None,
    n_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    layout: str | None = None,
) -> VITSFlowCheckpoint:
    """Read a generator checkpoint file (:func:`~pyro_vits.vits.reader.read_checkpoint`) and load its flow
    (:func:`load_vits_flow`) and ``emb_g``. The config is the checkpoint's ``config`` entry, else a
    ``config.json`` in the same folder (VITS / VITS2 / Bert-VITS2 layout), else none. Errors start with the
    path (the loader's own part stays within 300 characters)."""
    _check_arguments(dilation_rate, transformer_flow_type, n_heads, dtype)
    checkpoint = read_checkpoint(Path(path))
    config, source = checkpoint.config, "checkpoint"
    if config is None:
        config = _config_beside(Path(path))
        source = None if config is None else str(Path(path).parent / "config.json")
    try:
        flow, emb = _read(checkpoint, layout, config, dilation_rate=dilation_rate,
                          transformer_flow_type=transformer_flow_type, n_heads=n_heads, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{path}: {err}") from err
    return VITSFlowCheckpoint(flow, None if emb is None else emb.detach().to(dtype), source)
