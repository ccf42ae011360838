"""Save a trained :class:`~pyro_vits.models.speech.SpeechModel` and its posterior encoder as a VITS generator.

``export_vits_generator`` writes ``<out>/vits/G_<step>.pth`` = ``{"model": state, "iteration": step}`` (as
VITS's ``utils.save_checkpoint``, without optimiser state) with ``state`` holding VITS's ``enc_p.*``,
``enc_q.*``, ``flow.*`` and (multi-speaker) ``emb_g.*`` entries in VITS's weight-norm layout
(``weight_g``/``weight_v``), and ``<out>/vits/config.json`` in VITS's config format. The spectrogram decoder
and its scale are not part of a VITS generator and are not written; VITS's waveform decoder ``dec`` and
duration predictor ``dp`` are absent. :func:`~pyro_vits.vits.generator.load_vits_generator` reads the checkpoint with
or without the config. VITS's own ``SynthesizerTrn`` fixes ``enc_q`` at 16 WN layers and the flow at 4
mean-only couplings of 4 layers; a model trained with other sizes loads here but not there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._io import atomic_write
from ..data.speech_batches import SpeechConfig
from ..models.guides import PosteriorEncoder
from ..models.speech import SpeechModel
from .config import MODEL_SIZES
from .reader import weight_norm_key

__all__ = ["vits_generator_state", "vits_config", "export_vits_generator", "decoder_config", "export_vits_parts"]


def _vits_keys(prefix: str, module: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """``module``'s state under ``prefix.``, weight-norm entries renamed to VITS's
    ``weight_g``/``weight_v``."""
    out = {}
    for key, value in module.state_dict().items():
        if key.startswith(skip):
            continue
        out[f"{prefix}.{weight_norm_key(key, 'weight_g')}"] = value.detach().cpu().clone()
    return out


def _check_pair(model: SpeechModel, guide: PosteriorEncoder) -> None:
    if not isinstance(model, SpeechModel) or not isinstance(guide, PosteriorEncoder):
        raise TypeError(f"need a SpeechModel and a PosteriorEncoder, got {type(model).__name__} and "
                        f"{type(guide).__name__}")
    cfg = model.config
    if (guide.config["x_channels"], guide.channels) != (cfg["spec_channels"], cfg["inter_channels"]):
        raise ValueError(f"the guide maps {guide.config['x_channels']} -> {guide.channels} channels, "
                         f"the model expects {cfg['spec_channels']} -> {cfg['inter_channels']}")
    if cfg["n_speakers"] > 0 and getattr(guide, "emb_g", None) is not model.emb_g:
        raise ValueError("a VITS generator has one speaker embedding: the guide must share the model's emb_g "
                         "(see speech_model_and_guide)")


def vits_generator_state(model: SpeechModel, guide: PosteriorEncoder) -> dict[str, Tensor]:
    """The VITS generator state dict (CPU tensors) of the model's latent parts and the guide."""
    _check_pair(model, guide)
    state = {**_vits_keys("enc_p", model.enc_p), **_vits_keys("enc_q", guide, skip=("emb_g.",)),
             **_vits_keys("flow", model.flow)}
    if model.n_speakers > 0:
        state.update(_vits_keys("emb_g", model.emb_g))
    return state


def vits_config(model: SpeechModel, guide: PosteriorEncoder, speech: SpeechConfig,
                train: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """VITS's ``config.json`` for the exported generator: ``data`` from ``speech``, ``model`` from the
    model's sizes (the waveform-decoder keys keep VITS's ``ljs_base`` values; no decoder is exported),
    ``train`` from ``train``; ``pyro_vits`` records the sizes VITS hard-codes and the parts exported."""
    _check_pair(model, guide)
    cfg = model.config
    flow = model.flow.config
    return {
        "train": dict(train or {}),
        "data": {
            "text_cleaners": ["english_cleaners2"], "cleaned_text": True, "max_wav_value": 32768.0,
            "sampling_rate": speech.sampling_rate, "filter_length": speech.filter_length,
            "hop_length": speech.hop_length, "win_length": speech.win_length, "n_mel_channels": 80,
            "mel_fmin": 0.0, "mel_fmax": None, "add_blank": speech.add_blank, "n_speakers": cfg["n_speakers"],
        },
        "model": {
            **{k: cfg[k] for k in MODEL_SIZES}, "p_dropout": cfg["p_dropout"],
            "resblock": "1", "resblock_kernel_sizes": [3, 7, 11],
            "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "upsample_rates": [8, 8, 2, 2],
            "upsample_initial_channel": 512, "upsample_kernel_sizes": [16, 16, 4, 4], "n_layers_q": 3,
            "use_spectral_norm": False,
        },
        "pyro_vits": {
            "exported": ["enc_p", "enc_q", "flow"] + (["emb_g"] if cfg["n_speakers"] else []),
            "enc_q_layers": guide.config["n_layers"], "flow_n_flows": flow["n_flows"],
            "flow_n_layers": flow["n_layers"], "flow_mean_only": flow["mean_only"],
            "n_vocab": cfg["n_vocab"],
        },
    }


def export_vits_generator(model: SpeechModel, guide: PosteriorEncoder, speech: SpeechConfig,
                          out_dir: str | os.PathLike, step: int,
                          train: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir/vits/G_<step>.pth`` and ``out_dir/vits/config.json`` (each atomically); returns the
    checkpoint's path."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    folder = Path(out_dir) / "vits"
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = {"model": vits_generator_state(model, guide), "iteration": step}
    config = vits_config(model, guide, speech, train)
    path = folder / f"G_{step}.pth"
    atomic_write(path, lambda f: torch.save(checkpoint, f), "wb")
    atomic_write(folder / "config.json", lambda f: json.dump(config, f, indent=2))
    return path


def decoder_config(dec: nn.Module) -> dict[str, Any]:
    """VITS's ``model`` keys of a :class:`~pyro_vits.nn.hifigan.Generator` (read from its modules), so that
    :func:`~pyro_vits.vits.generator.load_vits_generator` can rebuild it from a config."""
    first = dec.resblocks[0]
    kind = "1" if hasattr(first, "convs1") else "2"
    blocks = list(dec.resblocks)[: dec.num_kernels]
    convs = [b.convs1 if kind == "1" else b.convs for b in blocks]
    return {
        "resblock": kind, "resblock_kernel_sizes": [c[0].kernel_size[0] for c in convs],
        "resblock_dilation_sizes": [[conv.dilation[0] for conv in c] for c in convs],
        "upsample_rates": list(dec.upsample_rates), "upsample_initial_channel": dec.conv_pre.out_channels,
        "upsample_kernel_sizes": [u.kernel_size[0] for u in dec.ups],
    }


def export_vits_parts(out_dir: str | os.PathLike, step: int, parts: Mapping[str, nn.Module | None],
                      config: Mapping[str, Any]) -> Path:
    """Write ``out_dir/vits/G_<step>.pth`` (``{"model": state, "iteration": step}``) holding each module of
    ``parts`` (VITS part name -> module, e.g. ``enc_p``, ``enc_q``, ``flow``, ``emb_g``, ``dec``; None
    skipped; an ``enc_q``'s own ``emb_g`` is left to the ``emb_g`` part) in VITS's weight-norm layout, and
    ``config`` as ``out_dir/vits/config.json``; returns the checkpoint's path."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    state: dict[str, Tensor] = {}
    for name, module in parts.items():
        if module is not None:
            state.update(_vits_keys(name, module, skip=("emb_g.",) if name == "enc_q" else ()))
    folder = Path(out_dir) / "vits"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"G_{step}.pth"
    atomic_write(path, lambda f: torch.save({"model": state, "iteration": step}, f), "wb")
    atomic_write(folder / "config.json", lambda f: json.dump(dict(config), f, indent=2))
    return path
