"""The real-regime study's stages, each resumable (a stage skips what its output folder already holds):

1. :func:`run_refit`: ``pyro-vits refit-posterior`` from a random ``enc_q`` through ``cfg.refit_steps``
   (one run resumed from checkpoint to checkpoint), each checkpoint's export kept in ``<root>/trajectory``;
2. :func:`run_fixes`: from the last refit checkpoint, one fine-tune per fix and seed
   (``<root>/fixes/<fix>-s<seed>``), ``cfg.jobs`` processes at once, one thread each;
3. :func:`evaluate_all`: every export on the held-out utterances (:mod:`.evaluate`), ``<root>/evals/*.json``;
4. :func:`audit_refit`: the full :func:`~pyro_vits.audit.measure.audit` of the refit on the held-out
   utterances (``<root>/audit``), and :func:`write_samples`: ``dec(z)`` WAVs of each model.

Runs (:func:`~pyro_vits.train.refit.refit_posterior`) go to fresh processes with a set number of torch
threads; each summary is kept as ``<run>.json`` with the process's CPU seconds."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from ..._io import atomic_write, write_json
from ...audit.measure import audit
from ...data.speech_batches import SpeechConfig
from ...train.config import geometric_lrd
from ...train.refit import RefitSettings, refit_posterior
from ...vits import load_vits_generator, read_vits_config
from ...vits.voice import RefitVoice
from .config import RealStudyConfig
from .evaluate import decode_samples, evaluate_generator

__all__ = ["audit_refit", "evaluate_all", "run_fixes", "run_refit", "write_samples"]

logger = logging.getLogger("pyro_vits")


def _settings(cfg: RealStudyConfig, voice: str, corpus: str, out: Path, steps: int, **more: Any) -> RefitSettings:
    return RefitSettings(voice=voice, corpus=str(corpus), out=str(out), steps=steps, batch_size=cfg.batch_size,
                         max_frames=cfg.max_frames, log_every=cfg.log_every, checkpoint_every=cfg.log_every,
                         eval_samples=cfg.eval_draws, eval_size=16, enc_q_layers=cfg.enc_q_layers,
                         segment_frames=cfg.segment_frames, progress=False, device=cfg.device,
                         resume=(out / "checkpoint.pt").is_file(), **more)


def _worker(settings: RefitSettings, threads: int) -> dict[str, Any]:
    """One refit in a fresh process with ``threads`` torch threads: its summary plus its CPU seconds."""
    torch.set_num_threads(threads)
    start = time.process_time()
    summary = refit_posterior(settings)
    return dict(summary, cpu_s=time.process_time() - start, threads=threads, settings=asdict(settings))


def _pool(jobs: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)


def run_refit(cfg: RealStudyConfig, voice: str, corpus: str, root: Path) -> list[Path]:
    """Stage 1; returns the exports of ``cfg.refit_steps`` in ``root/trajectory``."""
    traj, out = root / "trajectory", root / "refit"
    traj.mkdir(parents=True, exist_ok=True)
    lrd = geometric_lrd(cfg.final_lr_ratio, cfg.lr_decay_steps)
    exports = []
    for steps in cfg.refit_steps:
        export = traj / f"G_{steps}.pth"
        if not export.is_file():
            settings = _settings(cfg, voice, corpus, out, steps, lr=cfg.lr, lrd=lrd, seed=cfg.seeds[0])
            with _pool(1) as pool:
                write_json(traj / f"G_{steps}.json", pool.submit(_worker, settings, cfg.jobs).result())
            data = (out / "vits" / f"G_{steps}.pth").read_bytes()
            atomic_write(traj / "config.json", lambda f: f.write((out / "vits" / "config.json").read_text()))
            atomic_write(export, lambda f: f.write(data), "wb")
        exports.append(export)
    return exports


def run_fixes(cfg: RealStudyConfig, voice: str, corpus: str, root: Path, init: Path) -> dict[tuple[str, int], Path]:
    """Stage 2: ``{(fix, seed): export}``, fine-tuned from ``init`` (the last refit export); each run's summary
    in ``root/fixes/<fix>-s<seed>.json``."""
    (root / "fixes").mkdir(parents=True, exist_ok=True)
    exports, pending = {}, {}
    with _pool(cfg.jobs) as pool:
        for seed in cfg.seeds:
            for fix in cfg.fixes:
                out = root / "fixes" / f"{fix.name}-s{seed}"
                exports[(fix.name, seed)] = out / "vits" / f"G_{cfg.fix_steps}.pth"
                if not exports[(fix.name, seed)].is_file():
                    settings = _settings(cfg, voice, corpus, out, cfg.fix_steps, lr=cfg.fix_lr, seed=seed,
                                         init_enc_q=str(init), kl_estimator=fix.estimator,
                                         kl_particles=fix.kl_particles)
                    pending[out.with_suffix(".json")] = pool.submit(_worker, settings, 1)
        for record, future in pending.items():
            write_json(record, future.result())
    return exports


def evaluate_all(cfg: RealStudyConfig, voice: RefitVoice, corpus: str, exports: dict[str, Path],
                 root: Path) -> dict[str, dict[str, Any]]:
    """Stage 3: ``{key: evaluate_generator(...)}`` for ``exports`` (key -> export), cached in
    ``root/evals/<key>.json``."""
    folder = root / "evals"
    folder.mkdir(parents=True, exist_ok=True)
    val = voice.read(corpus, split="val", max_utterances=cfg.eval_utterances)
    model = voice.model(cfg.segment_frames)
    results = {}
    for key, export in exports.items():
        path = folder / f"{key}.json"
        if not path.is_file():
            enc_q = load_vits_generator(export, decoder=False).enc_q.guide
            write_json(path, evaluate_generator(model, enc_q, val, draws=cfg.eval_draws, seed=0))
        results[key] = json.loads(path.read_text())
    return results


def audit_refit(cfg: RealStudyConfig, export: Path, corpus: str, root: Path) -> dict[str, Any]:
    """Stage 4a: the full audit of ``export`` on the corpus's ``val.txt`` (``root/audit``)."""
    out = root / "audit"
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    config = read_vits_config(export.parent / "config.json")
    gen = load_vits_generator(export, config)
    return audit(gen, Path(corpus) / "val.txt", cfg.batch_sizes[1] if len(cfg.batch_sizes) > 1 else 16,
                 cfg.audit_particles, 0, speech_config=SpeechConfig.from_vits_config(config), data_root=corpus,
                 batch_sizes=cfg.batch_sizes, out=out, extra={"checkpoint": str(export)})


def write_samples(cfg: RealStudyConfig, voice: RefitVoice, corpus: str, exports: dict[str, Path],
                  folder: Path) -> list[Path]:
    """Stage 4b: ``folder/<key>.wav`` (16-bit PCM) of ``dec(z)``, ``z ~ q``, for the first ``cfg.samples``
    held-out utterances (concatenated with 0.3 s of silence), and ``folder/recording.wav``, the corpus's."""
    folder.mkdir(parents=True, exist_ok=True)
    val = voice.read(corpus, split="val", max_utterances=cfg.samples)
    rate, model = voice.audio["sampling_rate"], voice.model(cfg.segment_frames)
    gap = np.zeros(int(0.3 * rate), dtype=np.float32)
    written = []

    def save(name: str, waves: list[np.ndarray]) -> None:
        path = folder / f"{name}.wav"
        joined = np.concatenate([x for w in waves for x in (w, gap)][:-1])
        atomic_write(path, lambda f: sf.write(f, joined, rate, subtype="PCM_16", format="WAV"), "wb")
        written.append(path)

    hop = model.hop
    save("recording", [val.wav[i, : int(n) * hop].numpy() for i, n in enumerate(val.lengths)])
    for key, export in exports.items():
        enc_q = load_vits_generator(export, decoder=False).enc_q.guide
        save(key, decode_samples(model, enc_q, val, cfg.samples, seed=0))
    return written
