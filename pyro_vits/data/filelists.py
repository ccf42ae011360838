"""Where utterances come from: VITS filelists and LJSpeech folders, as :class:`Utterance` records."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Utterance:
    """One corpus entry: ``wav_path``, cleaned ``text``, ``speaker`` id (None for single-speaker) and
    ``source`` (``"file:line"``, used in every error about it)."""

    wav_path: Path
    text: str
    speaker: int | None
    source: str


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def read_filelist(path: str | Path, data_root: str | Path | None = None) -> Iterator[Utterance]:
    """Stream a VITS filelist: ``wav_path|text`` or ``wav_path|speaker_id|text`` per line (cleaned text).

    Relative wav paths are resolved against ``data_root`` (default: the working directory, as in VITS).
    Every line must have the same number of fields; a bad line or an empty filelist raises ``ValueError``
    naming ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"filelist not found: {path}")
    root = Path(data_root) if data_root is not None else Path()
    n_fields = None
    for number, line in _lines(path):
        fields, source = line.split("|"), f"{path}:{number}"
        if len(fields) not in (2, 3) or not fields[0].strip():
            raise ValueError(
                f"{source}: expected 'wav_path|text' or 'wav_path|speaker_id|text', got {line!r:.80}"
            )
        if n_fields is not None and len(fields) != n_fields:
            raise ValueError(f"{source}: {len(fields)} fields where earlier lines have {n_fields}")
        n_fields = len(fields)
        speaker = None
        if n_fields == 3:
            if not fields[1].strip().isdigit():
                raise ValueError(f"{source}: speaker id must be a non-negative int, got {fields[1]!r}")
            speaker = int(fields[1])
        yield Utterance(root / fields[0].strip(), fields[-1], speaker, source)
    if n_fields is None:
        raise ValueError(f"{path}: the filelist has no utterances")


def read_ljspeech(folder: str | Path) -> Iterator[Utterance]:
    """Stream an LJSpeech-style folder: ``metadata.csv`` lines ``id|text|normalized text`` and
    ``wavs/<id>.wav``; the text is the normalised column (the second when there are only two). The text is
    not phonemised: use a cleaned filelist for a model trained on phonemes."""
    folder = Path(folder)
    metadata = folder / "metadata.csv"
    if not metadata.is_file():
        raise FileNotFoundError(f"{folder}: no metadata.csv (expected an LJSpeech-style folder)")
    count = 0
    for number, line in _lines(metadata):
        fields = line.split("|")
        if len(fields) not in (2, 3) or not fields[0].strip():
            raise ValueError(f"{metadata}:{number}: expected 'id|text|normalized text', got {line!r:.80}")
        count += 1
        yield Utterance(
            folder / "wavs" / f"{fields[0].strip()}.wav", fields[-1], None, f"{metadata}:{number}"
        )
    if count == 0:
        raise ValueError(f"{metadata}: no utterances")


def open_corpus(path: str | Path, data_root: str | Path | None = None) -> Iterator[Utterance]:
    """A filelist (a file) or an LJSpeech folder (a directory with ``metadata.csv``), streamed."""
    path = Path(path)
    if path.is_dir():
        if data_root is not None:
            raise ValueError("data_root applies to filelists, not to LJSpeech folders")
        return read_ljspeech(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus not found: {path}")
    return read_filelist(path, data_root)
