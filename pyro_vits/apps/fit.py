"""``pyro-vits fit``: fit VITS's prior flow by SVI to a known "teacher" prior's data; compare with the truth.

A frozen random teacher (``make_teacher``: VITS's ResidualCouplingBlock with non-zero coupling outputs, an
identity decoder, observation noise ``sigma_x``) generates utterances ``x`` with text-encoder statistics
``m_p, logs_p``. A student ``VITSPriorModel`` (same architecture, VITS's zero-initialised couplings, a 1x1
decoder) and a VITS ``PosteriorEncoder`` guide are fitted with ``Trace_ELBO``. On held-out utterances the
student's ELBO, importance-sampled log-likelihood and KL are compared with the teacher's exact
log-likelihood (importance sampling with the proposal ``N(x, sigma_x^2)``, exact for an identity decoder).

    pyro-vits fit                                          # ~30 s on 2 CPU cores
    pyro-vits fit --steps 3000 --device cuda --affine
    pyro-vits fit --help                                   # every option with its default
    torchrun --nproc_per_node 2 -m pyro_vits.cli fit --distributed   # data-parallel, 2 processes

Writes ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``figures/training_curves.png`` and (ArviZ)
``inference_data.nc`` + ``summary.{csv,md}`` to ``--out`` (refused when it is not empty, unless
``--overwrite``; ``--resume RUN_DIR`` continues a stopped run). ``--init-flow`` starts the student's flow (and
``emb_g``) from a real VITS checkpoint, sizing teacher, data and student like it. ``--distributed`` (under
``torchrun``) splits every minibatch over the processes (``pyro_vits.infer.distributed``); rank 0 alone writes and
prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import pyro
import torch

from .._device import resolve_device
from .._io import check_writable
from .._rundir import check_out_dir
from ..flows import ResidualCouplingBlock
from ..infer.diagnostics import finish_run
from ..infer.distributed import DistributedContext, distributed_context
from ..infer.elbo import ELBOS
from ..infer.evaluate import evaluate
from ..models.guides import ObservationGuide, PosteriorEncoder
from ..models.prior_model import VITSPriorModel
from ..models.teacher import make_teacher, sample_dataset
from ..plots import write_run_figures
from ..train import FitConfig, fit, geometric_lrd
from ..train.config import NAN_POLICIES
from ..vits import VITSFlowCheckpoint, read_vits_checkpoint
from . import run_main
from ._args import (
    configure_logging,
    device_name,
    even_positive_int,
    nonnegative_int,
    parse_with_config,
    positive_float,
    positive_int,
    unit_interval,
)

logger = logging.getLogger("pyro_vits.apps.fit")


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


def adopt_flow_sizes(args: argparse.Namespace, found: VITSFlowCheckpoint) -> None:
    """Size teacher, data and student like the checkpoint's flow (``--init-flow``); speakers from
    ``--speakers`` or the checkpoint's ``emb_g``. Only VITS / coqui residual flows: the student is VITS's
    ``ResidualCouplingBlock``."""
    flow = found.flow
    if type(flow) is not ResidualCouplingBlock:
        kind = flow.config.get("transformer_flow_type", "Bert-VITS2 transformer")
        raise ValueError(f"{args.init_flow} holds a {kind} flow ({type(flow).__name__}); --init-flow starts "
                         "a VITS ResidualCouplingBlock student; load it in Python with "
                         "pyro_vits.vits.read_vits_checkpoint")
    c = flow.config
    args.channels, args.hidden, args.kernel_size = c["channels"], c["hidden_channels"], c["kernel_size"]
    args.n_layers, args.n_flows, args.mean_only = c["n_layers"], c["n_flows"], c["mean_only"]
    args.flow_dilation = c["dilation_rate"]
    args.speakers = (args.speakers or found.n_speakers) if c["gin_channels"] else 0
    if c["gin_channels"] and not args.speakers:
        raise ValueError(f"the flow in {args.init_flow} is speaker-conditioned "
                         f"(gin_channels={c['gin_channels']}) and the checkpoint has no emb_g: "
                         "pass --speakers N")
    args.gin_channels = c["gin_channels"] or args.gin_channels
    logger.info("--init-flow %s: channels %d, hidden %d, kernel %d, dilation %d, %d WN layers, %d couplings "
                "(%s), %d speakers", args.init_flow, args.channels, args.hidden, args.kernel_size,
                args.flow_dilation, args.n_layers, args.n_flows, "mean-only" if args.mean_only else "affine",
                args.speakers)


def import_init_flow(model: VITSPriorModel, found: VITSFlowCheckpoint) -> None:
    """Copy the checkpoint's flow into the student, and its ``emb_g`` when the sizes match (logged)."""
    model.flow.load_state_dict(found.flow.state_dict())
    emb = getattr(model, "emb_g", None)
    if emb is None:
        return
    if found.emb_g is not None and emb.weight.shape == found.emb_g.shape:
        with torch.no_grad():
            emb.weight.copy_(found.emb_g)
        logger.info("--init-flow: imported emb_g (%d speakers x %d channels)", *found.emb_g.shape)
    else:
        have = "no emb_g" if found.emb_g is None else f"emb_g of shape {tuple(found.emb_g.shape)}"
        logger.info("--init-flow: the checkpoint has %s; the student's speaker embedding %s starts random",
                    have, tuple(emb.weight.shape))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment of the parsed options ``args``; returns the held-out measures, the run folder and
    the wall time. With ``--distributed`` every process trains its share; ranks other than 0 return
    ``student``/``teacher`` None and ``out_dir`` None."""
    device = resolve_device(args.device)  # before any work: a missing CUDA fails now
    with distributed_context(args.device) if args.distributed else nullcontext() as ctx:
        if ctx is not None and not ctx.is_main:
            warnings.simplefilter("ignore")  # rank 0 reports the same warnings
        return _run(args, device if ctx is None else ctx.device, ctx)


def _run(args: argparse.Namespace, device: torch.device, ctx: DistributedContext | None) -> dict[str, Any]:
    """:func:`run` on ``device``, in the process group ``ctx`` (or alone)."""
    start = time.perf_counter()
    if args.init_flow and args.resume:
        raise ValueError("--init-flow starts a new run and --resume continues one (its flow is in the "
                         "checkpoint)")
    out = Path(args.resume or args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if ctx is not None:
        out = ctx.broadcast_object(out)  # rank 0's (its default is a timestamp)
    if ctx is None or ctx.is_main:  # before any work: a used or unwritable --out fails now
        if not args.resume:
            check_out_dir(out, args.overwrite)
        check_writable(out, what="--out")
    found = read_vits_checkpoint(args.init_flow, args.flow_dilation) if args.init_flow else None
    if found is not None:
        adopt_flow_sizes(args, found)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)  # the student's initial weights
    sizes = dict(kernel_size=args.kernel_size, dilation_rate=args.flow_dilation or 1, n_layers=args.n_layers,
                 n_flows=args.n_flows,
                 n_speakers=args.speakers, gin_channels=args.gin_channels if args.speakers else 0,
                 mean_only=args.mean_only, sigma_x=args.sigma_x)
    teacher = make_teacher(args.channels, args.hidden, seed=args.seed, **sizes)
    train = sample_dataset(teacher, args.n_train, args.frames, seed=args.seed + 1)
    heldout = sample_dataset(teacher, args.n_heldout, args.frames, seed=args.seed + 2)

    model = VITSPriorModel(args.channels, args.hidden, **sizes)
    if found is not None:
        import_init_flow(model, found)
    guide = PosteriorEncoder(args.channels, args.channels, args.hidden, args.kernel_size,
                             n_layers=args.enc_layers, n_speakers=sizes["n_speakers"],
                             gin_channels=sizes["gin_channels"])
    result = fit(model, guide, train, fit_config(args, out), heldout=heldout, distributed=ctx, device=device,
                 extra_config=vars(args))
    if ctx is not None and not ctx.is_main:
        return dict(student=None, teacher=None, out_dir=None, wall_s=time.perf_counter() - start)
    heldout = heldout.to(result.device)
    finish_run(out, model, guide, heldout, seed=args.seed)  # a diverged run: FloatingPointError, exit 1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)
        student = evaluate(model, guide, heldout, args.eval_samples, seed=args.seed, eval_chunk=args.eval_chunk)
        teacher_truth = evaluate(teacher.to(result.device), ObservationGuide.for_teacher(teacher), heldout,
                                 args.teacher_samples, seed=args.seed, eval_chunk=args.eval_chunk)
    write_run_figures(out, result.metrics, reference_loglik=teacher_truth["loglik_iwae_per_frame"])
    print(format_table(student, teacher_truth, args))
    wall_s = time.perf_counter() - start
    print(f"wrote {out} ({wall_s:.1f} s, device {result.device})")
    return dict(student=student, teacher=teacher_truth, out_dir=out, wall_s=wall_s)


def fit_config(args: argparse.Namespace, out: Path) -> FitConfig:
    """The training settings of the options ``args`` with run folder ``out`` (the final held-out measures'
    ``--eval-samples`` are not :func:`~pyro_vits.train.fit`'s logged-record ``eval_samples``)."""
    return FitConfig(steps=args.steps, elbo=args.elbo, particles=args.particles, vectorize=args.vectorize,
                     kl_particles=args.kl_particles, lr=args.lr, lrd=geometric_lrd(args.final_lr_ratio, args.steps),
                     batch_size=args.batch_size, seed=args.seed, log_every=args.log_every,
                     eval_chunk=args.eval_chunk,
                     checkpoint_every=args.checkpoint_every, nan_policy=args.nan_policy, out_dir=out,
                     resume=bool(args.resume), overwrite=args.overwrite,
                     progress=args.progress and not args.quiet)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The options of ``pyro-vits fit``; ``--help`` shows each default."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--steps", type=positive_int, default=400, help="SVI steps")
    add("--particles", type=positive_int, default=1, help="ELBO particles per step (K)")
    add("--vectorize", action=argparse.BooleanOptionalAction, default=True, help="vectorise ELBO particles")
    add("--kl-particles", type=positive_int, default=1,
        help="draws averaged in the KL term of each particle, through the prior flow only (not iwae_dreg)")
    add("--elbo", choices=ELBOS, default="trace",
        help="ELBO: trace (Trace_ELBO), vits (analytic entropy, VITS's KL), stl (sticking the landing), "
             "iwae_dreg (importance-weighted, DReG gradients)")
    add("--lr", type=positive_float, default=1e-2, help="initial ClippedAdam learning rate")
    add("--final-lr-ratio", type=unit_interval, default=0.05,
        help="final / initial learning rate (geometric decay)")
    add("--batch-size", type=positive_int, default=16, help="utterances per SVI step")
    add("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:<i>")
    add("--seed", type=int, default=0, help="seed of the teacher, the data, the student and SVI")
    add("--threads", type=positive_int, default=1,
        help="torch intra-op CPU threads (these tensors are tiny: more threads mostly add overhead)")
    add("--out", default=None, help="run folder (default runs/<timestamp>); refused when not empty")
    add("--overwrite", action="store_true", help="replace the run files of a non-empty --out")
    add("--resume", default=None, metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint.pt; its saved options are the defaults "
             "(explicit flags win, e.g. a larger --steps)")
    add("--checkpoint-every", type=positive_int, default=None, metavar="N",
        help="steps between atomic checkpoints (None: only at the end)")
    add("--nan-policy", choices=NAN_POLICIES, default="stop",
        help="on a NaN/Inf loss or gradient: stop (naming step, parameters and sites; the last checkpoint "
             "stays) or skip that step's update (counted in metrics as skipped_steps)")
    add("--init-flow", default=None, metavar="PATH",
        help="start the student's prior flow (and speaker embedding emb_g, when sizes match) from a VITS "
             "generator checkpoint (jaywalnut310 or coqui-TTS layout, weight norm kept or removed, fp32/16); "
             "channels, hidden, kernel, dilation, layers, couplings and speakers then follow it")
    add("--flow-dilation", type=positive_int, default=None, metavar="N",
        help="WN dilation rate of the teacher's and student's flows; with --init-flow the rate the "
             "checkpoint was trained with (weights do not store it). Default: the checkpoint's config "
             "(dilation_rate_flow), else 1 (VITS's value)")
    add("--config", default=None, metavar="PATH",
        help="TOML or JSON file of option = value (names as the long options, - or _); its values are "
             "defaults, explicit flags win")
    add("--channels", type=even_positive_int, default=8, help="latent channels C (even)")
    add("--hidden", type=positive_int, default=32, help="hidden channels of the flow and the encoder")
    add("--frames", type=positive_int, default=32, help="max frames per utterance T")
    add("--kernel-size", type=positive_int, default=5, help="WN kernel size (odd)")
    add("--n-layers", type=positive_int, default=2, help="WN layers per coupling")
    add("--n-flows", type=positive_int, default=4, help="couplings in the flow")
    add("--enc-layers", type=positive_int, default=4, help="WN layers of the posterior encoder")
    add("--mean-only", action=argparse.BooleanOptionalAction, default=True,
        help="mean-only (VITS) or affine couplings, teacher and student alike")
    add("--affine", dest="mean_only", action="store_false", help="same as --no-mean-only")
    add("--speakers", type=nonnegative_int, default=0, help="number of speakers (0: single speaker)")
    add("--gin-channels", type=positive_int, default=8, help="speaker embedding size when --speakers > 0")
    add("--sigma-x", type=positive_float, default=0.1, help="observation noise std")
    add("--n-train", type=positive_int, default=256, help="training utterances")
    add("--n-heldout", type=positive_int, default=32, help="held-out utterances")
    add("--log-every", type=positive_int, default=25, help="steps between logged records")
    add("--eval-samples", type=positive_int, default=64,
        help="guide particles for the final held-out measures")
    add("--teacher-samples", type=positive_int, default=256,
        help="importance samples for the teacher's log p(x)")
    add("--eval-chunk", type=positive_int, default=None,
        help="most (sample, utterance) pairs per vectorised evaluation call (default: sized from C x T)")
    add("--distributed", action=argparse.BooleanOptionalAction, default=False,
        help="data-parallel SVI over the processes torchrun starts (torchrun --nproc_per_node N ...; gloo on "
             "CPU, nccl on CUDA, one process per GPU): --batch-size is the combined minibatch, split over "
             "the processes; rank 0 alone writes the run folder and prints")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    add("-q", "--quiet", action="store_true", help="only warnings and errors on stderr; no progress bar")
    add("-v", "--verbose", action="store_true", help="debug messages, e.g. every logged record")
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parse ``argv`` with :func:`build_parser`, layering ``--config`` and ``--resume`` defaults."""
    return parse_with_config(build_parser(prog), argv)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``pyro-vits fit ARGV``: parse, configure logging, :func:`run`; raises user errors (see
    :func:`pyro_vits.apps.run_main`)."""
    args = parse_args(argv, prog)
    configure_logging(args.quiet, args.verbose)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="pyro-vits fit"))
