"""The real-regime study's stages, each resumable (a stage skips what its output folder already holds):

1. :func:`run_refit`: ``pyro-vits refit-posterior`` from a random ``enc_q`` through ``cfg.refit_steps``
   (one run resumed from checkpoint to checkpoint), each checkpoint's export kept in ``<root>/trajectory``;
2. :func:`run_fixes`: from the last refit checkpoint, one fine-tune per fix and seed
   (``<root>/fixes/<fix>-s<seed>``), ``cfg.jobs`` processes at once, one thread each;
3. :func:`evaluate_all`: every export on the held-out utterances (:mod:`.evaluate`), ``<root>/evals/*.json``;
4. :func:`audit_refit`: the full :func:`~pyro_vits.audit.measure.audit` of the refit on the held-out
   utterances (``<root>/audit``), and :func:`write_samples`: ``dec(z)`` WAVs of each model.

Runs are subprocesses (``python -m pyro_vits.apps.refit_posterior``) with ``OMP_NUM_THREADS`` set; each
prints its summary, kept as ``<run>.json`` with its CPU seconds (``os.wait4``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from ..._io import atomic_write, write_json
from ...audit.measure import audit
from ...data.speech_batches import SpeechConfig
from ...train.config import geometric_lrd
from ...vits import load_vits_generator, read_vits_config
from ...vits.voice import RefitVoice
from .config import Fix, RealStudyConfig
from .evaluate import decode_samples, evaluate_generator

__all__ = ["audit_refit", "evaluate_all", "run_fixes", "run_refit", "write_samples"]

logger = logging.getLogger("pyro_vits")


def _refit_argv(cfg: RealStudyConfig, voice: str, corpus: str, out: Path, steps: int) -> list[str]:
    argv = [voice, "--corpus", str(corpus), "--out", str(out), "--steps", str(steps), "--batch-size",
            str(cfg.batch_size), "--max-frames", str(cfg.max_frames), "--log-every", str(cfg.log_every),
            "--checkpoint-every", str(cfg.log_every), "--eval-samples", str(cfg.eval_draws), "--eval-size", "16",
            "--enc-q-layers", str(cfg.enc_q_layers), "--segment-frames", str(cfg.segment_frames), "-q"]
    return argv + (["--resume"] if (out / "checkpoint.pt").is_file() else [])


class _Popen(subprocess.Popen):
    """``Popen`` that keeps the child's resource usage (``os.wait4``) for its CPU seconds."""

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:
        pid, status, self.rusage = os.wait4(self.pid, wait_flags)
        return pid, status



def _run(argv: Sequence[str], record: Path, threads: int) -> dict[str, Any]:
    """``refit-posterior argv`` in a subprocess; its printed summary plus ``cpu_s`` saved to ``record``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "pyro_vits.apps.refit_posterior", *argv]
    start = time.perf_counter()
    proc = _Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"refit-posterior {' '.join(argv[:1])} --out {record.stem} failed: "
                           f"{err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    summary = json.loads(out[out.index("{"):])
    usage = getattr(proc, "rusage", None)
    summary.update(cpu_s=None if usage is None else usage.ru_utime + usage.ru_stime,
                   wall_s_process=time.perf_counter() - start, argv=list(argv))
    write_json(record, summary)
    return summary


def run_refit(cfg: RealStudyConfig, voice: str, corpus: str, root: Path) -> list[Path]:
    """Stage 1; returns the exports of ``cfg.refit_steps`` in ``root/trajectory``."""
    traj, out = root / "trajectory", root / "refit"
    traj.mkdir(parents=True, exist_ok=True)
    lrd = geometric_lrd(cfg.final_lr_ratio, cfg.refit_steps[-1])
    exports = []
    for steps in cfg.refit_steps:
        export = traj / f"G_{steps}.pth"
        if not export.is_file():
            argv = _refit_argv(cfg, voice, corpus, out, steps) + [
                "--lr", str(cfg.lr), "--lrd", str(lrd), "--seed", str(cfg.seeds[0])]
            _run(argv, traj / f"G_{steps}.json", threads=cfg.jobs)
            data = (out / "vits" / f"G_{steps}.pth").read_bytes()
            atomic_write(traj / "config.json", lambda f: f.write((out / "vits" / "config.json").read_text()))
            atomic_write(export, lambda f: f.write(data), "wb")
        exports.append(export)
    return exports


def _fix_job(cfg: RealStudyConfig, voice: str, corpus: str, init: Path, fix: Fix, seed: int,
             root: Path) -> Path:
    out = root / "fixes" / f"{fix.name}-s{seed}"
    export = out / "vits" / f"G_{cfg.fix_steps}.pth"
    if not export.is_file():
        argv = _refit_argv(cfg, voice, corpus, out, cfg.fix_steps) + [
            "--lr", str(cfg.fix_lr), "--seed", str(seed), "--init-enc-q", str(init),
            "--kl-estimator", fix.estimator, "--kl-particles", str(fix.kl_particles)]
        _run(argv, root / "fixes" / f"{fix.name}-s{seed}.json", threads=1)
    return export


def run_fixes(cfg: RealStudyConfig, voice: str, corpus: str, root: Path, init: Path) -> dict[tuple[str, int], Path]:
    """Stage 2: ``{(fix, seed): export}``, fine-tuned from ``init`` (the last refit export)."""
    (root / "fixes").mkdir(parents=True, exist_ok=True)
    jobs = [(fix, seed) for seed in cfg.seeds for fix in cfg.fixes]
    with ThreadPoolExecutor(cfg.jobs) as pool:
        done = pool.map(lambda job: _fix_job(cfg, voice, corpus, init, *job, root), jobs)
        return {(fix.name, seed): export for (fix, seed), export in zip(jobs, done)}


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
