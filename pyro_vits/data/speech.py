"""Real speech the way VITS reads it: filelists and LJSpeech folders, WAVs, linear spectrograms, symbols.

Streaming throughout: :func:`open_corpus` yields :class:`Utterance` records one line at a time and
:func:`speech_batches` turns them into padded :class:`SpeechBatch` es of ``batch_size`` utterances, so no
more than one batch of audio or spectrograms is ever in memory.

Shapes: waveforms ``(..., samples)`` float in ``[-1, 1]``; spectrograms ``(..., n_fft // 2 + 1, frames)``
(linear magnitude, VITS's ``spec``); token ids ``(T_text,)`` long.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .._validate import check_positive_ints

__all__ = [
    "VITS_SYMBOLS",
    "cleaned_text_to_sequence",
    "intersperse",
    "linear_spectrogram",
    "read_wav",
    "Utterance",
    "read_filelist",
    "read_ljspeech",
    "open_corpus",
    "SpeechConfig",
    "SpeechBatch",
    "load_utterance",
    "speech_batches",
]

_PAD = "_"
_PUNCTUATION = ';:,.!?¡¿—…"«»“” '
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LETTERS_IPA = (
    "\u0251\u0250\u0252\xe6\u0253\u0299\u03b2\u0254\u0255\xe7\u0257\u0256\xf0\u02a4\u0259\u0258\u025a\u025b"
    "\u025c\u025d\u025e\u025f\u0284\u0261\u0260\u0262\u029b\u0266\u0267\u0127\u0265\u029c\u0268\u026a\u029d"
    "\u026d\u026c\u026b\u026e\u029f\u0271\u026f\u0270\u014b\u0273\u0272\u0274\xf8\u0275\u0278\u03b8\u0153"
    "\u0276\u0298\u0279\u027a\u027e\u027b\u0280\u0281\u027d\u0282\u0283\u0288\u02a7\u0289\u028a\u028b\u2c71"
    "\u028c\u0263\u0264\u028d\u03c7\u028e\u028f\u0291\u0290\u0292\u0294\u02a1\u0295\u02a2\u01c0\u01c1\u01c2"
    "\u01c3\u02c8\u02cc\u02d0\u02d1\u02bc\u02b4\u02b0\u02b1\u02b2\u02b7\u02e0\u02e4\u02de\u2193\u2191\u2192"
    "\u2197\u2198'\u0329'\u1d7b"
)
VITS_SYMBOLS: tuple[str, ...] = (_PAD, *_PUNCTUATION, *_LETTERS, *_LETTERS_IPA)
"""VITS's ``text.symbols.symbols`` (178 entries): pad ``_`` (id 0), punctuation and space, ASCII letters, IPA.
The apostrophe occurs twice; as in VITS, its id is the later position."""


@functools.lru_cache(maxsize=8)
def _symbol_ids(symbols: tuple[str, ...]) -> dict[str, int]:
    return {symbol: i for i, symbol in enumerate(symbols)}


def cleaned_text_to_sequence(cleaned_text: str, symbols: Sequence[str] = VITS_SYMBOLS) -> list[int]:
    """Token ids of already-cleaned text, one per character (VITS's ``text.cleaned_text_to_sequence``).

    Raises ``ValueError`` naming the first character not in ``symbols`` and its position."""
    if not isinstance(cleaned_text, str):
        raise TypeError(f"cleaned_text must be a str, got {type(cleaned_text).__name__}")
    table = _symbol_ids(tuple(symbols))
    try:
        return [table[ch] for ch in cleaned_text]
    except KeyError:
        pos = next(i for i, ch in enumerate(cleaned_text) if ch not in table)
        ch = cleaned_text[pos]
        raise ValueError(
            f"unknown symbol {ch!r} (U+{ord(ch):04X}) at character {pos} of the text; the symbol "
            f"table has {len(table)} symbols"
        ) from None


def intersperse(sequence: Sequence[int], item: int = 0) -> list[int]:
    """``[item, s0, item, s1, ..., item]`` (VITS's ``commons.intersperse``, used when ``add_blank``)."""
    result = [item] * (2 * len(sequence) + 1)
    result[1::2] = list(sequence)
    return result


def linear_spectrogram(wav: Tensor, n_fft: int, hop_length: int, win_length: int) -> Tensor:
    """VITS's ``mel_processing.spectrogram_torch``: ``(..., samples) -> (..., n_fft // 2 + 1, frames)``.

    Reflect-pads ``(n_fft - hop_length) // 2`` samples on each side, then an STFT with a periodic Hann window
    of ``win_length``, ``center=False``, one-sided and unnormalised; returns ``sqrt(re^2 + im^2 + 1e-6)``.
    ``frames = (samples + 2 pad - n_fft) // hop_length + 1``. Dtype and device follow ``wav``.
    """
    check_positive_ints(n_fft=n_fft, hop_length=hop_length, win_length=win_length)
    if not isinstance(wav, Tensor) or not wav.is_floating_point() or wav.dim() < 1:
        raise TypeError(f"wav must be a floating Tensor of shape (..., samples), got {wav!r:.80}")
    if win_length > n_fft or hop_length > n_fft:
        raise ValueError(
            f"win_length and hop_length must be <= n_fft={n_fft}, got {win_length}, {hop_length}"
        )
    pad = (n_fft - hop_length) // 2
    samples = wav.shape[-1]
    if samples + 2 * pad < n_fft or samples <= pad:
        raise ValueError(f"wav has {samples} samples: too short for n_fft={n_fft}, hop_length={hop_length}")
    flat = wav.reshape(-1, 1, samples)
    flat = F.pad(flat, (pad, pad), mode="reflect").squeeze(1)
    window = torch.hann_window(win_length, dtype=wav.dtype, device=wav.device)
    stft = torch.stft(
        flat,
        n_fft,
        hop_length=hop_length,
        win_length=win_length,
        window=window,
        center=False,
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    spec = torch.sqrt(stft.real.pow(2) + stft.imag.pow(2) + 1e-6)
    return spec.reshape(wav.shape[:-1] + spec.shape[-2:])


def read_wav(path: str | Path, sampling_rate: int, resample: bool = False) -> Tensor:
    """A mono WAV (any format ``soundfile`` reads) as float32 ``(samples,)`` in ``[-1, 1]``.

    A file at another rate raises ``ValueError`` naming it, unless ``resample`` (then
    ``scipy.signal.resample_poly`` converts it to ``sampling_rate``). 16-bit PCM gives VITS's
    ``audio / 32768`` exactly.
    """
    import soundfile

    check_positive_ints(sampling_rate=sampling_rate)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"wav file not found: {path}")
    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise ValueError(f"{path}: cannot read audio ({err})") from err
    if audio.shape[1] != 1:
        raise ValueError(f"{path}: {audio.shape[1]} channels, VITS expects mono audio")
    audio = audio[:, 0]
    if rate != sampling_rate:
        if not resample:
            raise ValueError(
                f"{path}: sampling rate {rate} Hz, the config expects {sampling_rate} Hz "
                "(resample the corpus, or ask for resampling)"
            )
        from scipy.signal import resample_poly

        g = math.gcd(rate, sampling_rate)
        audio = resample_poly(audio, sampling_rate // g, rate // g).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(audio))


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


@dataclass(frozen=True)
class SpeechConfig:
    """Audio and text settings of VITS's ``data`` config section (defaults: ``ljs_base.json``).

    ``filter_length`` is VITS's name for ``n_fft``; ``resample`` converts WAVs at another rate instead of
    rejecting them; ``symbols`` is the symbol table (VITS's by default).
    """

    sampling_rate: int = 22050
    filter_length: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    add_blank: bool = True
    symbols: tuple[str, ...] = field(default=VITS_SYMBOLS, repr=False)
    resample: bool = False

    def __post_init__(self) -> None:
        check_positive_ints(
            sampling_rate=self.sampling_rate,
            filter_length=self.filter_length,
            hop_length=self.hop_length,
            win_length=self.win_length,
        )
        if not self.symbols or not all(isinstance(s, str) for s in self.symbols):
            raise ValueError("symbols must be a non-empty sequence of strings")

    @property
    def n_freq(self) -> int:
        """Spectrogram channels, ``filter_length // 2 + 1`` (VITS's ``spec_channels``)."""
        return self.filter_length // 2 + 1

    @classmethod
    def from_vits_config(cls, config: Mapping[str, Any], *, resample: bool = False) -> SpeechConfig:
        """From a VITS ``config.json`` (its ``data`` section; a top-level ``symbols`` list if present)."""
        data = config.get("data") if isinstance(config, Mapping) else None
        if not isinstance(data, Mapping):
            raise ValueError("config has no 'data' section (expected a VITS config.json)")
        keys = ("sampling_rate", "filter_length", "hop_length", "win_length")
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(f"config 'data' section lacks {missing}")
        symbols = config.get("symbols", VITS_SYMBOLS)
        return cls(
            **{k: data[k] for k in keys},
            add_blank=bool(data.get("add_blank", True)),
            symbols=tuple(symbols),
            resample=resample,
        )


@dataclass
class SpeechBatch:
    """Padded utterances: ``text (B, T_text)`` long ids and ``text_lengths (B,)``; ``spec (B, n_freq,
    T_spec)`` float32 (0 on padded frames) and ``spec_lengths (B,)``; ``speakers (B,)`` long or None;
    ``sources`` the ``file:line`` of each utterance."""

    text: Tensor
    text_lengths: Tensor
    spec: Tensor
    spec_lengths: Tensor
    speakers: Tensor | None
    sources: tuple[str, ...]

    def to(self, device: torch.device | str) -> SpeechBatch:
        return SpeechBatch(
            self.text.to(device),
            self.text_lengths.to(device),
            self.spec.to(device),
            self.spec_lengths.to(device),
            None if self.speakers is None else self.speakers.to(device),
            self.sources,
        )

    def __len__(self) -> int:
        return len(self.sources)


def load_utterance(utterance: Utterance, config: SpeechConfig) -> tuple[Tensor, Tensor]:
    """``(ids (T_text,) long, spec (n_freq, T_spec) float32)`` as VITS's ``TextAudioLoader`` makes them;
    errors name ``utterance.source``."""
    try:
        ids = cleaned_text_to_sequence(utterance.text, config.symbols)
        if not ids:
            raise ValueError("empty text")
        if config.add_blank:
            ids = intersperse(ids, 0)
        wav = read_wav(utterance.wav_path, config.sampling_rate, config.resample)
        spec = linear_spectrogram(wav, config.filter_length, config.hop_length, config.win_length)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{utterance.source}: {err}") from err
    except ValueError as err:
        raise ValueError(f"{utterance.source}: {err}") from err
    return torch.tensor(ids, dtype=torch.long), spec


def _pad_stack(tensors: Sequence[Tensor]) -> Tensor:
    longest = max(t.shape[-1] for t in tensors)
    return torch.stack([F.pad(t, (0, longest - t.shape[-1])) for t in tensors])


def _collate(items: Sequence[tuple[Utterance, Tensor, Tensor]]) -> SpeechBatch:
    speakers = [utt.speaker for utt, _, _ in items]
    if any(s is None for s in speakers) and not all(s is None for s in speakers):
        raise ValueError(f"{items[0][0].source}: utterances with and without speaker ids in one corpus")
    return SpeechBatch(
        text=_pad_stack([ids for _, ids, _ in items]),
        text_lengths=torch.tensor([ids.shape[0] for _, ids, _ in items], dtype=torch.long),
        spec=_pad_stack([spec for _, _, spec in items]),
        spec_lengths=torch.tensor([spec.shape[-1] for _, _, spec in items], dtype=torch.long),
        speakers=None if speakers[0] is None else torch.tensor(speakers, dtype=torch.long),
        sources=tuple(utt.source for utt, _, _ in items),
    )


def speech_batches(
    utterances: Iterable[Utterance],
    config: SpeechConfig,
    batch_size: int,
    *,
    max_utterances: int | None = None,
) -> Iterator[SpeechBatch]:
    """Stream padded batches of ``batch_size`` utterances (the last may be smaller), in corpus order,
    stopping after ``max_utterances``. Only the current batch is held in memory."""
    check_positive_ints(batch_size=batch_size)
    check_positive_ints(allow_none=True, max_utterances=max_utterances)
    items: list[tuple[Utterance, Tensor, Tensor]] = []
    seen = 0
    for utterance in utterances:
        if max_utterances is not None and seen >= max_utterances:
            break
        items.append((utterance, *load_utterance(utterance, config)))
        seen += 1
        if len(items) == batch_size:
            yield _collate(items)
            items = []
    if items:
        yield _collate(items)
