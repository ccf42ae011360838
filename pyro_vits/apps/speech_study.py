"""``python -m pyro_vits.apps.speech_study``: the KL-loss variants trained on speech.

    python -m pyro_vits.apps.speech_study --corpus data/speech-corpus --out runs/speech-study --docs docs

Trains every variant (``vits``, ``clamp``, ``abs``, ``abs_elementwise``, ``vits_k4``) for each seed with the
CPU preset of :mod:`pyro_vits.apps.fit_speech` (options override it), at equal steps and at equal compute,
then writes ``<out>/results.json`` and, with ``--docs``, ``<docs>/speech_study.md`` (the tables with 95 %
t-intervals over seeds and each variant's difference from ``vits`` paired by seed) and a copy of the results,
``<docs>/speech_study_results.json``. ``<out>/<variant>-s<seed>`` are the runs' folders (``-compute`` for the
equal-compute runs), each with its record ``study_run.json``; a run whose record is there with the same
settings is reused, not retrained (``--overwrite`` retrains all), so a stopped study continues.

Equal compute: after the equal-steps runs, each ``--equal-compute`` variant (by default those whose cost
ratio's 95 % interval excludes 1) is retrained for ``round(steps / r)`` steps, ``r`` its CPU seconds per step
over ``vits``'s measured in those runs (paired by seed); the other variants' ``r`` is stated and their
equal-steps runs stand. The variants and measures are
:mod:`pyro_vits.studies.speech.variants`'s."""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from .._io import atomic_write
from ..data.speech_batches import SpeechConfig
from ..data.speech_data import SpeechCorpus, read_corpus
from ..infer.evaluate import evaluate
from ..models.speech import PRESETS, build_pair
from ..studies.speech.report import render
from ..studies.speech.variants import (
    VARIANTS,
    cost_ratios,
    equal_compute_steps,
    negative_kl_fraction,
    reconstruction_error_db,
    unequal_cost,
    variant_elbo,
)
from ..train import FitConfig, fit
from . import run_main

logger = logging.getLogger("pyro_vits")


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
    p.add_argument("--equal-compute", nargs="*", choices=VARIANTS, default=None,
                   help="variants retrained for round(steps / their measured per-step cost ratio to vits) "
                        "(default: those whose ratio's 95 %% interval excludes 1; none: no equal-compute runs)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (processes; each reads the corpus)")
    p.add_argument("--overwrite", action="store_true", help="replace the run folders")
    p.add_argument("--render-only", action="store_true",
                   help="train nothing: render <out>/results.json into --docs (and print it)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a run's numbers depend on besides its variant, seed and steps (a stored run is reused only when
    these match)."""
    return dict(corpus=str(args.corpus), batch_size=args.batch_size, max_utterances=args.max_utterances,
                eval_samples=args.eval_samples, negative_batches=args.negative_batches, device=args.device)


def _run_dir(args: argparse.Namespace, variant: str, seed: int, budget: str) -> Path:
    return Path(args.out) / (f"{variant}-s{seed}" + ("" if budget == "steps" else f"-{budget}"))


def run_variant(corpus: SpeechCorpus, variant: str, seed: int, args: argparse.Namespace, steps: int | None = None,
                budget: str = "steps") -> dict[str, Any]:
    """Train one variant with one seed for ``steps`` (default ``args.steps``); its held-out measures and
    timing as a flat record (``cpu_s``: CPU seconds of this process in :func:`~pyro_vits.train.fit`,
    ``wall_s``: wall seconds), also written to ``<run folder>/study_run.json``. ``budget`` (``"steps"`` or
    ``"compute"``) labels the comparison the run belongs to."""
    steps = args.steps if steps is None else steps
    settings = PRESETS["cpu"]
    model, guide = build_pair(settings, corpus.speech, corpus.n_speakers, seed=seed)
    elbo = variant_elbo(variant)
    run_dir = _run_dir(args, variant, seed, budget)
    start, cpu_start = time.perf_counter(), time.process_time()
    config = FitConfig(steps=steps, lr=settings["lr"], batch_size=args.batch_size, seed=seed, out_dir=run_dir,
                       overwrite=args.overwrite, log_every=steps, progress=False, eval_samples=4)
    result = fit(model, guide, corpus.train, config, elbo=elbo, device=args.device,
                 extra_config=dict(variant=variant))
    cpu, wall = time.process_time() - cpu_start, time.perf_counter() - start
    heldout = corpus.heldout.to(result.device)
    measures = evaluate(result.model, result.guide, heldout, num_samples=args.eval_samples, seed=seed)
    negative = negative_kl_fraction(result.model, result.guide, corpus.train.to(result.device),
                                    args.batch_size, args.negative_batches, seed=seed)
    record = dict(variant=variant, seed=seed, budget=budget, steps=steps, wall_s=wall, s_per_step=wall / steps,
                  cpu_s=cpu, cpu_s_per_step=cpu / steps,
                  heldout_elbo_per_frame=measures["elbo_per_frame"],
                  heldout_kl_per_frame=measures["kl_per_frame"],
                  heldout_elbo_mcse_per_frame=measures["elbo_stderr_per_frame"],
                  heldout_recon_db=reconstruction_error_db(result.model, result.guide, heldout),
                  prob_negative_kl=negative["prob_negative"],
                  logged_kl_per_frame=negative["kl_per_frame_mean"],
                  logged_kl_sd_per_frame=negative["kl_per_frame_sd"],
                  training_steps_kl_negative=getattr(elbo, "negative_steps", None), settings=_settings(args))
    atomic_write(run_dir / "study_run.json", lambda f: json.dump(record, f, indent=2))
    return record


def _read(args: argparse.Namespace) -> SpeechCorpus:
    s = PRESETS["cpu"]
    speech = SpeechConfig(filter_length=s["n_fft"], hop_length=s["hop_length"], win_length=s["n_fft"])
    corpus = read_corpus(args.corpus, speech, max_utterances=args.max_utterances, max_frames=s["max_frames"],
                         heldout_size=s["heldout_size"])
    if corpus.heldout is None:
        raise ValueError(f"{args.corpus}: the study needs held-out utterances (val.txt)")
    return corpus


def _run_job(args: argparse.Namespace, variant: str, seed: int, steps: int, budget: str) -> dict[str, Any]:
    """One run in a worker process (which reads the corpus itself)."""
    import torch

    torch.set_num_threads(1)
    return run_variant(_read(args), variant, seed, args, steps, budget)


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
        atomic_write(Path(docs) / "speech_study_results.json", lambda f: json.dump(results, f, indent=2))
    print(render(results))


def _stored(args: argparse.Namespace, variant: str, seed: int, steps: int, budget: str) -> dict | None:
    """The run's record when it is there with the same settings (and ``--overwrite`` is not given)."""
    path = _run_dir(args, variant, seed, budget) / "study_run.json"
    if args.overwrite or not path.is_file():
        return None
    record = json.loads(path.read_text())
    same = record.get("steps") == steps and record.get("settings") == _settings(args)
    return record if same else None


def _train(args: argparse.Namespace, corpus: SpeechCorpus, jobs: Sequence[tuple[str, int, int, str]]
           ) -> tuple[list[dict[str, Any]], int]:
    """Records of ``(variant, seed, steps, budget)`` jobs in order, stored ones reused, the rest trained
    (``--jobs`` processes at once); and how many were reused."""
    runs: list[dict[str, Any] | None] = [_stored(args, *job) for job in jobs]
    todo = [job for job, run in zip(jobs, runs) if run is None]
    if todo:
        logger.info("training %d of %d runs", len(todo), len(jobs))
    if args.jobs == 1 or len(todo) < 2:
        fresh = [run_variant(corpus, v, seed, args, steps, budget) for v, seed, steps, budget in todo]
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(args.jobs, len(todo)), mp_context=context) as pool:
            fresh = list(pool.map(_run_job, [args] * len(todo), *zip(*todo)))
    it = iter(fresh)
    return [run if run is not None else next(it) for run in runs], len(jobs) - len(todo)


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
    if args.equal_compute and "vits" not in args.variants:
        raise ValueError("--equal-compute needs the vits variant (the cost ratios are measured against it)")
    start = time.perf_counter()
    corpus = _read(args)
    runs, reused = _train(args, corpus, [(v, seed, args.steps, "steps") for seed in args.seeds
                                         for v in args.variants])
    ratios = cost_ratios(runs) if "vits" in args.variants else {}
    chosen = unequal_cost(ratios) if args.equal_compute is None else args.equal_compute
    retrained = [v for v in dict.fromkeys(chosen) if v != "vits" and v in args.variants]
    if retrained:
        more, more_reused = _train(args, corpus, [(v, seed, equal_compute_steps(args.steps, ratios[v]["mean"]),
                                                   "compute") for seed in args.seeds for v in retrained])
        runs, reused = runs + more, reused + more_reused
    setup = _setup(args, corpus, argv if argv is not None else sys.argv[1:])
    setup.update(equal_compute=retrained, equal_compute_rule="auto" if args.equal_compute is None else "given",
                 wall_s=time.perf_counter() - start, reused=reused)
    results = dict(setup=setup, runs=runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", lambda f: json.dump(results, f, indent=2))
    _publish(results, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, prog="pyro-vits speech-study"), prog="pyro-vits speech-study"))
