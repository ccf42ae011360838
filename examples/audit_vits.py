"""Audit the KL term of your own trained VITS model (a tutorial; ``pyro-vits audit`` writes the files).

    python examples/audit_vits.py logs/ljs_base/G_100000.pth configs/ljs_base.json \\
        filelists/ljs_audio_text_val_filelist.txt.cleaned --data-root /data/LJSpeech-1.1 --max-utterances 100

Steps: load the generator's latent path (``enc_p``, ``enc_q``, ``flow``) from the checkpoint; read the audio
settings from the config; look at one batch the way VITS's training step does (the KL it would log); then
run the whole audit and print the per-estimator table (nats per frame).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pyro_vits.apps import run_main
from pyro_vits.audit import audit, draw_latents
from pyro_vits.cli import positive_int
from pyro_vits.data.filelists import open_corpus
from pyro_vits.data.speech_batches import SpeechConfig, speech_batches
from pyro_vits.kl import vits_kl
from pyro_vits.vits import load_vits_generator, read_vits_config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("config")
    parser.add_argument("filelist", help="VITS filelist (cleaned text) or LJSpeech folder")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--particles", type=positive_int, default=8)
    parser.add_argument("--max-utterances", type=positive_int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    config = read_vits_config(args.config)
    generator = load_vits_generator(args.checkpoint, config)  # checks the config against the weights
    speech = SpeechConfig.from_vits_config(config)

    # One batch, one draw of z: the KL value a VITS training step logs for it (with its own alignment).
    batch = next(speech_batches(open_corpus(args.filelist, args.data_root), speech, args.batch_size))
    latents = draw_latents(generator, batch, particles=1, seed=args.seed)
    logged = vits_kl(latents.z_p[0], latents.logs_q, latents.m_p[0], latents.logs_p[0], latents.mask)
    print(f"one training step's KL on the first batch: {float(logged):.4f} nats/frame")

    # The audit: every estimator, K draws per utterance, MCSE, P(batch KL < 0).
    report = audit(
        generator,
        args.filelist,
        args.batch_size,
        args.particles,
        args.seed,
        speech_config=speech,
        data_root=args.data_root,
        max_utterances=args.max_utterances,
    )
    print(f"{report['utterances']} utterances, {report['frames']} frames")
    print(f"{'estimator':>22} {'mean':>10} {'MCSE':>8} {'sd/utt':>8}  batch sd: {'draw':>8} "
          f"{'composition':>11} {'total':>8}")
    for name, row in report["kl_per_frame"].items():
        print(f"{name:>22} {row['mean']:10.4f} {row['mcse']:8.2g} {row['sd']:8.3g}  {'':>10}"
              f"{row['sd_batch_draw']:8.3g} {row['sd_batch_composition']:11.3g} {row['sd_batch_total']:8.3g}")
    for size, row in report["prob_negative"].items():
        if row["measured"] is None:
            measured = "not measured (batch larger than the corpus)"
        else:
            bound = "" if row["upper_95"] is None else f", 95 % bound < {row['upper_95']:.2g}"
            measured = (f"{row['negative']} negative of {row['resampled']} resampled batches, "
                        f"{row['independent_batches']} independent: {row['measured']:.3g}{bound}")
        print(f"P(batch KL < 0), {size:>3} utterances: {measured}; saddlepoint {row['predicted']:.3g}, "
              f"normal approx. {row['predicted_normal']:.3g}")
    for warning in report["warnings"]:
        print("warning:", warning)
    print(f"z_p channels contributing < {report['channels']['collapse_threshold']} nats/frame "
          f"(not per-channel KLs): {report['collapsed_fraction']:.3f}")
    return report


if __name__ == "__main__":  # every user error: one line on stderr, exit code 2
    sys.exit(run_main(lambda argv: main(parse_args(argv)) and 0, prog="audit_vits.py"))
