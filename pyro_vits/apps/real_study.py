"""``pyro-vits real-study``: VITS's KL regime on a real trained VITS (docs/real_vits.md).

    pyro-vits real-study --corpus data/piper-corpus --out runs/real-vits --docs docs

Refits VITS's posterior encoder against the voice's frozen prior and decoder with VITS's loss, evaluates the
refit's checkpoints and the full audit on held-out utterances, fine-tunes it with every fix and seed, and
writes the page, its JSON, figures and listening samples to ``--docs``. Every stage is resumable: run the
same command again to continue (the runs in ``--out`` are reused). See :mod:`pyro_vits.studies.real`."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .._io import atomic_write, check_writable, write_json
from ..studies.real.config import PRESETS, preset
from . import run_main
from ._args import positive_int

__all__ = ["build_parser", "main"]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--voice", default="joe", help="a VITS/Piper checkpoint or model folder, or 'joe'")
    p.add_argument("--corpus", required=True, help="LJSpeech-format corpus with train.txt and val.txt "
                   "(pyro-vits corpus --engine piper)")
    p.add_argument("--out", required=True, help="folder for the runs (reused when the command is repeated)")
    p.add_argument("--docs", default=None, help="write real_vits.md/.json, figures and samples here")
    p.add_argument("--bench", default="benchmarks/results/cpu.json",
                   help="the benchmark JSON whose generator_step entry (pyro-vits bench --generator-step) the "
                        "page quotes")
    p.add_argument("--preset", choices=tuple(PRESETS), default="docs")
    p.add_argument("--jobs", type=positive_int, default=None, help="runs at once (default: the preset's)")
    p.add_argument("--device", default=None, help="where the refits train: cpu, cuda, cuda:<i> (default: the "
                   "preset's, cpu); the evaluations run on the CPU")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    from ..studies.real.report import collect, figures, findings, render
    from ..studies.real.run import audit_refit, evaluate_all, run_fixes, run_refit, write_samples
    from ..vits.voice import RefitVoice

    overrides = {k: v for k, v in (("jobs", args.jobs), ("device", args.device)) if v is not None}
    cfg = preset(args.preset, **overrides)
    root = Path(args.out)
    check_writable(root, what="--out")
    if args.docs is not None:
        check_writable(args.docs, what="--docs")
    if not (Path(args.corpus) / "val.txt").is_file():
        raise FileNotFoundError(f"--corpus {args.corpus} has no val.txt (build it with pyro-vits corpus)")
    voice = RefitVoice.load(args.voice)
    start = time.perf_counter()
    trajectory = run_refit(cfg, args.voice, args.corpus, root)
    fixes = run_fixes(cfg, args.voice, args.corpus, root, trajectory[-1])
    exports = {f"refit-{s}": p for s, p in zip(cfg.refit_steps, trajectory)}
    exports.update({f"{name}-s{seed}": p for (name, seed), p in fixes.items()})
    evals = evaluate_all(cfg, voice, args.corpus, exports, root)
    report = audit_refit(cfg, trajectory[-1], args.corpus, root)
    runs = {p.stem: json.loads(p.read_text()) for p in sorted((root / "fixes").glob("*.json"))}
    setup = dict(command="pyro-vits real-study " + " ".join(sys.argv[1:] if argv is None else argv),
                 created_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 wall_h=(time.perf_counter() - start) / 3600, machine=f"{platform.machine()} CPU",
                 voice=str(voice.path.name), corpus=str(args.corpus))
    setup.update(corpus_summary=_corpus_summary(args.corpus), fixes_cpu_h=_cpu_h(root / "fixes"))
    results = collect(cfg.asdict(), root, evals, report, runs, setup)
    seed0 = cfg.seeds[0]
    results["fixes_sigma"] = [dict(label=f"{f.name} (seed {seed0})", sigma_ratio=evals[f"{f.name}-s{seed0}"]
                                   ["sigma_ratio"]) for f in cfg.fixes]
    if args.docs is not None:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        samples = {"refit": trajectory[-1], **{f.name: fixes[(f.name, seed0)] for f in cfg.fixes}}
        write_samples(cfg, voice, args.corpus, samples, docs / "samples" / "real_vits")
        results["samples"] = ["recording", *samples]
        write_json(docs / "real_vits.json", results)
        figures(results, docs / "figures")
        bench_path = Path(args.bench)
        bench = json.loads(bench_path.read_text()).get("generator_step") if bench_path.is_file() else None
        atomic_write(docs / "real_vits.md", lambda f: f.write(render(results, findings(results, bench))))
    print(f"{root}: refit KL {evals[f'refit-{cfg.refit_steps[-1]}']['kl_per_frame']:.4g} nats/frame; "
          f"{len(fixes)} fine-tunes; {(time.perf_counter() - start) / 60:.1f} min")
    return 0


def _cpu_h(folder: Path) -> float:
    """CPU hours of the runs whose summaries (``*.json`` with ``cpu_s``) are in ``folder``."""
    seconds = [json.loads(p.read_text()).get("cpu_s") for p in folder.glob("*.json")]
    return sum(s for s in seconds if s is not None) / 3600


def _corpus_summary(corpus: str) -> dict:
    path = Path(corpus) / "corpus.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if "seconds" in summary:
        summary["hours"] = summary["seconds"] / 3600
    return summary


if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, prog="pyro-vits real-study"), prog="pyro-vits real-study"))
