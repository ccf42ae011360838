"""The one reader of VITS-family checkpoints: a path or a mapping -> a flat ``{key: Tensor}`` of the generator.

Files: ``.pth`` / ``.pt`` / ``.ckpt`` (any other suffix too) with ``torch.load(weights_only=True)``;
``.safetensors`` with the ``safetensors`` package. Nesting: a checkpoint dict's ``model`` (VITS, coqui) or
``state_dict`` (Lightning) entry, and ``module.`` (DataParallel) key prefixes. The one weight-norm routine:
a module's ``parametrizations.weight.original0/1`` (or plain ``weight``) found in any stored form
(``weight_g/weight_v``, torch parametrizations, or a plain ``weight`` after ``remove_weight_norm()``), and the
inverse renaming for export. Errors are one line (at most :data:`MAX_MESSAGE` characters) naming the file.

Hostile files: every tensor is checked against its own storage before anything reads its values (a tensor
declaring more elements than its storage holds -- expanded, stride-0 or overlapping -- is refused: loading
sizes from it would allocate what the file never stored), then every floating-point tensor must be finite
(NaN/inf refused, naming the key and the file). Every size the loaders read from a shape is bounded by
:data:`SIZE_BOUNDS` (:func:`check_sizes`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import first_line

__all__ = ["MAX_MESSAGE", "SIZE_BOUNDS", "SIZE_KINDS", "check_sizes", "check_tensors", "Checkpoint",
           "read_checkpoint", "take_weight", "weight_shape", "weight_norm_key",
           "module_state", "count_modules", "required_shape", "load_part"]

MAX_MESSAGE = 300
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
WEIGHT_NORM_FORMS = {
    "parametrizations": (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
    "weight_g": (".weight_g", ".weight_v"),
}
"""The stored forms of a weight-normed weight: ``(magnitude g, direction v)`` suffixes; ``plain``
(``.weight``, after ``remove_weight_norm()``) is the third."""
_G, _V = WEIGHT_NORM_FORMS["parametrizations"]

SIZE_BOUNDS = {"channels": 4096, "layers": 256, "vocab": 100_000, "speakers": 100_000, "kernel": 64}
"""The declared maximum of every size read from a tensor shape (or a count of stored layers), by kind:
``channels`` (widths, filter widths, heads, spectrogram bins: VITS uses 192-768, 513 bins), ``layers`` (layers
per encoder, flows), ``vocab`` (symbols), ``speakers`` (``emb_g`` rows), ``kernel`` (convolution kernels and
attention windows). A checkpoint beyond them is refused before any module is built."""

SIZE_KINDS = {
    **dict.fromkeys(("channels", "hidden_channels", "inter_channels", "filter_channels", "spec_channels",
                     "gin_channels", "enc_q_hidden", "enc_q_inter", "n_heads"), "channels"),
    **dict.fromkeys(("n_layers", "enc_q_layers", "n_flows"), "layers"),
    **dict.fromkeys(("kernel_size", "enc_q_kernel", "window_size"), "kernel"),
    "n_vocab": "vocab",
    "n_speakers": "speakers",
}
"""Which bound of :data:`SIZE_BOUNDS` each size name the loaders read is held to."""


def fail(message: str) -> ValueError:
    """A one-line ``ValueError`` of at most :data:`MAX_MESSAGE` characters."""
    message = " ".join(message.split())
    return ValueError(message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…")


def short(key: str) -> str:
    return key if len(key) <= 100 else f"{key[:45]}…{key[-50:]}"


def check_sizes(sizes: Mapping[str, Any], where: str) -> None:
    """Refuse (one-line ``ValueError`` naming ``where``) any int size in ``sizes`` beyond its
    :data:`SIZE_BOUNDS` bound (names not in :data:`SIZE_KINDS` and non-int values are not sizes)."""
    for name, value in sizes.items():
        kind = SIZE_KINDS.get(name)
        if kind is None or not isinstance(value, int) or isinstance(value, bool):
            continue
        if not 0 <= value <= SIZE_BOUNDS[kind]:
            raise fail(f"{where}: {name}={value} read from the tensor shapes is outside [0, "
                       f"{SIZE_BOUNDS[kind]}] (the declared maximum for {kind}); refusing to build it")


def _storage_problem(t: Tensor) -> str | None:
    """Why ``t`` is not backed by its own storage (None when it is): a stride-0 dimension of size > 1, more
    elements than the storage holds, or an extent beyond the storage's end."""
    if t.numel() == 0:
        return None
    if t.layout != torch.strided or t.is_sparse or t.is_quantized:
        return f"a {t.layout} tensor (only dense tensors are read)"
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        return f"an expanded (stride-0) tensor of shape {tuple(t.shape)}"
    if any(st < 0 for st in t.stride()):
        return f"a tensor with negative strides {t.stride()}"
    nbytes = t.untyped_storage().nbytes()
    extent = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    if extent * t.element_size() > nbytes:
        return f"shape {tuple(t.shape)} reaches beyond its storage ({nbytes} bytes)"
    if t.numel() * t.element_size() > nbytes:
        return f"shape {tuple(t.shape)} declares {t.numel()} elements, its storage holds {nbytes} bytes " \
               "(overlapping strides)"
    return None


def check_tensors(tensors: Mapping[str, Tensor], label: str) -> None:
    """Refuse (one-line ``ValueError`` naming ``label`` and the key) a tensor not backed by its own storage
    (:func:`_storage_problem`, checked for every tensor before any value is read) or a floating-point tensor
    holding NaN or inf."""
    for key, t in tensors.items():
        problem = _storage_problem(t)
        if problem is not None:
            raise fail(f"{label}: {short(key)} is {problem}; refusing a tensor its file does not store")
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise fail(f"{label}: {short(key)} holds {bad} non-finite (NaN/inf) value(s) of {t.numel()}; "
                       "the checkpoint is corrupt or diverged")


@dataclass(frozen=True)
class Checkpoint:
    """What :func:`read_checkpoint` found: ``tensors`` (keys without ``module.``, as stored otherwise), the
    checkpoint's own ``config`` entry (coqui) or None, and ``label`` (the path, or ``"checkpoint"``) for
    messages."""

    tensors: dict[str, Tensor]
    config: Mapping[str, Any] | None
    label: str
    path: Path | None = None


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (no VITS checkpoint at that path)")
    if path.suffix == ".onnx":  # a Piper voice: {"model": tensors in VITS's names, "config": ...}
        from .piper import read_piper_onnx

        return read_piper_onnx(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(f"{path}: reading .safetensors needs the 'safetensors' package "
                              "(pip install safetensors)") from err
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise fail(f"{path}: cannot load as a safetensors file ({first_line(err, 160)})") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file or a pickle of other objects: not loadable as weights
        raise ValueError(f"{path}: cannot load as a torch checkpoint with torch.load(weights_only=True) "
                         f"({first_line(err, 160)}); if it holds other Python objects, re-save its state "
                         "dict: torch.save({'model': ckpt['model']}, 'generator.pth')") from err


def read_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any]) -> Checkpoint:
    """Read a checkpoint file or unwrap an in-memory checkpoint / state dict (see the module docstring).
    Raises ``FileNotFoundError``, ``ValueError`` (unreadable file, ``model`` not a state dict, a tensor not
    backed by its storage or holding NaN/inf: :func:`check_tensors`) or ``TypeError`` (not a mapping)."""
    path = Path(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
    label = "checkpoint" if path is None else str(path)
    obj = checkpoint if path is None else _load_file(path)
    if not isinstance(obj, Mapping):
        raise TypeError(f"{label}: expected a state dict or a checkpoint dict with 'model', got "
                        f"{type(obj).__name__}")
    key = next((k for k in ("model", "state_dict") if k in obj), None)
    state = obj if key is None else obj[key]
    if not isinstance(state, Mapping):
        raise fail(f"{label}: {key!r} is a {type(state).__name__}, not a state dict")
    tensors = {k.removeprefix("module."): v for k, v in state.items()
               if isinstance(k, str) and isinstance(v, Tensor)}
    check_tensors(tensors, label)
    config = next((obj[k] for k in ("config", "hyper_parameters") if isinstance(obj.get(k), Mapping)), None)
    return Checkpoint(tensors, config, label, path)


# --------------------------------------------------------------------------------------------- weight norm


def weight_norm_key(key: str, form: str = "weight_g") -> str:
    """``key`` with its weight-norm suffix (either form) in ``form`` (``"weight_g"`` or
    ``"parametrizations"``); other keys unchanged."""
    for other in WEIGHT_NORM_FORMS.values():
        for suffix, new in zip(other, WEIGHT_NORM_FORMS[form]):
            if key.endswith(suffix):
                return key[: -len(suffix)] + new
    return key


def weight_shape(entries: Mapping[str, Tensor], base: str) -> torch.Size | None:
    """The shape of the (possibly weight-normed) weight of module ``base`` in any stored form, else None."""
    for suffix in (".weight", ".weight_v", _V):
        if base + suffix in entries:
            return entries[base + suffix].shape
    return None


def weight_norm_g(w: Tensor) -> Tensor:
    """``g = ||w||`` per output channel, computed by torch's own weight-norm kernel so that ``g / ||v||`` is
    exactly 1 there and the re-parametrised weight equals ``w`` bit for bit (float32/float64 on CPU)."""
    ones = w.new_ones((w.shape[0],) + (1,) * (w.dim() - 1))
    try:
        return torch._weight_norm_interface(w, ones, 0)[1].reshape(ones.shape).to(w.dtype)
    except (AttributeError, RuntimeError):  # a build without the fused kernel: equal to within rounding
        return torch.norm_except_dim(w, 2, 0)


def take_weight(entries: Mapping[str, Tensor], key: str, used: set[str]) -> Tensor | None:
    """The tensor for a module's state key ``key`` (weight-normed ones as ``parametrizations…original0/1``)
    in any stored form; adds the stored key it used to ``used``. A plain ``weight`` gives ``g = ||w||``,
    ``v = w``."""
    if key in entries:
        used.add(key)
        return entries[key]
    for suffix, legacy in zip((_G, _V), WEIGHT_NORM_FORMS["weight_g"]):
        if key.endswith(suffix):
            base = key[: -len(suffix)]
            if base + legacy in entries:
                used.add(base + legacy)
                return entries[base + legacy]
            if base + ".weight" in entries:  # weight norm removed
                used.add(base + ".weight")
                w = entries[base + ".weight"]
                return weight_norm_g(w) if suffix == _G else w
    return None


def module_state(module: nn.Module, entries: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``entries`` under ``module``'s own state keys (any weight-norm form); entries it does not use are kept
    as they are, so that a strict ``load_state_dict`` reports them."""
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    for key in module.state_dict():
        value = take_weight(entries, key, used)
        if value is not None:
            state[key] = value
    state.update({k: v for k, v in entries.items() if k not in used})
    return state


def fold_weight_norm(entries: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``entries`` with every weight-normed weight (``weight_g``/``weight_v`` or
    ``parametrizations.weight.original0/1``; norm over all dimensions but 0, as torch's weight norm) folded into
    a plain ``weight``; other entries unchanged. For modules built without weight norm (the HiFi-GAN decoder)."""
    out: dict[str, Tensor] = {}
    for key, value in entries.items():
        for g_suffix, v_suffix in WEIGHT_NORM_FORMS.values():
            base = key[: -len(v_suffix)] if key.endswith(v_suffix) else key[: -len(g_suffix)]
            if key.endswith(v_suffix) and base + g_suffix in entries:
                out[base + ".weight"] = torch._weight_norm(value, entries[base + g_suffix], 0)
                break
            if key.endswith(g_suffix) and base + v_suffix in entries:
                break
        else:
            out[key] = value
    return out


def count_modules(entries: Mapping[str, Tensor], prefix: str) -> int:
    """How many numbered modules ``prefix<i>.`` the entries hold (``prefix`` ends in ``.``)."""
    return len({k[len(prefix) :].split(".")[0] for k in entries if k.startswith(prefix)})


def required_shape(entries: Mapping[str, Tensor], key: str, label: str) -> torch.Size:
    """The shape of ``key`` (a ``….weight`` in any weight-norm form, or any other tensor)."""
    found = weight_shape(entries, key.removesuffix(".weight")) if key.endswith(".weight") else None
    if found is None and key in entries:
        found = entries[key].shape
    if found is None:
        raise ValueError(f"{label}: missing {key}")
    return found


def load_part(module: nn.Module, entries: Mapping[str, Tensor], part: str, label: str) -> None:
    """Strictly load ``entries`` (any weight-norm form) into ``module``; one line naming ``part`` if they differ."""
    try:
        module.load_state_dict(module_state(module, entries), strict=True)
    except RuntimeError as err:
        raise fail(f"{label}: {part} weights do not match VITS's layout: {err}") from err
