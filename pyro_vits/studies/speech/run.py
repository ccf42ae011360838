"""Running the speech study of the KL-loss variants (``pyro-vits speech-study``): train one variant
(:func:`run_variant`), reuse stored runs (:func:`stored_run`), run jobs in processes, and the whole study with
equal-steps and equal-compute runs (:func:`run_study`); :func:`publish` writes the page.

The options are ``pyro-vits speech-study``'s (an ``argparse.Namespace``; see
:func:`pyro_vits.apps.speech_study.build_parser`)."""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ..._io import atomic_write
from ...data.speech_batches import SpeechConfig
from ...data.speech_data import SpeechCorpus, read_corpus
from ...infer.evaluate import evaluate
from ...models.speech import PRESETS, build_pair
from ...train import FitConfig, fit
from .report import regime_summary, render
from .variants import (
    RECONSTRUCTION,
    VARIANTS,
    alignment_gap_per_frame,
    cost_ratios,
    equal_compute_steps,
    negative_kl_fraction,
    unequal_cost,
    variant_elbo,
)

__all__ = ["VARIANTS", "hours_used", "publish", "read_study_corpus", "run_study", "run_variant", "stored_run",
           "study_settings"]

logger = logging.getLogger("pyro_vits")


def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a run's numbers depend on besides its variant, seed and steps (a stored run is reused only when
    these match)."""
    return dict(corpus=str(args.corpus), likelihood=args.likelihood, batch_size=args.batch_size,
                max_utterances=args.max_utterances, eval_samples=args.eval_samples,
                negative_batches=args.negative_batches, device=args.device)


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
    model, guide = build_pair(settings, corpus.speech, corpus.n_speakers, seed=seed,
                              likelihood=args.likelihood)
    elbo = variant_elbo(variant)
    run_dir = _run_dir(args, variant, seed, budget)
    start, cpu_start = time.perf_counter(), time.process_time()
    config = FitConfig(steps=steps, lr=settings["lr"], batch_size=args.batch_size, seed=seed, out_dir=run_dir,
                       overwrite=args.overwrite, log_every=min(steps, args.log_every or steps), progress=False,
                       eval_samples=4)
    result = fit(model, guide, corpus.train, config, elbo=elbo, device=args.device,
                 extra_config=dict(variant=variant))
    cpu, wall = time.process_time() - cpu_start, time.perf_counter() - start
    heldout = corpus.heldout.to(result.device)
    measures = evaluate(result.model, result.guide, heldout, num_samples=args.eval_samples, seed=seed)
    negative = negative_kl_fraction(result.model, result.guide, corpus.train.to(result.device),
                                    args.batch_size, args.negative_batches, seed=seed)
    recon_key, recon = RECONSTRUCTION[args.likelihood]
    record = dict(variant=variant, seed=seed, budget=budget, steps=steps, wall_s=wall, s_per_step=wall / steps,
                  cpu_s=cpu, cpu_s_per_step=cpu / steps,
                  heldout_elbo_per_frame=measures["elbo_per_frame"],
                  heldout_kl_per_frame=measures["kl_per_frame"],
                  heldout_elbo_mcse_per_frame=measures["elbo_stderr_per_frame"],
                  **{recon_key: recon(result.model, result.guide, heldout)},
                  prob_negative_kl=negative["prob_negative"],
                  logged_kl_per_frame=negative["kl_per_frame_mean"],
                  logged_kl_sd_per_frame=negative["kl_per_frame_sd"],
                  heldout_alignment_gap=alignment_gap_per_frame(result.model, result.guide, heldout,
                                                                seed=seed),
                  kl_trajectory=[[m["step"], m["kl_per_frame"]] for m in result.metrics],
                  training_steps_kl_negative=getattr(elbo, "negative_steps", None), settings=study_settings(args))
    atomic_write(run_dir / "study_run.json", lambda f: json.dump(record, f, indent=2))
    return record


def read_study_corpus(args: argparse.Namespace) -> SpeechCorpus:
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
    return run_variant(read_study_corpus(args), variant, seed, args, steps, budget)


def hours_used(corpus: SpeechCorpus) -> float:
    """Hours of audio in the utterances the study read (train and held out): spectrogram frames x hop length
    / sample rate, summed over the utterances (not the whole corpus folder)."""
    frames = sum(int(d.lengths.sum()) for d in (corpus.train, corpus.heldout) if d is not None)
    return frames * corpus.speech.hop_length / corpus.speech.sampling_rate / 3600


def _setup(args: argparse.Namespace, corpus: SpeechCorpus, argv: Sequence[str]) -> dict[str, Any]:
    """What the page states about how its numbers were made."""
    summary = Path(args.corpus) / "corpus.json"
    info = json.loads(summary.read_text()) if summary.is_file() else {}
    description = (f"{info.get('synthesiser', 'espeak-ng')} {info.get('synthesiser_version', '?')}, "
                   f"{len(info.get('voices', []))} voice(s), {info.get('hours', float('nan')):.2f} h in all"
                   ) if info else "no corpus.json"
    s = PRESETS["cpu"]
    return dict(command="python -m pyro_vits.apps.speech_study " + " ".join(argv),
                utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), likelihood=args.likelihood,
                seeds=args.seeds, steps=args.steps, batch_size=args.batch_size,
                negative_batches=args.negative_batches, eval_samples=args.eval_samples,
                sizes={k: s[k] for k in ("inter_channels", "hidden_channels", "n_layers", "guide_layers",
                                         "n_fft")},
                corpus=dict(folder=str(args.corpus), train=corpus.train.n, heldout=corpus.heldout.n,
                            hours_used=hours_used(corpus), description=description))


def publish(results: Mapping[str, Any], docs: str | None) -> None:
    """Print the page of ``results``; with ``docs`` also write ``<docs>/speech_study.md`` and a copy of the
    results."""
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(docs) / "speech_study.md", lambda f: f.write(render(results)))
        atomic_write(Path(docs) / "speech_study_results.json", lambda f: json.dump(results, f, indent=2))
    print(render(results))


def stored_run(args: argparse.Namespace, variant: str, seed: int, steps: int, budget: str) -> dict | None:
    """The run's record when it is there with the same settings (and ``--overwrite`` is not given)."""
    path = _run_dir(args, variant, seed, budget) / "study_run.json"
    if args.overwrite or not path.is_file():
        return None
    record = json.loads(path.read_text())
    settings = {"likelihood": "gaussian-linear", **(record.get("settings") or {})}  # runs before --likelihood
    same = record.get("steps") == steps and settings == study_settings(args)
    return record if same else None


def _train(args: argparse.Namespace, corpus: SpeechCorpus, jobs: Sequence[tuple[str, int, int, str]]
           ) -> tuple[list[dict[str, Any]], int]:
    """Records of ``(variant, seed, steps, budget)`` jobs in order, stored ones reused, the rest trained
    (``--jobs`` processes at once); and how many were reused."""
    runs: list[dict[str, Any] | None] = [stored_run(args, *job) for job in jobs]
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


def run_study(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any] | None:
    """The study of the options ``args`` (``pyro-vits speech-study``'s, see
    :func:`pyro_vits.apps.speech_study.build_parser`; ``argv`` is recorded as the command): train (or reuse)
    every run, write ``<out>/results.json`` and publish; returns the results (None with ``--render-only``)."""
    if args.render_only:
        path = Path(args.out) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"no study results at {path} (run the study first)")
        publish(json.loads(path.read_text()), args.docs)
        return None
    if len(args.seeds) < 2 or args.jobs < 1:
        raise ValueError("the study needs at least 2 seeds and --jobs >= 1")
    if args.equal_compute and "vits" not in args.variants:
        raise ValueError("--equal-compute needs the vits variant (the cost ratios are measured against it)")
    start = time.perf_counter()
    corpus = read_study_corpus(args)
    runs, reused = _train(args, corpus, [(v, seed, args.steps, "steps") for seed in args.seeds
                                         for v in args.variants])
    ratios = cost_ratios(runs) if "vits" in args.variants else {}
    chosen = unequal_cost(ratios) if args.equal_compute is None else args.equal_compute
    retrained = [v for v in dict.fromkeys(chosen) if v != "vits" and v in args.variants]
    if retrained:
        more, more_reused = _train(args, corpus, [(v, seed, equal_compute_steps(args.steps, ratios[v]["mean"]),
                                                   "compute") for seed in args.seeds for v in retrained])
        runs, reused = runs + more, reused + more_reused
    setup = _setup(args, corpus, argv)
    setup.update(equal_compute=retrained, equal_compute_rule="auto" if args.equal_compute is None else "given",
                 wall_s=time.perf_counter() - start, reused=reused)
    results = dict(setup=setup, runs=runs, regime=regime_summary(runs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", lambda f: json.dump(results, f, indent=2))
    publish(results, args.docs)
    return results


