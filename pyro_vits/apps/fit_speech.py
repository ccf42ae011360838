"""``pyro-vits fit-speech`` / ``python -m pyro_vits.apps.fit_speech``: train VITS's latent model on a corpus.

    python -m pyro_vits.apps.fit_speech --corpus data/speech-corpus --out runs/speech        # CPU preset
    python -m pyro_vits.apps.fit_speech --corpus data/speech-corpus --device cuda --out runs/speech-vits
    python -m pyro_vits.apps.fit_speech --corpus data/speech-corpus --elbo trace --particles 4 --affine
    python -m pyro_vits.apps.fit_speech --corpus data/speech-corpus --likelihood laplace-mel  # VITS's balance

The corpus is an LJSpeech-format folder (``metadata.csv`` + ``wavs/``, normalized text in VITS's symbols);
when it holds VITS filelists ``train.txt`` / ``val.txt`` (as ``make speech-corpus`` writes) those give the
training and held-out utterances and the speaker ids. Model: :class:`~pyro_vits.models.speech.SpeechModel`
with VITS's posterior encoder as guide, trained by :func:`~pyro_vits.train.fit` (run folder, checkpoints,
``--resume``). At the end the latent parts are exported as a VITS generator, ``<out>/vits/G_<steps>.pth`` and
``<out>/vits/config.json`` (:func:`~pyro_vits.vits.export.export_vits_generator`). Presets: ``cpu`` (small,
minutes on 2 cores) and ``vits`` (VITS's sizes: inter/hidden 192, 6 text-encoder layers, 16 posterior-encoder
layers, 1024-point STFT), the default when ``--device`` is CUDA; any size option overrides its preset."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._io import check_writable
from .._rundir import check_out_dir
from ..data.speech_batches import SpeechConfig
from ..data.speech_data import read_corpus
from ..infer.elbo import ELBOS
from ..models.speech import LIKELIHOODS, PRESETS, SIZE_KEYS, build_pair
from ..train import FitConfig, RunInterrupted, fit
from ..vits.export import export_vits_generator
from . import run_main

logger = logging.getLogger("pyro_vits")


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
    p.add_argument("--likelihood", choices=tuple(LIKELIHOODS), default="gaussian-linear",
                   help="p(x | z) (laplace-mel: VITS's loss balance, 45 x mel L1 against the KL)")
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
    for key in ("steps", "checkpoint_every", "log_every", "particles"):
        value = s.get(key, getattr(args, key, None))
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive int, got {value}")
    out = Path(args.out)
    if not args.resume:  # before any work: a used or unwritable --out fails now
        check_out_dir(out, args.overwrite)
    check_writable(out, what="--out")
    speech = SpeechConfig(filter_length=s["n_fft"], hop_length=s["hop_length"], win_length=s["n_fft"],
                          add_blank=not args.no_add_blank)
    corpus = read_corpus(args.corpus, speech, max_utterances=s["max_utterances"], max_frames=s["max_frames"],
                         heldout_size=s["heldout_size"], speakers=not args.single_speaker)
    model, guide = build_pair(s, speech, corpus.n_speakers, mean_only=not args.affine, seed=args.seed,
                              likelihood=args.likelihood)
    extra = dict(corpus=str(args.corpus), settings=s, speech=dict(
        sampling_rate=speech.sampling_rate, n_fft=speech.filter_length, hop_length=speech.hop_length,
        add_blank=speech.add_blank))
    config = FitConfig(steps=s["steps"], elbo=args.elbo, particles=args.particles, lr=s["lr"],
                       batch_size=s["batch_size"], seed=args.seed, out_dir=args.out,
                       log_every=args.log_every or max(1, s["steps"] // 5), progress=not args.quiet,
                       eval_samples=s["eval_samples"], eval_size=s["eval_size"],
                       checkpoint_every=args.checkpoint_every, resume=args.resume, overwrite=args.overwrite)
    try:
        result = fit(model, guide, corpus.train, config, heldout=corpus.heldout, device=args.device,
                     extra_config=extra)
    except RunInterrupted as err:  # this command resumes with --resume --out RUN_DIR
        err.args = (str(err).replace(f"--resume {out}", f"--resume --out {out}"),)
        raise
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
