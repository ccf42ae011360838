"""``pyro-vits audit``: measure a trained VITS generator's KL term on a speech corpus.

    pyro-vits audit G_100000.pth --config config.json \\
        --filelist filelists/ljs_audio_text_val_filelist.txt.cleaned \\
        --data-root /data/LJSpeech-1.1 --out audit/ljs

Writes ``report.json``, ``report.md``, ``figures/`` and ``audit.nc`` to ``--out`` (see docs/audit.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ._args import configure_logging, device_name, nonnegative_int, positive_int

__all__ = ["build_parser", "main"]

logger = logging.getLogger("pyro_vits")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Audit the KL term of a trained VITS generator on real speech: per-channel "
        "statistics, every KL estimator with its MCSE, and how often the batch KL loss is negative.",
    )
    parser.add_argument("checkpoint", help="VITS generator checkpoint (G_*.pth) or a state dict")
    parser.add_argument(
        "--config",
        default=None,
        help="the VITS config.json the model was trained with (required unless the file has no enc_q)",
    )
    parser.add_argument(
        "--filelist",
        required=True,
        help="VITS filelist (wav|text or wav|speaker|text, cleaned text) or an LJSpeech folder; for a file "
        "without enc_q (prior-only audit) a filelist (its text) or a plain text file, one sentence per line",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder the filelist's wav paths are relative to (default: the working directory, as in VITS)",
    )
    parser.add_argument("--out", required=True, help="output folder for the report")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="VITS's training batch size (default: the config's train.batch_size, else 16)",
    )
    parser.add_argument(
        "--max-utterances", type=positive_int, default=None, help="audit only the first N utterances"
    )
    parser.add_argument("--particles", type=int, default=8, help="draws of z per utterance (>= 2; default 8)")
    parser.add_argument(
        "--chunk-size",
        type=positive_int,
        default=8,
        help="utterances processed at once (memory; the results do not depend on it; default 8)",
    )
    parser.add_argument(
        "--frames-per-token",
        type=positive_int,
        default=1,
        help="prior-only audit (no enc_q): frames each token is expanded to, no alignment (default 1)",
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="cpu, cuda, cuda:<i> or auto (default cpu)"
    )
    parser.add_argument(
        "--resample",
        action="store_true",
        help="resample wavs at another rate to the config's (otherwise they are an error)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug output; tracebacks on errors")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    configure_logging(args.quiet, args.verbose)
    from .._io import check_writable

    check_writable(args.out, what="--out")  # before any work (audit() refuses a used --out before any too)
    from .._device import resolve_device
    from ..audit.measure import audit
    from ..data.speech_batches import SpeechConfig
    from ..vits import load_vits_generator, read_vits_config

    device = resolve_device(args.device)
    config = read_vits_config(args.config) if args.config is not None else None
    generator = load_vits_generator(args.checkpoint, config)
    if generator.enc_q is None:
        return _prior_only(args, generator, config, device)
    if config is None:
        raise ValueError("--config is required to audit a generator with enc_q")
    speech = SpeechConfig.from_vits_config(config, resample=args.resample)
    if config.get("data", {}).get("cleaned_text") is False:
        logger.warning(
            "%s: data.cleaned_text is false; the filelist text is mapped to symbols as it is "
            "(run VITS's preprocess.py to clean it first)",
            args.config,
        )
    batch_size = args.batch_size or int(config.get("train", {}).get("batch_size", 16))
    logger.info(
        "auditing %s (%s) on %s, batch size %d, %d draws per utterance",
        args.checkpoint,
        ", ".join(f"{k}={v}" for k, v in generator.config.items()),
        args.filelist,
        batch_size,
        args.particles,
    )
    report = audit(
        generator,
        args.filelist,
        batch_size,
        args.particles,
        args.seed,
        speech_config=speech,
        data_root=args.data_root,
        max_utterances=args.max_utterances,
        chunk_size=args.chunk_size,
        device=device,
        out=args.out,
        overwrite=args.overwrite,
        extra={
            "checkpoint": str(args.checkpoint),
            "config": str(args.config),
            "filelist": str(args.filelist),
        },
    )
    vits, negative = report["kl_per_frame"]["vits"], report["prob_negative"][str(batch_size)]
    for warning in report["warnings"]:
        logger.warning("%s", warning)
    print(
        f"{report['utterances']} utterances, {report['frames']} frames: VITS KL {vits['mean']:.4g} "
        f"± {vits['mcse']:.2g} nats/frame; sd of the batch loss {vits['sd_batch_total']:.3g} (draw noise "
        f"{vits['sd_batch_draw']:.3g}, batch composition {vits['sd_batch_composition']:.3g}); "
        f"P(batch KL < 0) at batch size {batch_size}: {_measured(negative)}, predicted "
        f"{negative['predicted']:.3g} (saddlepoint; normal approx. {negative['predicted_normal']:.3g}); "
        f"report in {args.out}/report.md"
    )
    return 0


def _measured(row: dict) -> str:
    """One ``prob_negative`` row's measurement, never a bare zero: the count, the independent batches, the
    bound."""
    if row["measured"] is None:
        return "not measured (batch larger than the corpus)"
    if row["negative"] == 0:
        return (f"none negative of {row['independent_batches']} independent batches "
                f"(95 % bound < {row['upper_95']:.2g})")
    return (f"measured {row['measured']:.3g} ± {row['measured_se']:.2g} ({row['independent_batches']} "
            "independent batches)")


def _prior_only(args: argparse.Namespace, generator, config, device) -> int:
    """No enc_q (e.g. a Piper voice): the prior-only audit of :mod:`pyro_vits.audit.prior_only`."""
    from ..audit.prior_only import prior_only_audit, read_sentences_or_filelist

    sentences = read_sentences_or_filelist(args.filelist)[: args.max_utterances]
    logger.info("%s has no enc_q: prior-only audit on %d sentences of %s, %d frame(s) per token",
                args.checkpoint, len(sentences), args.filelist, args.frames_per_token)
    report = prior_only_audit(
        generator, sentences, particles=args.particles, seed=args.seed, frames_per_token=args.frames_per_token,
        vits_config=config, device=device, out=args.out, overwrite=args.overwrite,
        extra={"checkpoint": str(args.checkpoint), "config": str(args.config), "filelist": str(args.filelist)},
    )
    ng, disp = report["prior"]["non_gaussianity_per_frame"], report["prior"]["flow_displacement_per_frame"]
    print(
        f"{report['sentences']} sentences, {report['frames']} frames (prior only, no enc_q): "
        f"KL(p_flow || N(m_p, sigma_p)) {ng['mean']:.4g} ± {ng['mcse']:.2g} nats/frame; flow displacement "
        f"{disp['mean']:.4g} (sd {disp['sd']:.3g}) per frame; report in {args.out}/report.md"
    )
    return 0


if __name__ == "__main__":
    from . import run_main

    sys.exit(run_main(lambda argv: main(argv, prog="pyro-vits audit"), prog="pyro-vits audit"))
