"""Train VITS's latent model on speech with Pyro: text encoder, alignment, flow prior, posterior encoder.

    make speech-corpus                                              # espeak-ng corpus in data/speech-corpus
    python examples/fit_vits_speech.py --corpus data/speech-corpus  # CPU preset: a few minutes, 2 cores
    python examples/fit_vits_speech.py --corpus data/speech-corpus --device cuda   # VITS's sizes

The five steps below are the whole recipe; ``python -m pyro_vits.apps.fit_speech`` is the same with every
option (sizes, ELBO, particles, affine couplings, resume).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pyro_vits.apps import run_main
from pyro_vits.cli import positive_int
from pyro_vits.data.speech_batches import SpeechConfig
from pyro_vits.data.speech_data import read_corpus
from pyro_vits.infer import evaluate
from pyro_vits.models import PRESETS, build_pair
from pyro_vits.train import FitConfig, fit
from pyro_vits.vits import export_vits_generator


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="LJSpeech-format folder (make speech-corpus)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: VITS's sizes)")
    parser.add_argument("--steps", type=positive_int, default=None, help="SVI steps (default: the preset's)")
    parser.add_argument("--max-utterances", type=positive_int, default=None, help="(default: the preset's)")
    parser.add_argument("--out", default="runs/speech-example", help="run folder (refused when not empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run files of a used --out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    preset = PRESETS["vits" if args.device.startswith("cuda") else "cpu"]
    steps = preset["steps"] if args.steps is None else args.steps

    # 1. The corpus as VITS reads it: 22,050 Hz wavs -> linear spectrograms, phonemes -> ids (+ blanks).
    speech = SpeechConfig(filter_length=preset["n_fft"], hop_length=preset["hop_length"],
                          win_length=preset["n_fft"])
    corpus = read_corpus(args.corpus, speech, max_frames=preset["max_frames"],
                         heldout_size=preset["heldout_size"],
                         max_utterances=args.max_utterances or preset["max_utterances"])
    print(f"{corpus.train.n} training utterances ({corpus.train.num_frames} frames), "
          f"{0 if corpus.heldout is None else corpus.heldout.n} held out, {corpus.n_speakers} speakers")

    # 2. Model p(z | text) p(x | z) and guide q(z | spectrogram): VITS's enc_p + flow, and enc_q.
    model, guide = build_pair(preset, speech, corpus.n_speakers, seed=args.seed)

    # 3. SVI with VITS's estimator (analytic entropy of q, one draw for the flow prior).
    config = FitConfig(steps=steps, elbo="vits", lr=preset["lr"], batch_size=preset["batch_size"],
                       seed=args.seed, out_dir=args.out, overwrite=args.overwrite, eval_samples=preset["eval_samples"],
                       log_every=max(1, steps // 6))
    result = fit(model, guide, corpus.train, config, heldout=corpus.heldout, device=args.device)
    print(f"{steps} steps in {result.wall_s:.1f} s")

    # 4. Held-out ELBO and KL (nats per frame) with 16 guide draws per utterance.
    if corpus.heldout is not None:
        heldout = evaluate(result.model, result.guide, corpus.heldout.to(result.device), num_samples=16)
        print(json.dumps({k: round(v, 4) for k, v in heldout.items() if k.endswith("_per_frame")}))

    # 5. The trained latent parts as a VITS generator checkpoint: <out>/vits/G_<steps>.pth + config.json.
    print(export_vits_generator(result.model, result.guide, speech, args.out, steps))
    return 0


if __name__ == "__main__":  # every user error: one line on stderr, exit code 2
    sys.exit(run_main(main, prog="fit_vits_speech.py"))
