"""Fit VITS's prior flow by SVI to data from a known "teacher" VITS prior, and compare with the truth.

A frozen random teacher (``make_teacher``: VITS's ResidualCouplingBlock with non-zero coupling outputs, an
identity decoder, observation noise ``sigma_x``) generates utterances ``x`` with text-encoder statistics
``m_p, logs_p``. A student ``VITSPriorModel`` (same architecture, VITS's zero-initialised couplings, a 1x1
decoder) and a VITS ``PosteriorEncoder`` guide are fitted with ``Trace_ELBO``. On held-out utterances the
student's ELBO, importance-sampled log-likelihood and KL are compared with the teacher's exact
log-likelihood (importance sampling with the proposal ``N(x, sigma_x^2)``, exact for an identity decoder).

    python examples/fit_vits_prior.py                      # ~30 s on 2 CPU cores
    python examples/fit_vits_prior.py --steps 3000 --device cuda --affine

Writes ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``figures/training_curves.png`` and (ArviZ)
``inference_data.nc`` + ``summary.{csv,md}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_vits.diagnostics import write_run_inference_data
from pyro_vits.guide import ObservationGuide, PosteriorEncoder
from pyro_vits.model import VITSPriorModel, evaluate, make_teacher, sample_dataset
from pyro_vits.plots import plot_training_curves
from pyro_vits.train import fit


def format_table(student: dict[str, float], teacher: dict[str, float], args: argparse.Namespace) -> str:
    """The held-out comparison, nats per valid frame."""
    rows = [
        (f"student (PosteriorEncoder guide, K={args.eval_samples})", student),
        (f"teacher (proposal N(x, sigma_x^2), K={args.teacher_samples})", teacher),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"held-out: {student['num_utterances']} utterances, {student['num_frames']} frames; nats/frame",
        f"{'':{width}}  {'ELBO':>9}  {'IWAE log p(x)':>13}  {'KL(q||p)':>9}",
    ]
    for name, r in rows:
        lines.append(f"{name:{width}}  {r['elbo_per_frame']:9.3f}  {r['loglik_iwae_per_frame']:13.3f}  "
                     f"{r['kl_per_frame']:9.3f}")
    gap = teacher["loglik_iwae_per_frame"] - student["loglik_iwae_per_frame"]
    lines.append(f"log-likelihood gap (teacher - student): {gap:.3f} nats/frame "
                 "(0 = the student's marginal matches the truth)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment; returns the held-out measures, the run folder and the wall time."""
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)  # the student's initial weights
    out = Path(args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    sizes = dict(kernel_size=args.kernel_size, n_layers=args.n_layers, n_flows=args.n_flows,
                 n_speakers=args.speakers, gin_channels=args.gin_channels if args.speakers else 0,
                 mean_only=args.mean_only, sigma_x=args.sigma_x)
    teacher = make_teacher(args.channels, args.hidden, seed=args.seed, **sizes)
    train = sample_dataset(teacher, args.n_train, args.frames, seed=args.seed + 1)
    heldout = sample_dataset(teacher, args.n_heldout, args.frames, seed=args.seed + 2)

    model = VITSPriorModel(args.channels, args.hidden, **sizes)
    guide = PosteriorEncoder(args.channels, args.channels, args.hidden, args.kernel_size,
                             n_layers=args.enc_layers, n_speakers=sizes["n_speakers"],
                             gin_channels=sizes["gin_channels"])
    result = fit(
        model, guide, train, steps=args.steps, particles=args.particles, vectorize=args.vectorize, lr=args.lr,
        lrd=args.final_lr_ratio ** (1 / args.steps), batch_size=args.batch_size, device=args.device,
        seed=args.seed, out_dir=out, log_every=args.log_every, progress=args.progress, heldout=heldout,
        extra_config=vars(args),
    )
    heldout = heldout.to(result.device)
    student = evaluate(model, guide, heldout, args.eval_samples, seed=args.seed)
    teacher_truth = evaluate(teacher.to(result.device), ObservationGuide.for_teacher(teacher), heldout,
                             args.teacher_samples, seed=args.seed)
    (out / "figures").mkdir(exist_ok=True)
    plot_training_curves(result.metrics, out / "figures" / "training_curves.png",
                         reference_loglik=teacher_truth["loglik_iwae_per_frame"])
    write_run_inference_data(out, model, guide, heldout, seed=args.seed)
    print(format_table(student, teacher_truth, args))
    wall_s = time.perf_counter() - start
    print(f"wrote {out} ({wall_s:.1f} s, device {result.device})")
    return dict(student=student, teacher=teacher_truth, out_dir=out, wall_s=wall_s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--steps", type=int, default=400, help="SVI steps")
    add("--particles", type=int, default=1, help="ELBO particles per step")
    add("--vectorize", action=argparse.BooleanOptionalAction, default=True, help="vectorise ELBO particles")
    add("--lr", type=float, default=1e-2, help="initial ClippedAdam learning rate")
    add("--final-lr-ratio", type=float, default=0.05, help="final / initial learning rate (geometric decay)")
    add("--batch-size", type=int, default=16, help="utterances per SVI step")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:<i>")
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1,
        help="torch intra-op CPU threads (these tensors are tiny: more threads mostly add overhead)")
    add("--out", default=None, help="run folder (default runs/<timestamp>)")
    add("--channels", type=int, default=8, help="latent channels C (even)")
    add("--hidden", type=int, default=32, help="hidden channels of the flow and the encoder")
    add("--frames", type=int, default=32, help="max frames per utterance T")
    add("--kernel-size", type=int, default=5)
    add("--n-layers", type=int, default=2, help="WN layers per coupling")
    add("--n-flows", type=int, default=4, help="couplings in the flow")
    add("--enc-layers", type=int, default=4, help="WN layers of the posterior encoder")
    add("--mean-only", action=argparse.BooleanOptionalAction, default=True,
        help="mean-only (VITS) or affine couplings, teacher and student alike")
    add("--affine", dest="mean_only", action="store_false", help="same as --no-mean-only")
    add("--speakers", type=int, default=0, help="number of speakers (0: single speaker)")
    add("--gin-channels", type=int, default=8, help="speaker embedding size when --speakers > 0")
    add("--sigma-x", type=float, default=0.1, help="observation noise std")
    add("--n-train", type=int, default=256, help="training utterances")
    add("--n-heldout", type=int, default=32, help="held-out utterances")
    add("--log-every", type=int, default=25, help="steps between logged records")
    add("--eval-samples", type=int, default=64, help="guide particles for the final held-out measures")
    add("--teacher-samples", type=int, default=256, help="importance samples for the teacher's log p(x)")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
