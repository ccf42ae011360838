"""Real speech the way VITS reads it: filelists and LJSpeech folders, WAVs, linear spectrograms, symbols.

Streaming throughout: :func:`open_corpus` yields :class:`Utterance` records one line at a time and
:func:`speech_batches` turns them into padded :class:`SpeechBatch` es of ``batch_size`` utterances, so no
more than one batch of audio or spectrograms is ever in memory.

Shapes: waveforms ``(..., samples)`` float in ``[-1, 1]``; spectrograms ``(..., n_fft // 2 + 1, frames)``
(linear magnitude, VITS's ``spec``); token ids ``(T_text,)`` long."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .._validate import check_positive_ints
from .audio import linear_spectrogram, read_wav
from .filelists import Utterance
from .text import VITS_SYMBOLS, cleaned_text_to_sequence, intersperse, piper_phoneme_ids


@dataclass(frozen=True)
class SpeechConfig:
    """Audio and text settings of VITS's ``data`` config section (defaults: ``ljs_base.json``).

    ``filter_length`` is VITS's name for ``n_fft``; ``resample`` converts WAVs at another rate instead of
    rejecting them; ``symbols`` is the symbol table (VITS's by default); ``phoneme_id_map`` (a Piper voice's,
    read from its config) replaces ``symbols`` and ``add_blank`` with Piper's mapping
    (:func:`~pyro_vits.data.text.piper_phoneme_ids`).
    """

    sampling_rate: int = 22050
    filter_length: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    add_blank: bool = True
    symbols: tuple[str, ...] = field(default=VITS_SYMBOLS, repr=False)
    resample: bool = False
    phoneme_id_map: Mapping[str, Sequence[int]] | None = field(default=None, repr=False, compare=False)

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
        """From a VITS ``config.json`` (its ``data`` section; a top-level ``symbols`` list or a Piper
        ``phoneme_id_map`` if present)."""
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
            phoneme_id_map=config.get("phoneme_id_map"),
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
        if config.phoneme_id_map is not None:
            ids, _ = piper_phoneme_ids(utterance.text, config.phoneme_id_map)
        else:
            ids = cleaned_text_to_sequence(utterance.text, config.symbols)
        if not ids:
            raise ValueError("empty text")
        if config.add_blank and config.phoneme_id_map is None:
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
