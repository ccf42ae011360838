"""``python -m pyro_vits.apps.speech_study``: the KL-loss variants trained on speech (:mod:`pyro_vits.speech_study`).

    python -m pyro_vits.apps.speech_study --corpus data/speech-corpus --out runs/speech-study --docs docs

Trains every variant (``vits``, ``clamp``, ``abs``, ``abs_elementwise``, ``vits_k4``) for each seed with the
CPU preset of :mod:`pyro_vits.apps.fit_speech` (options override it), then writes ``<out>/results.json`` and,
with ``--docs``, ``<docs>/speech_study.md`` (the table with 95 % t-intervals over seeds, and each variant's
difference from ``vits`` paired by seed). Each run's folder ``<out>/<variant>-s<seed>`` is a normal run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import run_main
from .fit_speech import PRESETS, SpeechCorpus, build_pair, read_corpus
from ..data.speech import SpeechConfig
from ..model import evaluate
from ..speech_study import (VARIANTS, negative_kl_fraction, paired_difference, reconstruction_error_db, summarise,
                            variant_elbo)
from ..train import fit

__all__ = ["build_parser", "main", "run_variant", "render"]

logger = logging.getLogger("pyro_vits")

KEYS = ("heldout_elbo_per_frame", "heldout_kl_per_frame", "heldout_recon_db", "prob_negative_kl", "s_per_step")
LABELS = {"heldout_elbo_per_frame": "held-out ELBO (nats/frame)", "heldout_kl_per_frame": "held-out KL (nats/frame)",
          "heldout_recon_db": "reconstruction error (dB RMS)", "prob_negative_kl": "P(logged KL < 0)",
          "s_per_step": "s / step"}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="corpus folder with train.txt/val.txt (make speech-corpus)")
    p.add_argument("--out", default="runs/speech-study", help="study folder (one run folder per variant/seed)")
    p.add_argument("--docs", default=None, help="also write <docs>/speech_study.md")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-utterances", type=int, default=200)
    p.add_argument("--eval-samples", type=int, default=16, help="guide draws per held-out utterance")
    p.add_argument("--negative-batches", type=int, default=64, help="minibatches drawn for P(logged KL < 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace the run folders")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run_variant(corpus: SpeechCorpus, variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant with one seed; its held-out measures and timing as a flat record."""
    settings = PRESETS["cpu"]
    model, guide = build_pair(settings, corpus.speech, corpus.n_speakers)
    elbo = variant_elbo(variant)
    start = time.perf_counter()
    result = fit(model, guide, corpus.train, steps=args.steps, elbo=elbo, lr=settings["lr"],
                 batch_size=args.batch_size, device=args.device, seed=seed,
                 out_dir=Path(args.out) / f"{variant}-s{seed}", overwrite=args.overwrite,
                 log_every=args.steps, progress=False, eval_samples=4, extra_config=dict(variant=variant))
    wall = time.perf_counter() - start
    heldout = corpus.heldout.to(result.device)
    measures = evaluate(result.model, result.guide, heldout, num_samples=args.eval_samples, seed=seed)
    negative = negative_kl_fraction(result.model, result.guide, corpus.train.to(result.device), args.batch_size,
                                    args.negative_batches, seed=seed)
    return dict(variant=variant, seed=seed, steps=args.steps, wall_s=wall, s_per_step=wall / args.steps,
                heldout_elbo_per_frame=measures["elbo_per_frame"], heldout_kl_per_frame=measures["kl_per_frame"],
                heldout_elbo_mcse_per_frame=measures["elbo_stderr_per_frame"],
                heldout_recon_db=reconstruction_error_db(result.model, result.guide, heldout),
                prob_negative_kl=negative["prob_negative"], logged_kl_per_frame=negative["kl_per_frame_mean"],
                logged_kl_sd_per_frame=negative["kl_per_frame_sd"],
                training_steps_kl_negative=getattr(elbo, "negative_steps", None))


def _cell(stat: Mapping[str, float]) -> str:
    return f"{stat['mean']:.4g} ± {stat['half_width']:.2g}"


def render(results: Mapping[str, Any]) -> str:
    """``docs/speech_study.md`` from ``results.json``'s content."""
    runs, setup = results["runs"], results["setup"]
    table = summarise(runs, KEYS)
    lines = [
        "# The KL-loss variants on speech", "",
        f"Generated by `{setup['command']}` ({setup['utc']}); numbers are means over {len(setup['seeds'])} seeds "
        "± the half-width of the 95 % Student-t interval over seeds.", "",
        f"Corpus: {setup['corpus']['train']} training / {setup['corpus']['heldout']} held-out utterances of "
        f"`{setup['corpus']['folder']}` ({setup['corpus']['description']}). Model: the CPU preset of "
        f"`pyro_vits.apps.fit_speech` ({setup['sizes']}), {setup['steps']} steps of {setup['batch_size']} "
        "utterances, the same seeds (initialisation, minibatches, noise) for every variant. The variants "
        "differ only in the KL term of the loss (see `pyro_vits.speech_study`).", "",
        "| variant | " + " | ".join(LABELS[k] for k in KEYS) + " |",
        "|---" * (len(KEYS) + 1) + "|",
    ]
    lines += [f"| {v} | " + " | ".join(_cell(table[v][k]) for k in KEYS) + " |" for v in table]
    lines += ["", "Difference from `vits`, paired by seed (95 % t-interval; * where it excludes 0):", "",
              "| variant | Δ held-out ELBO | Δ held-out KL | Δ reconstruction error (dB) |", "|---|---|---|---|"]
    for v in (v for v in table if v != "vits" and "vits" in table):
        cells = []
        for key in KEYS[:3]:
            d = paired_difference(runs, key, v)
            cells.append(_cell(d) + (" *" if abs(d["mean"]) > d["half_width"] else ""))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "Held-out ELBO and KL: 16 guide draws per utterance (`pyro_vits.model.evaluate`); "
              "reconstruction error: `dec(m_q)` against the log-magnitude spectrogram; P(logged KL < 0): "
              f"fraction of {setup['negative_batches']} training minibatches of {setup['batch_size']} utterances "
              "whose one-draw VITS KL (`-H(q) - log p(z)`, per frame) is negative at the end of training.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = PRESETS["cpu"]
    speech = SpeechConfig(filter_length=s["n_fft"], hop_length=s["hop_length"], win_length=s["n_fft"])
    corpus = read_corpus(args.corpus, speech, max_utterances=args.max_utterances, max_frames=s["max_frames"],
                         heldout_size=s["heldout_size"])
    if corpus.heldout is None or len(args.seeds) < 2:
        raise ValueError("the study needs a corpus with val.txt (held-out utterances) and at least 2 seeds")
    runs = []
    for seed in args.seeds:
        for variant in args.variants:
            runs.append(run_variant(corpus, variant, seed, args))
            logger.info("%s seed %d: %s", variant, seed, runs[-1])
    info = json.loads((Path(args.corpus) / "corpus.json").read_text()) if (Path(args.corpus) / "corpus.json").is_file() else {}
    description = (f"espeak-ng {info.get('synthesiser_version', '?')}, {len(info.get('voices', []))} voice(s), "
                   f"{info.get('hours', float('nan')):.2f} h in all" if info else "")
    setup = dict(command="python -m pyro_vits.apps.speech_study " + " ".join(argv if argv is not None else sys.argv[1:]),
                 utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seeds=args.seeds, steps=args.steps,
                 batch_size=args.batch_size, negative_batches=args.negative_batches,
                 sizes={k: s[k] for k in ("inter_channels", "hidden_channels", "n_layers", "guide_layers", "n_fft")},
                 corpus=dict(folder=str(args.corpus), train=corpus.train.n, heldout=corpus.heldout.n,
                             description=description))
    results = dict(setup=setup, runs=runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if args.docs:
        Path(args.docs).mkdir(parents=True, exist_ok=True)
        (Path(args.docs) / "speech_study.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="pyro-vits speech-study"))
