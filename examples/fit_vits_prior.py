"""Fit VITS's prior flow by SVI to data from a known "teacher" VITS prior, and compare with the truth.

The steps of ``pyro-vits fit`` (:mod:`pyro_vits.apps.fit`), written out as a short script:

1. a frozen random teacher (VITS's ``ResidualCouplingBlock`` with non-zero couplings, an identity decoder,
   observation noise ``sigma_x``) generates padded utterances ``x`` ``(N, C, T)`` with text-encoder
   statistics ``m_p, logs_p`` and masks ``(N, 1, T)``;
2. a student ``VITSPriorModel`` (VITS's zero-initialised couplings, a 1x1 decoder) and VITS's
   ``PosteriorEncoder`` as the guide are fitted by SVI (``pyro_vits.train.fit``: ``ClippedAdam``,
   minibatches of utterances, a run folder with config, metrics and checkpoint);
3. on held-out utterances the student's ELBO, importance-sampled log-likelihood and KL (nats per valid
   frame) are compared with the teacher's exact log-likelihood;
4. the run folder is finished as ``pyro-vits fit`` finishes it: ``inference_data.nc`` + ``summary.{csv,md}``
   (``pyro_vits.infer.finish_run``) and ``figures/training_curves.png`` (``pyro_vits.plots``).

    python examples/fit_vits_prior.py --steps 400 --out runs/tutorial     # ~30 s on 2 CPU cores
    pyro-vits fit --help          # the full application: config files, --resume, --init-flow, --distributed
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

import pyro
import torch

from pyro_vits.apps import run_main
from pyro_vits.cli import positive_float, positive_int
from pyro_vits.infer import ELBOS, evaluate, finish_run
from pyro_vits.models import ObservationGuide, PosteriorEncoder, VITSPriorModel, make_teacher, sample_dataset
from pyro_vits.plots import write_run_figures
from pyro_vits.train import FitConfig, fit, geometric_lrd


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three steps; returns the held-out measures of student and teacher and the run folder."""
    torch.set_num_threads(1)  # the tensors are tiny: more threads mostly add overhead
    out = args.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}"
    sizes = dict(kernel_size=5, n_layers=2, n_flows=args.n_flows, sigma_x=0.1)

    # 1. the teacher and its data (seeded without touching the global random state)
    teacher = make_teacher(args.channels, args.hidden, seed=args.seed, **sizes)
    train = sample_dataset(teacher, args.n_train, args.frames, seed=args.seed + 1)
    heldout = sample_dataset(teacher, args.n_heldout, args.frames, seed=args.seed + 2)

    # 2. the student model p(z) p(x | z) and the amortised guide q(z | x), fitted by SVI
    pyro.set_rng_seed(args.seed)
    model = VITSPriorModel(args.channels, args.hidden, **sizes)
    guide = PosteriorEncoder(args.channels, args.channels, args.hidden, 5, n_layers=4)
    config = FitConfig(steps=args.steps, elbo=args.elbo, lr=args.lr, lrd=geometric_lrd(0.05, args.steps),
                       batch_size=args.batch_size, seed=args.seed, out_dir=out, overwrite=args.overwrite,
                       log_every=args.log_every, progress=args.progress)
    result = fit(model, guide, train, config, heldout=heldout, device=args.device)

    # 3. held-out: the student's bounds against the teacher's exact log-likelihood
    heldout = heldout.to(result.device)
    if result.out_dir is not None:  # a diverged run stops here: FloatingPointError, one line, exit 1
        finish_run(result.out_dir, model, guide, heldout, seed=args.seed)
    student = evaluate(model, guide, heldout, num_samples=64, seed=args.seed)
    truth = evaluate(teacher.to(result.device), ObservationGuide.for_teacher(teacher), heldout,
                     num_samples=256, seed=args.seed)
    print(f"held-out, nats/frame: {'ELBO':>9} {'IWAE log p(x)':>14} {'KL(q||p)':>9}")
    for name, r in (("student", student), ("teacher", truth)):
        print(f"{name:20s}  {r['elbo_per_frame']:9.3f} {r['loglik_iwae_per_frame']:14.3f} "
              f"{r['kl_per_frame']:9.3f}")
    print(f"log-likelihood gap (teacher - student): "
          f"{truth['loglik_iwae_per_frame'] - student['loglik_iwae_per_frame']:.3f} nats/frame")

    # 4. the figures of the run folder (the ELBO curves against the teacher's log-likelihood)
    if result.out_dir is not None:
        write_run_figures(result.out_dir, result.metrics, reference_loglik=truth["loglik_iwae_per_frame"])
        print(f"wrote {result.out_dir}")
    return dict(student=student, teacher=truth, out_dir=result.out_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=positive_int, default=400, help="SVI steps")
    parser.add_argument("--elbo", choices=ELBOS, default="trace", help="the ELBO (pyro_vits.infer.elbo.ELBOS)")
    parser.add_argument("--lr", type=positive_float, default=1e-2, help="initial learning rate (decays 20x)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="utterances per SVI step")
    parser.add_argument("--channels", type=int, default=8, help="latent channels C (even)")
    parser.add_argument("--hidden", type=positive_int, default=32, help="hidden channels of flow and encoder")
    parser.add_argument("--n-flows", type=positive_int, default=4, help="couplings in the flow")
    parser.add_argument("--frames", type=positive_int, default=32, help="max frames per utterance T")
    parser.add_argument("--n-train", type=positive_int, default=256, help="training utterances")
    parser.add_argument("--n-heldout", type=positive_int, default=32, help="held-out utterances")
    parser.add_argument("--log-every", type=positive_int, default=25, help="steps between logged records")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<i>")
    parser.add_argument("--seed", type=int, default=0, help="seed of teacher, data, student and SVI")
    parser.add_argument("--out", default=None,
                        help="run folder (default runs/<timestamp>, as pyro-vits fit); refused when not empty")
    parser.add_argument("--overwrite", action="store_true", help="replace the run files of a used --out")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bar")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(parse_args(argv)) and 0, prog="fit_vits_prior.py"))
