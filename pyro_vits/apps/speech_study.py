"""``python -m pyro_vits.apps.speech_study``: the KL-loss variants trained on speech.

    python -m pyro_vits.apps.speech_study --corpus data/speech-corpus --out runs/speech-study --docs docs

Trains every variant (``vits``, ``clamp``, ``abs``, ``abs_elementwise``, ``vits_k4``) for each seed with the
CPU preset of :mod:`pyro_vits.apps.fit_speech` (options override it), then writes ``<out>/results.json`` and,
with ``--docs``, ``<docs>/speech_study.md`` (the table with 95 % t-intervals over seeds, and each variant's
difference from ``vits`` paired by seed); ``<out>/<variant>-s<seed>`` are the runs' folders. The variants
and measures are :mod:`pyro_vits.speech_study`'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from . import run_main
from .fit_speech import PRESETS, SpeechCorpus, build_pair, read_corpus
from ..data.speech import SpeechConfig
from ..model import evaluate
from ..speech_study import (VARIANTS, negative_kl_fraction, paired_difference, reconstruction_error_db,
                            summarise, variant_elbo)
from ..train.rundir import atomic_write
from ..train import fit

__all__ = ["build_parser", "main", "run_variant", "render"]

logger = logging.getLogger("pyro_vits")

LABELS = {"heldout_elbo_per_frame": "held-out ELBO (nats/frame)",
          "heldout_kl_per_frame": "held-out KL (nats/frame)",
          "heldout_recon_db": "reconstruction error (dB RMS)",
          "prob_negative_kl": "P(logged KL < 0)",
          "s_per_step": "s / step"}
KEYS = tuple(LABELS)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="folder with train.txt/val.txt (make speech-corpus)")
    p.add_argument("--out", default="runs/speech-study", help="study folder (a run folder per variant/seed)")
    p.add_argument("--docs", default=None, help="also write <docs>/speech_study.md")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-utterances", type=int, default=200)
    p.add_argument("--eval-samples", type=int, default=16, help="guide draws per held-out utterance")
    p.add_argument("--negative-batches", type=int, default=64, help="minibatches drawn for P(logged KL < 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (processes; each reads the corpus)")
    p.add_argument("--overwrite", action="store_true", help="replace the run folders")
    p.add_argument("--render-only", action="store_true",
                   help="train nothing: render <out>/results.json into --docs (and print it)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run_variant(corpus: SpeechCorpus, variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant with one seed; its held-out measures and timing as a flat record."""
    settings = PRESETS["cpu"]
    model, guide = build_pair(settings, corpus.speech, corpus.n_speakers, seed=seed)
    elbo = variant_elbo(variant)
    start = time.perf_counter()
    result = fit(model, guide, corpus.train, steps=args.steps, elbo=elbo, lr=settings["lr"],
                 batch_size=args.batch_size, device=args.device, seed=seed,
                 out_dir=Path(args.out) / f"{variant}-s{seed}", overwrite=args.overwrite,
                 log_every=args.steps, progress=False, eval_samples=4, extra_config=dict(variant=variant))
    wall = time.perf_counter() - start
    heldout = corpus.heldout.to(result.device)
    measures = evaluate(result.model, result.guide, heldout, num_samples=args.eval_samples, seed=seed)
    negative = negative_kl_fraction(result.model, result.guide, corpus.train.to(result.device),
                                    args.batch_size, args.negative_batches, seed=seed)
    return dict(variant=variant, seed=seed, steps=args.steps, wall_s=wall, s_per_step=wall / args.steps,
                heldout_elbo_per_frame=measures["elbo_per_frame"],
                heldout_kl_per_frame=measures["kl_per_frame"],
                heldout_elbo_mcse_per_frame=measures["elbo_stderr_per_frame"],
                heldout_recon_db=reconstruction_error_db(result.model, result.guide, heldout),
                prob_negative_kl=negative["prob_negative"], logged_kl_per_frame=negative["kl_per_frame_mean"],
                logged_kl_sd_per_frame=negative["kl_per_frame_sd"],
                training_steps_kl_negative=getattr(elbo, "negative_steps", None))


def _cell(stat: Mapping[str, float]) -> str:
    return f"{stat['mean']:.4g} ± {stat['half_width']:.2g}"


def _header(setup: Mapping[str, Any]) -> list[str]:
    corpus = setup["corpus"]
    return [
        "# The KL-loss variants on speech", "",
        f"Generated by `{setup['command']}` ({setup['utc']}); numbers are means over "
        f"{len(setup['seeds'])} seeds ± the half-width of the 95 % Student-t interval over seeds.", "",
        f"Corpus: {corpus['train']} training / {corpus['heldout']} held-out utterances of "
        f"`{corpus['folder']}` ({corpus['description']}). Model: the CPU preset of "
        f"`pyro_vits.apps.fit_speech` ({setup['sizes']}), {setup['steps']} steps of {setup['batch_size']} "
        "utterances, the same seed (initialisation, minibatches, noise) for every variant. The variants "
        "differ only in the KL term of the loss (see `pyro_vits.speech_study`)."
        + (f" Code: {setup['code']}." if setup.get("code") else ""), "",
    ]


def _findings(runs: Sequence[Mapping[str, Any]], table: Mapping[str, Any]) -> list[str]:
    """Sentences read off the numbers (no judgement that the numbers do not carry)."""
    lines = ["## What the numbers say", ""]
    patched = [r for r in runs if r["variant"] in ("clamp", "abs")]
    if patched:
        negative = sum(r["training_steps_kl_negative"] for r in patched)
        total = sum(r["steps"] for r in patched)
        lines.append(f"- The unpatched one-draw minibatch KL was negative on {negative} of {total} training "
                     "steps of the `clamp`/`abs` runs" + (": they never acted, so these runs train "
                     "exactly as `vits` does." if negative == 0 else "."))
    worst = max(r["prob_negative_kl"] for r in runs)
    z = min(r["logged_kl_per_frame"] / r["logged_kl_sd_per_frame"] for r in runs
            if r["logged_kl_sd_per_frame"] > 0)
    lines.append(f"- At the end of training the logged one-draw VITS KL of a training-size minibatch was "
                 f"negative in at most {worst:.3g} of the minibatches drawn per run ({len(runs)} runs); its "
                 f"mean sat at least {z:.3g} standard deviations above 0, a normal-approximation "
                 f"P(negative) of {0.5 * math.erfc(z / math.sqrt(2)):.2g} or less.")
    for v in (v for v in table if v != "vits" and "vits" in table):
        elbo = paired_difference(runs, "heldout_elbo_per_frame", v)
        kl = paired_difference(runs, "heldout_kl_per_frame", v)
        resolved = abs(elbo["mean"]) > elbo["half_width"]
        verdict = "differs from `vits`" if resolved else "is not distinguishable from `vits` here"
        if elbo["mean"] == elbo["half_width"] == kl["mean"] == 0:
            verdict = "is identical to `vits`, run for run"
        lines.append(f"- `{v}`: held-out ELBO {verdict} ({elbo['mean']:+.3g} ± {elbo['half_width']:.2g} "
                     f"nats/frame); held-out KL {kl['mean']:+.3g} ± {kl['half_width']:.2g} nats/frame.")
    if "vits" in table:
        kl = table["vits"]["heldout_kl_per_frame"]["mean"]
        lines.append(f"- Scope: {kl:.3g} nats/frame of KL here, short training and a small latent (see the "
                     "sizes above), far from a converged VITS (about 1 nat/frame over 192 channels, where the "
                     "logged KL can go negative); what `clamp`/`abs` do there is not measured here.")
    if "vits_k4" in table and "vits" in table:
        ratio = table["vits_k4"]["s_per_step"]["mean"] / table["vits"]["s_per_step"]["mean"]
        lines.append(f"- `vits_k4` cost {ratio:.2g}× the time per step of `vits` on this shared CPU.")
    return lines + [""]


def render(results: Mapping[str, Any]) -> str:
    """``docs/speech_study.md`` from ``results.json``'s content."""
    runs, setup = results["runs"], results["setup"]
    table = summarise(runs, KEYS)
    lines = _header(setup) + ["| variant | " + " | ".join(LABELS[k] for k in KEYS) + " |",
                              "|---" * (len(KEYS) + 1) + "|"]
    lines += [f"| {v} | " + " | ".join(_cell(table[v][k]) for k in KEYS) + " |" for v in table]
    lines += ["", "Difference from `vits`, paired by seed (95 % t-interval; * where it excludes 0):", "",
              "| variant | Δ held-out ELBO | Δ held-out KL | Δ reconstruction error (dB) |",
              "|---|---|---|---|"]
    for v in (v for v in table if v != "vits" and "vits" in table):
        cells = []
        for key in KEYS[:3]:
            d = paired_difference(runs, key, v)
            cells.append(_cell(d) + (" *" if abs(d["mean"]) > d["half_width"] else ""))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", *_findings(runs, table)]
    lines += [f"Held-out ELBO and KL: {setup['eval_samples']} guide draws per utterance "
              "(`pyro_vits.model.evaluate`); reconstruction error: `dec(m_q)` against the log-magnitude "
              "spectrogram; P(logged KL < 0): fraction of "
              f"{setup['negative_batches']} training minibatches of {setup['batch_size']} utterances whose "
              "one-draw VITS KL (`-H(q) - log p(z)`, per frame) is negative at the end of training; "
              "s / step: wall time of the run (evaluations included) over its steps.", ""]
    return "\n".join(lines)


def _read(args: argparse.Namespace) -> SpeechCorpus:
    s = PRESETS["cpu"]
    speech = SpeechConfig(filter_length=s["n_fft"], hop_length=s["hop_length"], win_length=s["n_fft"])
    corpus = read_corpus(args.corpus, speech, max_utterances=args.max_utterances, max_frames=s["max_frames"],
                         heldout_size=s["heldout_size"])
    if corpus.heldout is None:
        raise ValueError(f"{args.corpus}: the study needs held-out utterances (val.txt)")
    return corpus


def _run_job(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    """One run in a worker process (which reads the corpus itself)."""
    import torch

    torch.set_num_threads(1)
    return run_variant(_read(args), variant, seed, args)


def _setup(args: argparse.Namespace, corpus: SpeechCorpus, argv: Sequence[str]) -> dict[str, Any]:
    """What the page states about how its numbers were made."""
    summary = Path(args.corpus) / "corpus.json"
    info = json.loads(summary.read_text()) if summary.is_file() else {}
    description = (f"espeak-ng {info.get('synthesiser_version', '?')}, {len(info.get('voices', []))} "
                   f"voice(s), {info.get('hours', float('nan')):.2f} h in all") if info else "no corpus.json"
    s = PRESETS["cpu"]
    return dict(command="python -m pyro_vits.apps.speech_study " + " ".join(argv),
                utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seeds=args.seeds, steps=args.steps,
                batch_size=args.batch_size, negative_batches=args.negative_batches,
                eval_samples=args.eval_samples,
                sizes={k: s[k] for k in ("inter_channels", "hidden_channels", "n_layers", "guide_layers",
                                         "n_fft")},
                corpus=dict(folder=str(args.corpus), train=corpus.train.n, heldout=corpus.heldout.n,
                            description=description))


def _publish(results: Mapping[str, Any], docs: str | None) -> None:
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(docs) / "speech_study.md", lambda f: f.write(render(results)))
    print(render(results))


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.render_only:
        path = Path(args.out) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"no study results at {path} (run the study first)")
        _publish(json.loads(path.read_text()), args.docs)
        return 0
    if len(args.seeds) < 2 or args.jobs < 1:
        raise ValueError("the study needs at least 2 seeds and --jobs >= 1")
    corpus = _read(args)
    jobs = [(variant, seed) for seed in args.seeds for variant in args.variants]
    if args.jobs == 1:
        runs = [run_variant(corpus, variant, seed, args) for variant, seed in jobs]
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            runs = list(pool.map(_run_job, [args] * len(jobs), *zip(*jobs)))
    setup = _setup(args, corpus, argv if argv is not None else sys.argv[1:])
    results = dict(setup=setup, runs=runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", lambda f: json.dump(results, f, indent=2))
    _publish(results, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, prog="pyro-vits speech-study"), prog="pyro-vits speech-study"))
