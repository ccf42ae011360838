"""``pyro-vits fit-speech`` / ``python -m pyro_vits.apps.fit_speech``: train VITS's latent model on a corpus.

    python -m pyro_vits.apps.fit_speech --corpus data/speech-corpus --out runs/speech        # CPU preset
    python -m pyro_vits.apps.fit_speech --corpus data/speech-corpus --device cuda --out runs/speech-vits
    python -m pyro_vits.apps.fit_speech --corpus data/speech-corpus --elbo trace --particles 4 --affine

The corpus is an LJSpeech-format folder (``metadata.csv`` + ``wavs/``, normalized text in VITS's symbols);
when it holds VITS filelists ``train.txt`` / ``val.txt`` (as ``make speech-corpus`` writes) those give the
training and held-out utterances and the speaker ids. Model: :class:`~pyro_vits.speech_model.SpeechModel`
with VITS's posterior encoder as guide, trained by :func:`~pyro_vits.train.fit` (run folder, checkpoints,
``--resume``). At the end the latent parts are exported as a VITS generator, ``<out>/vits/G_<steps>.pth`` and
``<out>/vits/config.json`` (:func:`~pyro_vits.vits_export.export_vits_generator`). Presets: ``cpu`` (small,
minutes on 2 cores) and ``vits`` (VITS's sizes: inter/hidden 192, 6 text-encoder layers, 16 posterior-encoder
layers, 1024-point STFT), the default when ``--device`` is CUDA; any size option overrides its preset.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import run_main
from ..data.speech import VITS_SYMBOLS, SpeechConfig, read_ljspeech
from ..data.speech_data import SpeechData, load_speech_data
from ..speech_model import SpeechModel, speech_model_and_guide
from ..elbo import ELBOS, make_elbo
from ..train import fit
from ..vits_export import export_vits_generator

__all__ = ["PRESETS", "SIZE_KEYS", "SpeechCorpus", "build_parser", "main", "read_corpus", "build_pair"]

logger = logging.getLogger("pyro_vits")

SIZE_KEYS = ("inter_channels", "hidden_channels", "filter_channels", "n_heads", "n_layers", "flow_n_layers",
             "n_flows", "guide_layers", "decoder_channels", "gin_channels")
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(n_fft=512, hop_length=256, inter_channels=16, hidden_channels=64, filter_channels=128,
                n_heads=2, n_layers=2, flow_n_layers=2, n_flows=4, guide_layers=4, decoder_channels=64,
                gin_channels=16, steps=300, batch_size=8, lr=2e-3, max_utterances=300, max_frames=900,
                eval_samples=4, eval_size=32, heldout_size=24),
    "vits": dict(n_fft=1024, hop_length=256, inter_channels=192, hidden_channels=192, filter_channels=768,
                 n_heads=2, n_layers=6, flow_n_layers=4, n_flows=4, guide_layers=16, decoder_channels=256,
                 gin_channels=256, steps=20000, batch_size=32, lr=2e-4, max_utterances=None, max_frames=1000,
                 eval_samples=8, eval_size=64, heldout_size=48),
}
"""Defaults by preset; an explicit option wins."""


@dataclass
class SpeechCorpus:
    """A corpus read for training: ``train`` and ``heldout`` (None without ``val.txt``) data, the
    ``speech`` settings that made the spectrograms and ``n_speakers`` (0: single speaker)."""

    train: SpeechData
    heldout: SpeechData | None
    speech: SpeechConfig
    n_speakers: int


def read_corpus(folder: str | Path, speech: SpeechConfig, *, max_utterances: int | None = None,
                max_frames: int | None = None, heldout_size: int | None = None,
                speakers: bool = True) -> SpeechCorpus:
    """Read an LJSpeech-format ``folder`` (``metadata.csv`` required); ``train.txt``/``val.txt`` when present
    (the first ``heldout_size`` of ``val.txt`` held out), else every ``metadata.csv`` utterance. Without
    ``speakers`` the filelists' speaker ids are dropped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"corpus {folder} is not a folder (expected an LJSpeech-format folder)")
    next(read_ljspeech(folder))  # metadata.csv must exist and hold utterances
    if (folder / "train.txt").is_file():
        train = load_speech_data(folder / "train.txt", speech, data_root=folder,
                                 max_utterances=max_utterances, max_frames=max_frames)
        val = folder / "val.txt"
        heldout = (load_speech_data(val, speech, data_root=folder, max_utterances=heldout_size,
                                    max_frames=max_frames) if val.is_file() and val.stat().st_size else None)
    else:
        train = load_speech_data(folder, speech, max_utterances=max_utterances, max_frames=max_frames)
        heldout = None
    parts = [d for d in (train, heldout) if d is not None]
    n_speakers = max((int(d.speaker.max()) + 1 for d in parts if d.speaker is not None), default=0)
    if not speakers:
        for d in parts:
            d.speaker = None
        n_speakers = 0
    return SpeechCorpus(train, heldout, speech, n_speakers)


def build_pair(sizes: dict[str, Any], speech: SpeechConfig, n_speakers: int, mean_only: bool = True,
               seed: int = 0) -> tuple[SpeechModel, Any]:
    """Model and guide of the given ``sizes`` (:data:`SIZE_KEYS`) for ``speech``'s spectrogram, initialised
    from ``seed`` (the global random state is left as it was)."""
    kwargs = {k: sizes[k] for k in SIZE_KEYS if k not in ("guide_layers", "gin_channels")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return speech_model_and_guide(
            len(VITS_SYMBOLS), speech.n_freq, guide_layers=sizes["guide_layers"], mean_only=mean_only,
            n_speakers=n_speakers, gin_channels=sizes["gin_channels"] if n_speakers else 0, **kwargs)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="LJSpeech-format corpus folder (make speech-corpus)")
    p.add_argument("--out", default="runs/speech", help="run folder")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="sizes and schedule (default: vits on CUDA, else cpu)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:<i> or auto")
    p.add_argument("--elbo", choices=tuple(ELBOS), default="vits",
                   help="ELBO estimator (vits: VITS's analytic-entropy KL)")
    p.add_argument("--particles", type=int, default=1, help="K guide draws per step (vectorised)")
    p.add_argument("--affine", action="store_true", help="affine couplings (VITS: mean-only)")
    p.add_argument("--single-speaker", action="store_true", help="ignore the corpus's speaker ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=None,
                   help="steps between evaluations (default: steps / 5)")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run files in a non-empty --out")
    p.add_argument("--no-add-blank", action="store_true", help="no blank between symbols (VITS: add_blank)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    for key in ("n_fft", "hop_length", *SIZE_KEYS, "steps", "batch_size", "max_utterances", "max_frames",
                "eval_samples", "eval_size", "heldout_size"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help="(preset)")
    p.add_argument("--lr", type=float, default=None, help="(preset) learning rate")
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    preset = args.preset or ("vits" if str(args.device).startswith("cuda") else "cpu")
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in PRESETS[preset].items()}
    return dict(chosen, preset=preset)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    s = _settings(args)
    speech = SpeechConfig(filter_length=s["n_fft"], hop_length=s["hop_length"], win_length=s["n_fft"],
                          add_blank=not args.no_add_blank)
    corpus = read_corpus(args.corpus, speech, max_utterances=s["max_utterances"], max_frames=s["max_frames"],
                         heldout_size=s["heldout_size"], speakers=not args.single_speaker)
    model, guide = build_pair(s, speech, corpus.n_speakers, mean_only=not args.affine, seed=args.seed)
    extra = dict(corpus=str(args.corpus), settings=s, speech=dict(
        sampling_rate=speech.sampling_rate, n_fft=speech.filter_length, hop_length=speech.hop_length,
        add_blank=speech.add_blank))
    result = fit(model, guide, corpus.train, steps=s["steps"], elbo=make_elbo(args.elbo, args.particles),
                 lr=s["lr"], batch_size=s["batch_size"], device=args.device, seed=args.seed, out_dir=args.out,
                 log_every=args.log_every or max(1, s["steps"] // 5), progress=not args.quiet,
                 heldout=corpus.heldout, eval_samples=s["eval_samples"], eval_size=s["eval_size"],
                 extra_config=extra, checkpoint_every=args.checkpoint_every, resume=args.resume,
                 overwrite=args.overwrite)
    path = export_vits_generator(result.model, result.guide, speech, args.out, s["steps"],
                                 train=dict(seed=args.seed, batch_size=s["batch_size"],
                                            learning_rate=s["lr"]))
    last = result.metrics[-1] if result.metrics else {}
    summary = dict(steps=s["steps"], wall_s=round(result.wall_s, 2), svi_steps_per_s=last.get("it_per_s"),
                   utterances=corpus.train.n, frames=corpus.train.num_frames, vits_generator=str(path),
                   **{k: v for k, v in last.items() if k.endswith("_per_frame")})
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, prog="pyro-vits fit-speech"), prog="pyro-vits fit-speech"))
