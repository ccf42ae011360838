"""A speech corpus that needs no download: sentences from an offline text, spoken by ``espeak-ng`` (or by
another engine of :mod:`pyro_vits.data.engines`: a Piper voice through onnxruntime, flite, festival).

:func:`build_corpus` writes an LJSpeech-format folder::

    <out>/metadata.csv     id|text|normalized text   (normalized = the symbols the model reads, see below)
    <out>/wavs/<id>.wav    mono, 16-bit PCM, ``sample_rate`` Hz (22,050 by default, as LJSpeech)
    <out>/train.txt        VITS filelists of the same utterances, paths relative to <out>:
    <out>/val.txt          ``wavs/<id>.wav|<normalized>`` (one voice), ``wavs/<id>.wav|<sid>|<normalized>``
    <out>/corpus.json      the summary (:class:`CorpusSummary`): sizes, voices, synthesiser, version, settings

The normalized text is either the IPA phonemes ``espeak-ng -q --ipa`` gives for each clause, with the
clause's punctuation kept (``symbols="phonemes"``, what VITS's ``english_cleaners2`` produces through the
same synthesiser), or the sentence's own characters (``symbols="characters"``). Utterances whose
normalized text holds a symbol outside ``allowed`` (e.g. VITS's symbol table) or whose audio is longer
than ``max_seconds`` are left out and counted. Several voices (the engine's: ``espeak-ng``
names, variants as ``en-us+f3``; flite ``slt,rms,awb``; a Piper model's speakers) give a multi-speaker
corpus: sentence ``i`` is spoken by voice ``i mod V``, speaker id = the
voice's position. The folder is written under a temporary name and renamed when complete.

Size: the default texts (Debian's fortunes-min) give 963 sentences, about 0.66 h with Piper's joe voice
(2.5 s a sentence on average over 20); :data:`LONG_TEXTS` (the default of ``--engine piper``) add two files of
Debian's full ``fortunes`` package for a corpus over an hour.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .._io import publish_folder
from .._validate import check_positive_ints
from .engines import Engine, EspeakEngine, phonemize

__all__ = [
    "SAMPLE_RATE",
    "SYMBOL_MODES",
    "DEBIAN_TEXTS",
    "LONG_TEXTS",
    "CorpusSummary",
    "read_sentences",
    "synthesise",
    "build_corpus",
]

SAMPLE_RATE = 22050
SYMBOL_MODES = ("phonemes", "characters")
DEBIAN_TEXTS = tuple(f"/usr/share/games/fortunes/{name}" for name in ("fortunes", "literature", "riddles"))
"""The plain-English texts of Debian's ``fortunes-min`` package (``apt-get install fortunes-min``)."""
LONG_TEXTS = DEBIAN_TEXTS + tuple(f"/usr/share/games/fortunes/{name}" for name in ("science", "wisdom"))
""":data:`DEBIAN_TEXTS` and two files of Debian's ``fortunes`` package (``apt-get install fortunes``)."""

_SENTENCE = re.compile(r"^[A-Z][A-Za-z ,;:'\-]*[A-Za-z][.!?]$")


@dataclass(frozen=True)
class CorpusSummary:
    """What :func:`build_corpus` wrote: ``utterances`` (train + val), ``seconds`` of audio, ``voices``
    (speaker id = position), counts of sentences ``dropped`` and why, the synthesiser (engine name), its
    version and ``settings`` (e.g. espeak's speed, piper's model and scales)."""

    utterances: int
    train: int
    val: int
    seconds: float
    sample_rate: int
    voices: list[str]
    symbols: str
    synthesiser: str
    synthesiser_version: str
    source: str
    dropped: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0


def _entries(text: str) -> list[str]:
    """The entries of a fortune-format file (separated by ``%`` lines; a plain text is one entry),
    without attribution lines (``-- Author``) and ``Q:``/``A:`` prefixes, whitespace collapsed."""
    entries = []
    for entry in re.split(r"^%\s*$", text, flags=re.M):
        lines = [re.sub(r"^\s*[AQ]:\s*", "", line) for line in entry.splitlines()
                 if not re.match(r"^\s*--", line)]
        entries.append(" ".join(" ".join(lines).split()))
    return entries


def read_sentences(
    paths: Sequence[str | os.PathLike], *, min_chars: int = 12, max_chars: int = 100
) -> list[str]:
    """Plain English sentences from text files (fortune format or plain text), in file order, unique.

    Kept: one sentence (split after ``.!?``) that starts with a capital, ends with ``.!?``, holds only
    letters, spaces and ``,;:'-``, has ``min_chars..max_chars`` characters and at least 3 words.
    """
    check_positive_ints(min_chars=min_chars, max_chars=max_chars)
    if min_chars > max_chars:
        raise ValueError(f"min_chars ({min_chars}) must not exceed max_chars ({max_chars})")
    if isinstance(paths, (str, os.PathLike)) or not paths:
        raise ValueError(f"paths must be a non-empty sequence of text files, got {paths!r}")
    seen: dict[str, None] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"text source {path} not found (the default texts come with Debian's "
                                    "fortunes-min and fortunes: apt-get install -y fortunes-min fortunes)")
        for entry in _entries(path.read_text(encoding="utf-8", errors="replace")):
            for sentence in re.split(r"(?<=[.!?])\s+", entry):
                if (_SENTENCE.match(sentence) and min_chars <= len(sentence) <= max_chars
                        and len(sentence.split()) >= 3):
                    seen.setdefault(sentence)
    return list(seen)


def synthesise(
    text: str, voice: str = "en-us", *, speed: int = 160, sample_rate: int = SAMPLE_RATE,
    executable: str = "espeak-ng",
) -> np.ndarray:
    """``text`` spoken by ``espeak-ng -v voice -s speed``: a float32 waveform ``(samples,)`` in [-1, 1] at
    ``sample_rate`` Hz (``scipy.signal.resample_poly`` when the synthesiser's rate differs)."""
    check_positive_ints(speed=speed, sample_rate=sample_rate)
    return _resample(*EspeakEngine(speed, executable).synthesise(text, voice), sample_rate)


def _resample(wav: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
    if rate != sample_rate:
        from scipy.signal import resample_poly

        g = math.gcd(rate, sample_rate)
        wav = resample_poly(wav, sample_rate // g, rate // g).astype(np.float32)
    return wav


def _normalize(sentence: str, voice: str, symbols: str, executable: str) -> str:
    if symbols == "phonemes":
        return phonemize(sentence, voice, executable)
    return sentence.replace("-", " ")


def _check_args(voices: Sequence[str], symbols: str, heldout: float, max_seconds: float) -> None:
    if isinstance(voices, str) or not voices or not all(isinstance(v, str) and v for v in voices):
        raise ValueError(f"voices must be a non-empty sequence of voice names, got {voices!r}")
    if len(set(voices)) != len(voices):
        raise ValueError(f"voices must be distinct, got {list(voices)}")
    if symbols not in SYMBOL_MODES:
        raise ValueError(f"symbols must be one of {SYMBOL_MODES}, got {symbols!r}")
    if not 0 <= heldout < 1:
        raise ValueError(f"heldout must be in [0, 1), got {heldout!r}")
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds!r}")


def build_corpus(
    out: str | os.PathLike,
    sentences: Sequence[str],
    *,
    voices: Sequence[str] | None = None,
    symbols: str = "phonemes",
    allowed: Collection[str] | None = None,
    max_utterances: int | None = None,
    max_seconds: float = 10.0,
    heldout: float = 0.05,
    speed: int = 160,
    sample_rate: int = SAMPLE_RATE,
    seed: int = 0,
    workers: int = 2,
    overwrite: bool = False,
    executable: str = "espeak-ng",
    source: str = "",
    engine: Engine | None = None,
) -> CorpusSummary:
    """Synthesise ``sentences`` into an LJSpeech-format folder ``out`` (layout in the module docstring).

    The sentences are shuffled with ``seed``; the first ``max_utterances`` (None: all) that pass the
    filters are kept; a ``heldout`` fraction of them (at least one when ``heldout > 0``) goes to
    ``val.txt``. ``workers`` synthesiser processes run at once; ``source`` describes where the sentences
came from (recorded in the summary). Returns the summary also written to
    ``corpus.json``. Refuses a non-empty ``out`` unless ``overwrite``.

    ``engine`` (:mod:`pyro_vits.data.engines`) speaks the sentences; None: ``espeak-ng`` at ``speed``
    words per minute (``executable``). ``voices`` None: the engine's ``default_voices``. The normalized
    text always comes from ``espeak-ng`` (the engine's ``phoneme_voice``), whatever the engine; audio is
    resampled to ``sample_rate``; a ``serial`` engine (piper) synthesises one utterance at a time, in
    order, with ``seed``.
    """
    check_positive_ints(speed=speed, sample_rate=sample_rate, workers=workers)
    if engine is None:
        engine = EspeakEngine(speed, executable)
    if voices is None:
        voices = engine.default_voices
    _check_args(voices, symbols, heldout, max_seconds)
    check_positive_ints(max_utterances=max_utterances, allow_none=True)
    if isinstance(sentences, str) or not sentences:
        raise ValueError("sentences must be a non-empty sequence of strings")
    version = engine.version()
    order = list(sentences)
    random.Random(seed).shuffle(order)
    with publish_folder(out, overwrite=overwrite) as tmp:
        summary = _write_corpus(tmp, order, voices, symbols, allowed, max_utterances, max_seconds, heldout,
                                sample_rate, seed, 1 if engine.serial else workers, executable, version,
                                source, engine)
    return summary


def _write_corpus(
    tmp: Path, order: list[str], voices: Sequence[str], symbols: str, allowed: Collection[str] | None,
    max_utterances: int | None, max_seconds: float, heldout: float, sample_rate: int, seed: int,
    workers: int, executable: str, version: str, source: str, engine: Engine,
) -> CorpusSummary:
    import soundfile

    (tmp / "wavs").mkdir()
    allowed_set = None if allowed is None else set(allowed)
    wanted = len(order) if max_utterances is None else min(max_utterances, len(order))
    dropped = {"unknown_symbols": 0, "too_long": 0}
    rows: list[tuple[str, str, str, int]] = []  # id, text, normalized, speaker
    seconds = 0.0

    def make(i: int) -> tuple[str, np.ndarray]:
        voice = voices[i % len(voices)]
        return (_normalize(order[i], engine.phoneme_voice(voice), symbols, executable),
                _resample(*engine.synthesise(order[i], voice, seed), sample_rate))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        start = 0
        while len(rows) < wanted and start < len(order):  # rounds of `workers` utterances, in order
            stop = min(start + max(workers, wanted - len(rows)), len(order))
            for i, (normalized, wav) in zip(range(start, stop), pool.map(make, range(start, stop))):
                if len(rows) == wanted:
                    break
                if allowed_set is not None and not set(normalized) <= allowed_set:
                    dropped["unknown_symbols"] += 1
                elif len(wav) > max_seconds * sample_rate:
                    dropped["too_long"] += 1
                else:
                    uid = f"SYN{i % len(voices):02d}-{i:04d}"
                    soundfile.write(tmp / "wavs" / f"{uid}.wav", wav, sample_rate, subtype="PCM_16")
                    rows.append((uid, order[i], normalized, i % len(voices)))
                    seconds += len(wav) / sample_rate
            start = stop
    if not rows:
        raise ValueError(f"no utterance passed the filters ({dropped})")
    n_val = 0 if heldout == 0 else max(1, round(heldout * len(rows)))
    if n_val >= len(rows):
        raise ValueError(f"heldout={heldout} leaves no training utterance out of {len(rows)}")
    val_ids = set(random.Random(seed + 1).sample(range(len(rows)), n_val))
    _write_lists(tmp, rows, val_ids, multi=len(voices) > 1)
    summary = CorpusSummary(
        utterances=len(rows), train=len(rows) - n_val, val=n_val, seconds=round(seconds, 3),
        sample_rate=sample_rate, voices=list(voices), symbols=symbols, synthesiser=engine.name,
        synthesiser_version=version, source=source, dropped=dropped, settings=dict(engine.settings),
    )
    with open(tmp / "corpus.json", "w", encoding="utf-8") as f:
        json.dump(asdict(summary) | {"hours": summary.hours}, f, indent=2)
    return summary


def _write_lists(tmp: Path, rows: list[tuple[str, str, str, int]], val_ids: set[int], multi: bool) -> None:
    with open(tmp / "metadata.csv", "w", encoding="utf-8") as f:
        f.writelines(f"{uid}|{text}|{normalized}\n" for uid, text, normalized, _ in rows)
    for name, keep in (("train.txt", False), ("val.txt", True)):
        lines = [f"wavs/{uid}.wav|" + (f"{sid}|" if multi else "") + f"{normalized}\n"
                 for j, (uid, _, normalized, sid) in enumerate(rows) if (j in val_ids) == keep]
        with open(tmp / name, "w", encoding="utf-8") as f:
            f.writelines(lines)

