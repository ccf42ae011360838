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
:mod:`pyro_vits.studies.speech.variants`'s.

``--likelihood`` picks the model's ``p(x | z)`` (:data:`pyro_vits.models.speech.LIKELIHOODS`):
``gaussian-linear`` (default) or ``laplace-mel``, VITS's loss balance (a Laplace of scale 80/45 on the 80-bin
log-mel spectrogram: ``45 x`` mel L1 per frame against the KL per frame); it is recorded in every run's
``config.json``, the study settings and the page, and the reconstruction measure follows it (dB RMS of the
linear spectrogram, or the mel L1)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..models.speech import LIKELIHOODS
from ..studies.speech.run import run_study
from ..studies.speech.variants import VARIANTS
from . import run_main


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="folder with train.txt/val.txt (make speech-corpus)")
    p.add_argument("--out", default="runs/speech-study", help="study folder (a run folder per variant/seed)")
    p.add_argument("--docs", default=None, help="also write <docs>/speech_study.md")
    p.add_argument("--likelihood", choices=tuple(LIKELIHOODS), default="gaussian-linear",
                   help="p(x | z) (laplace-mel: VITS's loss balance, 45 x mel L1 against the KL)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--log-every", type=int, default=None,
                   help="log held-out measures every N steps (the KL trajectory in each run's metrics.jsonl; "
                        "default: only at the end)")
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


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    run_study(args, argv if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, prog="pyro-vits speech-study"), prog="pyro-vits speech-study"))
